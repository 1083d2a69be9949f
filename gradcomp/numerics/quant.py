"""Round tensors onto an :class:`FPFormat` grid: encode to integer codes, decode, quantize.

The kernels work on the integer bit pattern of the input (float32, or float64 for float64
input), branch-free: every element goes through the same integer ops, with masks instead of
branches, so the code is vectorized, compiles well and runs the same on CPU and CUDA.

Numerics (for a format with ``m`` mantissa bits and exponent range ``[emin, emax]``):

* An input ``x = S * 2**L`` (``S`` its integer significand) lives in binade ``e = floor(log2|x|)``;
  on the target grid its unit in the last place is ``2**(max(e, emin) - m)`` (below ``emin`` the
  subnormal spacing stays constant). The kernel drops ``d`` low bits of ``S`` accordingly.
* ``"nearest"``: round half to even (ties go to the even code, as in ml_dtypes; for
  ``man_bits == 0`` that is the even exponent field), exactly (integer arithmetic, no double rounding: float64
  inputs are rounded from their own 53-bit significand; float16/bfloat16 are widened to float32
  losslessly first).
* ``"stochastic"``: round up with probability equal to the dropped fraction, using ``d`` bits of
  counter-based noise (:mod:`gradcomp.numerics.rng`); exactly unbiased whenever ``d <= 30`` (every
  float32 input down to ``2**-(7 + m)`` times the smallest subnormal). Smaller inputs, and float64
  inputs, first truncate to 30 noise-sized bits: a bias below ``2**-30`` of one grid step.
* Overflow saturates to ``+-max`` (the formats have no inf); ``+-inf`` -> ``+-max``.
* The sign survives rounding to zero (``-tiny -> -0.0``), as in ml_dtypes.
* NaN has no code. :func:`quantize` returns NaN for NaN. :func:`encode` raises ``ValueError`` on
  NaN unless ``nan_check=False``, in which case NaN saturates like inf (sign bit kept) and the
  caller must carry the information itself (the codecs put a non-finite flag in their header;
  :func:`has_nonfinite` is the cheap, sync-free check).

Code layout: ``sign << (e + m) | exponent_field << m | mantissa_field``; codes are uint8 for
formats of at most 8 bits, int32 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradcomp.numerics import kernels
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.packing import pack_unchecked, unpack
from gradcomp.numerics.rng import hash_bits, resolve_key

ROUNDING_MODES = ("nearest", "stochastic")
MAX_SCALE_EXP = 2**14  # power-of-two scales travel as int16 in payload headers
_NOISE_BITS = 30  # at most this many bits of noise per element (keeps S + noise < 2**31)


@dataclass(frozen=True)
class _SourceLayout:
    """Bit layout of the float type the kernel reads (float32 or float64)."""

    float_dtype: torch.dtype
    int_dtype: torch.dtype
    man_bits: int
    bias: int
    exp_mask: int

    @property
    def sign_shift(self) -> int:
        return self.man_bits + self.exp_mask.bit_length()


_F32 = _SourceLayout(torch.float32, torch.int32, 23, 127, 0xFF)
_F64 = _SourceLayout(torch.float64, torch.int64, 52, 1023, 0x7FF)


def _check_rounding(rounding: str) -> bool:
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    return rounding == "stochastic"


def _check_input(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{what}: expected a floating-point tensor, got dtype {x.dtype}")


def _as_source(x: torch.Tensor) -> tuple[torch.Tensor, _SourceLayout]:
    """Return ``x`` as contiguous float32 (or float64) with the matching bit layout."""
    if x.dtype == torch.float64:
        return x.contiguous(), _F64
    # float16, bfloat16 and float8 widen to float32 exactly.
    return x.to(torch.float32).contiguous(), _F32


def code_dtype(fmt: FPFormat) -> torch.dtype:
    """Integer dtype of codes: uint8 for formats of at most 8 bits, int32 otherwise."""
    return torch.uint8 if fmt.bits <= 8 else torch.int32


def _encode_bits(
    xs: torch.Tensor, src: _SourceLayout, fmt: FPFormat, stochastic: bool, key: int,
    scale_exp: int = 0,
) -> torch.Tensor:
    """Return codes (in ``src.int_dtype``) of ``xs * 2**-scale_exp``, ``xs`` laid out as ``src``.

    The scale is applied to the exponent arithmetic, so it is exact (no intermediate product
    can overflow or lose subnormal bits).
    """
    m, b = fmt.man_bits, fmt.bias
    u = xs.view(src.int_dtype)
    sign = (u >> src.sign_shift) & 1
    a = u & ((1 << src.sign_shift) - 1)
    ef = a >> src.man_bits
    ef1 = ef.clamp(min=1)
    # Integer significand with its implicit bit; x = sig * 2**lsb.
    sig = (a & ((1 << src.man_bits) - 1)) + ((ef1 - ef) ^ 1) * (1 << src.man_bits)
    lsb = ef1 - (src.bias + src.man_bits + scale_exp)
    # Binade of |x| * 2**-scale_exp. Source subnormals only matter when the (scaled) format's
    # normals reach below the source's normal range; then read the binade off sig's own float
    # exponent.
    binade = ef1 - (src.bias + scale_exp)
    if fmt.min_exponent + scale_exp < 1 - src.bias:
        sig_exp = (sig.to(torch.float32).view(torch.int32) >> 23) - 127
        binade = torch.where(ef == 0, lsb + sig_exp.to(src.int_dtype), binade)
    top = binade.clamp(min=fmt.min_exponent)  # binade on the target grid
    drop = top - m - lsb  # low bits of sig below the target's last place
    if fmt.min_subnormal_exponent + scale_exp <= 1 - src.bias - src.man_bits:
        # A scale can lift source subnormals into binades as fine as (or finer than) their own
        # bits: shift the significand left so at least one (zero) bit is dropped, which the
        # rounding arithmetic needs (a shift by -1 is undefined); rounding stays exact.
        left = (1 - drop).clamp(min=0)
        sig, drop = sig << left, drop + left
    if stochastic:
        dc = drop.clamp(max=_NOISE_BITS)
        sig = sig >> (drop - dc).clamp(max=src.man_bits + 1)
        idx = torch.arange(xs.numel(), dtype=torch.int32, device=xs.device).view(xs.shape)
        noise = ((hash_bits(idx, key) >> 1) & 0x7FFFFFFF) >> (31 - dc).to(torch.int32)
        q = (sig + noise.to(src.int_dtype)) >> dc
    else:
        # Round half to even: add half an ulp minus one, plus the would-be last bit.
        dc = drop.clamp(max=src.man_bits + 2)  # beyond that everything rounds to zero anyway
        # Ties go to the even code (ml_dtypes' rule). With m >= 1 that is the even mantissa;
        # with m == 0 the code's last bit is the exponent's, which depends on the binade too.
        odd = sig >> dc if m else (sig >> dc) + top + (b - 1)
        q = (sig + ((1 << (dc - 1)) - 1) + (odd & 1)) >> dc
    # q counts target ulps in binade ``top``; a carry into the next binade lands in the exponent.
    code = ((top + (b - 1)) << m) + q
    code = code.clamp(max=fmt.max_code)  # saturate (also catches inf and NaN)
    return code | (sign << (fmt.exp_bits + m))


def has_nonfinite(x: torch.Tensor) -> torch.Tensor:
    """Return a 0-dim bool tensor: does ``x`` hold any inf or NaN? (No host sync.)

    One fused min/max reduction (NaN propagates through both, an inf is an extreme): no
    temporary of ``x``'s size, about 20x faster than ``~torch.isfinite(x).all()`` on the CPU.
    """
    if not x.is_floating_point() or x.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=x.device)
    mn, mx = torch.aminmax(x)
    return ~(torch.isfinite(mn) & torch.isfinite(mx))


def encode(
    x: torch.Tensor,
    fmt: FPFormat,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    *,
    key: int | None = None,
    nan_check: bool = True,
    scale_exp: int = 0,
    packed: bool = False,
) -> torch.Tensor:
    """Round ``x * 2**-scale_exp`` onto ``fmt`` and return the integer codes (same shape).

    Codes are ``sign | exponent | mantissa`` (sign in the top bit), uint8 for formats of at most
    8 bits, int32 otherwise. Rounding, saturation and NaN policy: see the module docstring.
    Stochastic rounding draws from ``generator`` (one draw) or uses ``key`` directly. The
    power-of-two scale ``scale_exp`` is exact (folded into the exponent arithmetic); element
    ``i`` of ``x`` (row-major) draws its noise at counter ``i``.

    ``packed=True`` returns the codes already packed (:mod:`gradcomp.numerics.packing`): a 1-D
    uint8 tensor of ``ceil(x.numel() * fmt.bits / 8)`` bytes, equal to
    ``pack(encode(x, ...).reshape(-1), fmt.bits)`` but, for float32 CPU input, computed in one
    pass over ``x`` by the native kernel (rounding, NaN check and bit layout fused) -- the fast
    way to put codes on a wire. Decode it with ``decode(wire, fmt, packed=True, numel=...)``.

    Example:
        >>> fmt = FPFormat(3, 2)
        >>> encode(torch.tensor([1.0, -1.1, 100.0]), fmt).tolist()
        [12, 44, 31]
        >>> encode(torch.tensor([1.0, -1.1, 100.0]), fmt, packed=True).tolist()  # 3 x 6 bits
        [12, 251, 1]
    """
    _check_input(x, "encode")
    stochastic = _check_rounding(rounding)
    k = resolve_key(generator, key, "encode") if stochastic else 0
    scale_exp = _check_scale(scale_exp)
    if not isinstance(packed, bool):
        raise ValueError(f"encode: packed must be a bool, got {packed!r}")
    nan_message = (f"encode: input has NaN, and {fmt.name} has no NaN code; check with "
                   "gradcomp.has_nonfinite() and carry a flag, or pass nan_check=False to saturate NaN")
    if packed:
        # One native pass: codes, packing and the non-finite flag (NaN is then told from inf).
        fused = kernels.encode_pack_with_stats(x, fmt, stochastic, k, scale_exp, 0) if x.numel() else None
        if fused is not None:
            wire, _, nonfinite = fused
            if nan_check and nonfinite and bool(torch.isnan(x).any()):
                raise ValueError(nan_message)
            return wire
        codes = encode(x, fmt, rounding, key=k, nan_check=nan_check, scale_exp=scale_exp)
        return pack_unchecked(codes.reshape(-1), fmt.bits)  # codes are in range by construction
    # The native kernel (float32 CPU) gives the same codes and finds NaN in the same pass.
    fast = kernels.encode_codes(x, fmt, stochastic, k, scale_exp) if x.numel() else None
    if nan_check and (fast[1] if fast is not None else bool(torch.isnan(x).any())):
        raise ValueError(nan_message)
    if fast is not None:
        return fast[0]
    xs, src = _as_source(x)
    return _encode_bits(xs, src, fmt, stochastic, k, scale_exp).to(code_dtype(fmt))


def _check_scale(scale_exp: int) -> int:
    if isinstance(scale_exp, bool) or not isinstance(scale_exp, int) or abs(scale_exp) > MAX_SCALE_EXP:
        raise ValueError(f"scale_exp must be an int in -{MAX_SCALE_EXP}..{MAX_SCALE_EXP}, got {scale_exp!r}")
    return scale_exp


def decode_table(
    fmt: FPFormat, device: torch.device | str | None = None, scale_exp: int = 0
) -> torch.Tensor:
    """Return the float32 value of every code ``0 .. 2**bits - 1``, times ``2**scale_exp``.

    Exact (``-0.0`` included) while the scaled values fit float32; beyond that they round as
    float32 does (to inf above its range, to float32 subnormals or zero below).
    """
    codes = torch.arange(fmt.sign_bit, dtype=torch.int64, device=device)
    ef, mf = codes >> fmt.man_bits, codes & ((1 << fmt.man_bits) - 1)
    sig = mf + (ef > 0).to(torch.int64) * (1 << fmt.man_bits)
    mag = torch.ldexp(sig.to(torch.float64),
                      (ef.clamp(min=1) - fmt.bias - fmt.man_bits + scale_exp).to(torch.float64))
    return torch.cat([mag, -mag]).to(torch.float32)


def decode(codes: torch.Tensor, fmt: FPFormat, *, scale_exp: int = 0,
           out: torch.Tensor | None = None, packed: bool = False, numel: int | None = None) -> torch.Tensor:
    """Return the float32 values of ``codes`` (integer tensor of ``fmt`` codes) times ``2**scale_exp``.

    Exact: every code of a valid format is a float32 number (with a scale, while the product
    fits float32). Codes outside ``0 .. 2**bits - 1`` raise ``ValueError`` (``out`` may then
    hold partial results). ``out``: a contiguous float32 tensor of ``codes``' shape and device
    to write into and return; a large fresh result costs the allocator's first touch of every
    page, which on the CPU takes longer than the decode itself.

    ``packed=True``: ``codes`` is a packed stream (what ``encode(..., packed=True)`` returns, a
    1-D uint8 tensor of exactly ``ceil(numel * fmt.bits / 8)`` bytes, else ``ValueError``) of
    ``numel`` codes; ``numel`` may be left out when ``out`` is given (any shape, ``out.numel()``
    codes, filled in row-major order). The result is 1-D (or ``out``); unpacking and decoding
    run in one native pass on the CPU. Every packed code is a valid code.

    Example:
        >>> decode(torch.tensor([0, 5, 37], dtype=torch.uint8), FPFormat(3, 2)).tolist()
        [0.0, 0.3125, -0.3125]
        >>> decode(torch.tensor([12, 251, 1], dtype=torch.uint8), FPFormat(3, 2), packed=True, numel=3).tolist()
        [1.0, -1.0, 28.0]
    """
    if not isinstance(packed, bool):
        raise ValueError(f"decode: packed must be a bool, got {packed!r}")
    if packed:
        return _decode_packed(codes, fmt, _check_scale(scale_exp), out, numel)
    if numel is not None:
        raise ValueError("decode: numel is only for packed=True (unpacked codes carry their shape)")
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
        raise ValueError("decode: expected an integer tensor of codes")
    if out is not None and not (isinstance(out, torch.Tensor) and out.dtype == torch.float32
                                and out.shape == codes.shape and out.device == codes.device
                                and out.is_contiguous()):
        raise ValueError(f"decode: out must be a contiguous float32 tensor of shape {tuple(codes.shape)} "
                         f"on {codes.device}")
    table = decode_table(fmt, codes.device, _check_scale(scale_exp))
    fast = kernels.decode_codes(codes, table, out) if codes.numel() else None
    if fast is not None and fast[1]:  # the native kernel: the same values, one pass
        return fast[0]
    idx = codes.to(torch.int64)
    if idx.numel() and bool(((idx < 0) | (idx >= fmt.num_codes)).any()):
        raise ValueError(f"decode: codes must be in 0..{fmt.num_codes - 1} for {fmt.name}")
    return table[idx] if out is None else out.copy_(table[idx])


def _decode_packed(wire: torch.Tensor, fmt: FPFormat, scale_exp: int, out: torch.Tensor | None,
                   numel: int | None) -> torch.Tensor:
    """:func:`decode` of a packed stream (``packed=True``): arguments checked, then one pass."""
    if not isinstance(wire, torch.Tensor) or wire.dtype != torch.uint8 or wire.dim() != 1:
        raise ValueError("decode: packed=True expects a 1-D uint8 tensor (the packed stream)")
    if out is not None and not (isinstance(out, torch.Tensor) and out.dtype == torch.float32
                                and out.device == wire.device and out.is_contiguous()):
        raise ValueError(f"decode: out must be a contiguous float32 tensor on {wire.device}")
    if numel is None:
        if out is None:
            raise ValueError("decode: packed=True needs numel (or out) to know how many codes the stream holds")
        numel = out.numel()
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"decode: numel must be a non-negative int, got {numel!r}")
    if out is not None and out.numel() != numel:
        raise ValueError(f"decode: out holds {out.numel()} elements, numel is {numel}")
    target = torch.empty(numel, dtype=torch.float32, device=wire.device) if out is None else out
    table = decode_table(fmt, wire.device, scale_exp)
    if numel and kernels.unpack_decode(wire, table, fmt.bits, target):  # checks the stream's length
        return target
    codes = unpack(wire, fmt.bits, numel).to(torch.int64)  # checks the stream's length
    if numel:
        target.view(-1).copy_(table[codes])
    return target


def quantize(
    x: torch.Tensor,
    fmt: FPFormat,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    *,
    key: int | None = None,
    scale_exp: int = 0,
) -> torch.Tensor:
    """Return ``x`` rounded onto ``fmt``'s grid scaled by ``2**scale_exp``, as float32.

    ``scale_exp = k`` rounds ``x * 2**-k`` onto the grid and multiplies back (both exact).

    Equals ``decode(encode(x, ...))`` for inputs without NaN; NaN stays NaN, ``+-inf`` and
    overflow saturate to ``+-fmt.max``. ``rounding="nearest"`` is round half to even;
    ``"stochastic"`` is exactly unbiased (see the module docstring) and needs ``generator``
    or ``key``.

    Example:
        >>> quantize(torch.tensor([0.3, 1.1, 1e9]), FPFormat(3, 2)).tolist()
        [0.3125, 1.0, 28.0]
    """
    _check_input(x, "quantize")
    stochastic = _check_rounding(rounding)
    k = resolve_key(generator, key, "quantize") if stochastic else 0
    xs, src = _as_source(x)
    codes = _encode_bits(xs, src, fmt, stochastic, k, _check_scale(scale_exp))
    out = decode_table(fmt, x.device, scale_exp)[codes.to(torch.int64)]
    return torch.where(torch.isnan(xs), xs.to(torch.float32), out)
