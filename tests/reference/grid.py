"""Pure-Python reference quantizer over an FPFormat's exact grid (slow, obviously right)."""

import bisect
import math
from functools import lru_cache

from gradcomp import FPFormat


@lru_cache(maxsize=None)
def _grid(fmt: FPFormat) -> tuple[float, ...]:
    return tuple(fmt.code_values())


def reference_code(v: float, fmt: FPFormat) -> int:
    """Nearest code to ``v`` (a Python float), ties to the even code, saturating, sign kept."""
    grid = _grid(fmt)
    sign = fmt.sign_bit if math.copysign(1.0, v) < 0 else 0
    a = abs(v)
    if a >= grid[-1]:
        return sign | fmt.max_code
    hi = bisect.bisect_left(grid, a)  # grid[hi-1] < a <= grid[hi]
    if grid[hi] == a:
        return sign | hi
    lo = hi - 1
    dlo, dhi = a - grid[lo], grid[hi] - a
    if dlo < dhi:
        return sign | lo
    if dhi < dlo:
        return sign | hi
    return sign | (lo if lo % 2 == 0 else hi)
