"""Native fast paths for FP encode+pack and unpack+decode, with the eager path as reference.

``gradcomp/csrc/fpcodec.cpp`` implements the integer algorithm of :mod:`gradcomp.quant` and the
bit layout of :mod:`gradcomp.packing` fused into one pass over memory (float32 input, CPU),
parallel on torch's intra-op threads. It is built with ``torch.utils.cpp_extension`` the first
time it is needed (about a minute; announced on stderr, then cached by torch in
``~/.cache/torch_extensions``); call :func:`warmup` at start-up to pay that before training.
Results are bit-identical to the eager path (``tests/unit/test_kernels.py``).

``GRADCOMP_KERNELS`` selects: ``auto`` (default: native where it applies and builds, eager
otherwise), ``native`` (fail if it cannot build), ``eager`` (never build).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import torch

from .formats import FPFormat

MODES = ("auto", "native", "eager")
_SOURCE = Path(__file__).parent / "csrc" / "fpcodec.cpp"


def kernel_mode() -> str:
    """The selected mode from ``GRADCOMP_KERNELS`` (validated)."""
    mode = os.environ.get("GRADCOMP_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"GRADCOMP_KERNELS must be one of {MODES}, got {mode!r}")
    return mode


@functools.lru_cache(maxsize=1)
def _build():
    """Build (or load the cached build of) the extension; ``None`` if that fails."""
    from torch.utils import cpp_extension

    print("gradcomp: loading native codec kernels (first build takes about a minute; cached "
          "afterwards; GRADCOMP_KERNELS=eager skips it)", file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(name="gradcomp_fpcodec", sources=[str(_SOURCE)],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, ...: stay correct, just slower
        if kernel_mode() == "native":
            raise
        warnings.warn(f"gradcomp: native codec kernels unavailable, using the eager path ({exc})")
        return None


def native():
    """The native module if the mode allows it and it builds, else ``None``."""
    return None if kernel_mode() == "eager" else _build()


def warmup() -> bool:
    """Build/load the native kernels now; return whether they are in use."""
    return native() is not None


def _applies(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32


def encode_pack(x: torch.Tensor, fmt: FPFormat, stochastic: bool, key: int, scale_exp: int) -> torch.Tensor | None:
    """Packed codes of float32 CPU ``x`` (same bits as the eager path), or ``None`` if not applicable."""
    if not _applies(x):
        return None
    mod = native()
    if mod is None:
        return None
    src_min_exponent, src_min_subnormal_exponent = -126, -149
    return mod.encode_pack(
        x.contiguous(), fmt.exp_bits, fmt.man_bits, fmt.bias, scale_exp, stochastic,
        key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF,
        fmt.min_exponent + scale_exp < src_min_exponent,
        fmt.min_subnormal_exponent + scale_exp <= src_min_subnormal_exponent)


def unpack_decode(packed: torch.Tensor, table: torch.Tensor, bits: int, out: torch.Tensor) -> bool:
    """Decode ``packed`` through the float32 ``table`` into contiguous float32 CPU ``out``."""
    if packed.device.type != "cpu" or not out.is_contiguous() or out.dtype != torch.float32:
        return False
    mod = native()
    if mod is None:
        return False
    mod.unpack_decode(packed.contiguous(), table.contiguous(), bits, out)
    return True
