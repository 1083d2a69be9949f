"""Custom low-bit floating-point formats: sign + exponent + mantissa, finite-only.

Every format here is "fn" in ml_dtypes' naming: all codes are finite numbers (no inf or NaN
codes), exponent field 0 holds zero and the subnormals, and values that overflow saturate to
+-max. All properties are derived from (exp_bits, man_bits, bias); nothing is tabulated by hand.

Values are carried in float32 by the kernels, so a format must fit inside float32: its largest
value at most float32's max and its smallest subnormal at least 2**-149.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

MIN_EXP_BITS, MAX_EXP_BITS = 1, 8
MIN_MAN_BITS, MAX_MAN_BITS = 0, 10
MAX_TOTAL_BITS = 16

# float32 limits the formats must fit inside (values are computed and returned as float32).
_F32_MAX_EXP = 127
_F32_MIN_SUBNORMAL_EXP = -149

_NAME_RE = re.compile(r"^(?:float(?P<bits>\d+)_)?e(?P<e>\d+)m(?P<m>\d+)(?P<fn>fn)?(?:_b(?P<bias>-?\d+))?$")


@dataclass(frozen=True)
class FPFormat:
    """Describe a sign + ``exp_bits`` exponent + ``man_bits`` mantissa finite-only float format.

    Numerics: value of a code with exponent field ``e`` and mantissa field ``f`` is
    ``(-1)**s * 2**(e - bias) * (1 + f / 2**man_bits)`` for ``e >= 1`` and
    ``(-1)**s * 2**(1 - bias) * (f / 2**man_bits)`` for ``e == 0`` (subnormals). The all-ones
    exponent is an ordinary finite binade. Overflow saturates to ``max``.

    Args:
        exp_bits: exponent bits, 1..8.
        man_bits: mantissa bits, 0..10; ``1 + exp_bits + man_bits <= 16``.
        bias: exponent bias; ``None`` means ``2**(exp_bits - 1) - 1``.

    Example:
        >>> fmt = FPFormat(3, 2)
        >>> fmt.name, fmt.bits, fmt.max, fmt.min_subnormal
        ('float6_e3m2fn', 6, 28.0, 0.0625)
    """

    exp_bits: int
    man_bits: int
    # Passing None (the default) means the default bias; __post_init__ replaces it, so every
    # constructed FPFormat holds an int (what the annotation tells type checkers).
    bias: int = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in ("exp_bits", "man_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"FPFormat.{name} must be an int, got {value!r}")
        if not MIN_EXP_BITS <= self.exp_bits <= MAX_EXP_BITS:
            raise ValueError(
                f"FPFormat.exp_bits must be in {MIN_EXP_BITS}..{MAX_EXP_BITS}, got {self.exp_bits}"
            )
        if not MIN_MAN_BITS <= self.man_bits <= MAX_MAN_BITS:
            raise ValueError(
                f"FPFormat.man_bits must be in {MIN_MAN_BITS}..{MAX_MAN_BITS}, got {self.man_bits}"
            )
        total = 1 + self.exp_bits + self.man_bits
        if total > MAX_TOTAL_BITS:
            raise ValueError(
                f"FPFormat e{self.exp_bits}m{self.man_bits} has {total} bits (sign + exponent + "
                f"mantissa); at most {MAX_TOTAL_BITS} are allowed"
            )
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exp_bits - 1) - 1)
        elif isinstance(self.bias, bool) or not isinstance(self.bias, int):
            raise ValueError(f"FPFormat.bias must be an int or None, got {self.bias!r}")
        if self.max_exponent > _F32_MAX_EXP:
            raise ValueError(
                f"{self.name}: its top binade is 2**{self.max_exponent}, beyond float32 "
                f"(largest binade 2**{_F32_MAX_EXP}); gradcomp carries values in float32, so use "
                f"bias >= {2 ** self.exp_bits - 1 - _F32_MAX_EXP}"
            )
        if self.min_subnormal_exponent < _F32_MIN_SUBNORMAL_EXP:
            raise ValueError(
                f"{self.name}: its smallest subnormal is 2**{self.min_subnormal_exponent}, below "
                f"float32's 2**{_F32_MIN_SUBNORMAL_EXP}; use bias <= "
                f"{1 - self.man_bits - _F32_MIN_SUBNORMAL_EXP}"
            )

    # ---- derived properties -------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Total bits of one code (sign + exponent + mantissa)."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def default_bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def max_exponent(self) -> int:
        """Unbiased exponent of the top binade (the all-ones exponent field is finite)."""
        return 2**self.exp_bits - 1 - self.bias

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal binade."""
        return 1 - self.bias

    @property
    def min_subnormal_exponent(self) -> int:
        return 1 - self.bias - self.man_bits

    @property
    def max(self) -> float:
        """Largest finite value, ``(2 - 2**-man_bits) * 2**max_exponent``."""
        return math.ldexp(2.0 - math.ldexp(1.0, -self.man_bits), self.max_exponent)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.min_exponent)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (equals ``min_normal`` when ``man_bits == 0``)."""
        return math.ldexp(1.0, self.min_subnormal_exponent)

    @property
    def num_codes(self) -> int:
        return 2**self.bits

    @property
    def max_code(self) -> int:
        """Largest magnitude code (sign bit clear): the code of ``max``."""
        return 2 ** (self.exp_bits + self.man_bits) - 1

    @property
    def sign_bit(self) -> int:
        """Value of the sign bit within a code."""
        return 2 ** (self.exp_bits + self.man_bits)

    @property
    def name(self) -> str:
        """ml_dtypes-style name, e.g. ``float6_e3m2fn``; a non-default bias adds ``_b{bias}``."""
        base = f"float{self.bits}_e{self.exp_bits}m{self.man_bits}fn"
        return base if self.bias == self.default_bias else f"{base}_b{self.bias}"

    def code_values(self) -> list[float]:
        """Return the value of every magnitude code ``0 .. max_code`` (ascending, exact floats).

        Code ``c`` (sign bit clear) has exponent field ``c >> man_bits`` and mantissa field
        ``c & (2**man_bits - 1)``; the list is strictly increasing, so it is also the grid of
        non-negative representable values.
        """
        step = 2**self.man_bits
        return [
            math.ldexp(float((c % step) + (step if c >= step else 0)),
                       max(c // step, 1) - self.bias - self.man_bits)
            for c in range(self.max_code + 1)
        ]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def from_name(cls, name: str) -> FPFormat:
        """Parse ``"e3m2"``, ``"float6_e3m2fn"`` or either with a ``_b{bias}`` suffix.

        Example:
            >>> FPFormat.from_name("float6_e3m2fn") == FPFormat.from_name("e3m2") == FPFormat(3, 2)
            True
        """
        if not isinstance(name, str):
            raise ValueError(f"format name must be a str, got {name!r}")
        match = _NAME_RE.match(name.strip().lower())
        if match is None:
            raise ValueError(
                f"cannot parse format name {name!r}; expected 'e{{E}}m{{M}}' or "
                f"'float{{bits}}_e{{E}}m{{M}}fn' (optionally '_b{{bias}}'), e.g. 'e3m2' or 'float6_e3m2fn'"
            )
        e, m = int(match["e"]), int(match["m"])
        bias = int(match["bias"]) if match["bias"] is not None else None
        if match["bits"] is not None:
            if match["fn"] is None:
                raise ValueError(
                    f"{name!r}: gradcomp formats are finite-only (no inf/NaN codes); "
                    f"did you mean 'float{1 + e + m}_e{e}m{m}fn'?"
                )
            if int(match["bits"]) != 1 + e + m:
                raise ValueError(
                    f"{name!r}: float{match['bits']} does not match e{e}m{m}, which has {1 + e + m} bits"
                )
        return cls(e, m) if bias is None else cls(e, m, bias)
