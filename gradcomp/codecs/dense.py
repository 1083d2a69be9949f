"""Dense codecs: every element travels. fp32 and fp16 baselines, and lognormal-fitted FP."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradcomp.codecs.base import (
    HEADER_BYTES,
    Codec,
    CodecTag,
    Decoder,
    Header,
    check_plan_numel,
    check_shard,
    fit_or_none,
    make_header,
)
from gradcomp.numerics import kernels, lognormal
from gradcomp.numerics.error_model import fp_nmse
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.packing import pack_unchecked, packed_size, unpack
from gradcomp.numerics.quant import ROUNDING_MODES, _as_source, _encode_bits, decode_table


class IdentityCodec(Codec):
    """Send fp32 unchanged (the uncompressed baseline). Summable: plain all-reduce.

    Wire: 8-byte header + 4 bytes per element.
    """

    tag = CodecTag.IDENTITY
    summable = True

    def encode(self, x: torch.Tensor, *, key: int = 0, plan=None) -> torch.Tensor:
        xs = check_shard(x, "IdentityCodec.encode")
        payload = torch.empty(HEADER_BYTES + 4 * xs.numel(), dtype=torch.uint8, device=xs.device)
        payload[:HEADER_BYTES] = make_header(self.tag, xs)
        payload[HEADER_BYTES:].view(torch.float32).copy_(xs)  # a float32 copy (cat copies bytes)
        return payload

    def layout_decoder(self, tag: CodecTag) -> Decoder | None:
        return decode_identity_into if tag == CodecTag.IDENTITY else None

    def wire_bytes(self, numel: int) -> int:
        return HEADER_BYTES + 4 * numel


class HalfCodec(Codec):
    """Send fp16 (round to nearest even; beyond 65504 becomes inf, as torch's fp16 hook does).

    Summable: all-reduced in fp16 directly. Wire: 8-byte header + 2 bytes per element.
    """

    tag = CodecTag.HALF
    summable = True

    def encode(self, x: torch.Tensor, *, key: int = 0, plan=None) -> torch.Tensor:
        xs = check_shard(x, "HalfCodec.encode")
        payload = torch.empty(HEADER_BYTES + 2 * xs.numel(), dtype=torch.uint8, device=xs.device)
        payload[:HEADER_BYTES] = make_header(self.tag, xs)
        payload[HEADER_BYTES:].view(torch.float16).copy_(xs)  # converted in place, no fp16 temporary
        return payload

    def layout_decoder(self, tag: CodecTag) -> Decoder | None:
        return decode_half_into if tag == CodecTag.HALF else None

    def wire_bytes(self, numel: int) -> int:
        return HEADER_BYTES + 2 * numel


def check_payload_size(payload: torch.Tensor, header: Header, numel: int, need: int) -> None:
    """Raise ``ValueError`` when ``payload`` is shorter than the ``need`` bytes its header and
    ``numel`` imply. Longer payloads are accepted: every decoder reads its layout from the front
    and ignores trailing bytes (a payload may sit at the start of a larger buffer)."""
    if payload.numel() < need:
        raise ValueError(f"truncated {header.tag.name} payload: {numel} elements need {need} bytes, "
                         f"got {payload.numel()}")


def decode_identity_into(payload: torch.Tensor, header: Header, numel: int, out: torch.Tensor) -> None:
    """IDENTITY: ``8 + 4 numel`` bytes (shorter: ``ValueError``; trailing bytes ignored)."""
    check_payload_size(payload, header, numel, HEADER_BYTES + 4 * numel)
    out.copy_(_aligned(payload[HEADER_BYTES:HEADER_BYTES + 4 * numel], 4).view(torch.float32))


def decode_half_into(payload: torch.Tensor, header: Header, numel: int, out: torch.Tensor) -> None:
    """HALF: ``8 + 2 numel`` bytes (shorter: ``ValueError``; trailing bytes ignored)."""
    check_payload_size(payload, header, numel, HEADER_BYTES + 2 * numel)
    out.copy_(_aligned(payload[HEADER_BYTES:HEADER_BYTES + 2 * numel], 2).view(torch.float16))


def _aligned(seg: torch.Tensor, size: int) -> torch.Tensor:
    """``seg`` itself, or a copy when its offset is not a multiple of ``size`` (for ``view``)."""
    return seg.clone() if seg.storage_offset() % size else seg


@dataclass(frozen=True)
class FPPlan:
    """Format and power-of-two scale for one shard, with the expected value of the criterion
    that chose them (NMSE or mean relative error; ``None`` when not computed)."""

    fmt: FPFormat
    scale_exp: int
    expected_error: float | None = None


def _check_bits(bits: int, exp_bits: int | None, rounding: str, what: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{what}: bits must be an int in 2..16 (sign included), got {bits!r}")
    if exp_bits is not None:
        allowed = [f.exp_bits for f in lognormal.candidate_formats(bits)]
        if isinstance(exp_bits, bool) or exp_bits not in allowed:
            raise ValueError(f"{what}: exp_bits for {bits} bits must be None (chosen from the fit) "
                             f"or one of {allowed}, got {exp_bits!r}")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"{what}: rounding must be one of {ROUNDING_MODES}, got {rounding!r}")


CRITERIA = ("mse", "relative")


def fp_plan(bits: int, exp_bits: int | None, rounding: str,
            fit: lognormal.LognormalFit | None, criterion: str = "mse") -> FPPlan:
    """Choose the ``bits``-bit format and scale for data with lognormal ``fit``.

    Both criteria are exact for the real format and rounding mode (integrated cell by cell over
    the fitted lognormal, no sampling), and both only consider scales at which the fit's
    ``max_abs`` (see :class:`ShardFit`) does not saturate:

    * ``"mse"``: the added variance ``E[(Q(x)-x)^2] / E[x^2]`` (:func:`gradcomp.numerics.error_model.fp_nmse`, with the
      lognormal cut at ``max_abs``), what SGD feels in an averaged gradient. The scale is
      searched upward from the smallest non-saturating one.
    * ``"relative"``: the seed's criterion, ``E|Q(x)-x|/|x|`` (:func:`lognormal.exact_relative_error`),
      at :func:`lognormal.scale_exponent` raised to the smallest non-saturating scale. It weighs
      every element alike, so on wide distributions it trades the top binades' precision for
      range, at a higher NMSE (compare ``FPCodec(6)`` with ``FPCodec(6, criterion='relative')``
      in ``benchmarks/results/codec_error.md``).

    ``exp_bits`` fixes the split; ``None`` picks it. Without a fit (an all-zero or non-finite
    shard) any format will do: the widest exponent that keeps a mantissa bit, scale 0.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    formats = {f.exp_bits: f for f in lognormal.candidate_formats(bits)}
    if fit is None:
        e = exp_bits if exp_bits is not None else max(e for e, f in formats.items() if f.man_bits >= 1 or e == 1)
        return FPPlan(formats[e], 0, None)
    amax = getattr(fit, "max_abs", math.inf)
    best: FPPlan | None = None
    best_err = math.inf
    for e in ([exp_bits] if exp_bits is not None else sorted(formats)):
        fmt = formats[e]
        k_min = min_scale_exp(amax, fmt)
        if criterion == "relative":
            k = max(lognormal.scale_exponent(fit.mu, fit.sigma, fmt, rounding), k_min)
            candidates = [(lognormal.exact_relative_error(fmt, fit.sigma, fit.mu, rounding, k), k)]
        else:
            upper = amax if 0 < amax < math.inf else math.inf
            # The smallest non-saturating scale is nearly always best; a few above cover
            # formats whose subnormal range makes a coarser scale pay off.
            ks = range(k_min, k_min + 3) if k_min > -(2**14) else [
                lognormal.scale_exponent(fit.mu, fit.sigma, fmt, rounding)]
            candidates = [(fp_nmse(fmt, fit.mu, fit.sigma, k, rounding, upper=upper), k) for k in ks]
        err, k = min(candidates)
        if best is None or err < best_err:
            best, best_err = FPPlan(fmt, k, err), err
    assert best is not None  # at least one candidate format
    return best


def max_finite_abs(xs: torch.Tensor) -> float:
    """Largest finite ``|x|`` of ``xs`` (0.0 when there is none)."""
    if xs.numel() == 0:
        return 0.0
    amax, nonfinite = abs_max_and_nonfinite(xs)  # one reduction, no temporary (the usual case)
    if not nonfinite:
        return amax
    a = xs.abs()
    return float(torch.where(torch.isfinite(a), a, torch.zeros_like(a)).max())


def min_scale_exp(amax: float, fmt: FPFormat) -> int:
    """Smallest ``k`` with ``amax * 2**-k <= fmt.max``: below it the largest values would saturate."""
    if not amax > 0 or not math.isfinite(amax):
        return -(2**14)
    k = math.ceil(math.log2(amax / fmt.max))
    while math.ldexp(fmt.max, k) < amax:  # guard the float log against off-by-one
        k += 1
    while math.ldexp(fmt.max, k - 1) >= amax:
        k -= 1
    return k


def abs_max_and_nonfinite(xs: torch.Tensor) -> tuple[float, bool]:
    """``(max |x|, any inf/NaN)`` from one fused min/max pass (one host sync).

    When ``xs`` holds an inf or NaN the max is not meaningful, but then the payload decodes to
    NaN anyway (the header flag), so the encoder only needs it when it is finite.
    """
    if xs.numel() == 0:
        return 0.0, False
    mn, mx = torch.aminmax(xs)
    amax = max(-float(mn), float(mx))
    return amax, not math.isfinite(amax)


def cover_max(plan: FPPlan, xs: torch.Tensor, amax: float | None = None) -> FPPlan:
    """Return ``plan`` with its scale raised, if needed, so that no finite value of ``xs`` saturates.

    The fitted scale minimizes the mean relative error, which can sacrifice the few largest
    entries of a heavy tail; for a gradient those carry most of the norm, and clipping them
    biases the update. So the scale is never below what keeps ``max|x|`` on the grid. Checked on
    every encode (one reduction), so a plan cached since the last refit cannot clip either.
    """
    k = min_scale_exp(max_finite_abs(xs) if amax is None else amax, plan.fmt)
    return plan if k <= plan.scale_exp else FPPlan(plan.fmt, k, None)


def encode_fp_values(xs: torch.Tensor, plan: FPPlan, stochastic: bool, key: int) -> torch.Tensor:
    """Packed FP codes of the float32 tensor ``xs`` under ``plan`` (NaN saturates; flag it).

    Uses the fused native kernel where it applies (:mod:`gradcomp.numerics.kernels`, bit-identical),
    the eager tensor code otherwise.
    """
    fast = kernels.encode_pack(xs, plan.fmt, stochastic, key, plan.scale_exp) if xs.numel() else None
    if fast is not None:
        return fast
    x32, src = _as_source(xs)
    codes = _encode_bits(x32, src, plan.fmt, stochastic, key, plan.scale_exp)
    return pack_unchecked(codes, plan.fmt.bits)


def decodes_past_float32(packed: torch.Tensor, fmt: FPFormat, scale_exp: int, numel: int) -> bool:
    """Whether a code of ``packed`` (``numel`` codes of ``fmt``) decodes beyond float32's range.

    The scaled grid's top binade is ``2**(fmt.max_exponent + scale_exp)``; below ``2**128`` every
    code is finite (the usual case: no work). Otherwise (a shard whose largest value lies in
    float32's top binade, above the format's largest mantissa there, needs a scale whose grid
    reaches ``2**128``) the codes are unpacked and checked against the decode table: a value
    that rounded up to such a grid point would decode to ``+-inf``. Encoders set the
    non-finite flag then, so the shard decodes to NaN on every rank instead of to a silent
    inf. The codes are the same natively and eagerly, so the flag is too.
    """
    if numel == 0 or fmt.max_exponent + scale_exp < 128:
        return False
    inf = torch.isinf(decode_table(fmt, packed.device, scale_exp))
    if not bool(inf.any()):
        return False
    return bool(inf[unpack(packed, fmt.bits, numel).to(torch.int64)].any())


def decode_fp_values(packed: torch.Tensor, fmt: FPFormat, scale_exp: int, numel: int,
                     out: torch.Tensor) -> None:
    """Write the values of ``numel`` packed ``fmt`` codes, times ``2**scale_exp``, into ``out``."""
    table = decode_table(fmt, packed.device, scale_exp)
    if numel and kernels.unpack_decode(packed, table, fmt.bits, out):
        return
    codes = unpack(packed, fmt.bits, numel)
    torch.index_select(table, 0, codes.to(torch.int64), out=out)


class FPCodec(Codec):
    """Quantize to a ``bits``-bit float (sign included) with a lognormal-fitted split and scale.

    Numerics: the shard is multiplied by ``2**-k`` (exact) and rounded onto the format
    (``rounding="stochastic"``: unbiased, one ulp of counter-based noise; ``"nearest"``: half
    to even). ``exp_bits=None`` chooses the split per shard from the fit by an exact expected
    error of the real format (:func:`fp_plan`): ``criterion="mse"`` (default) minimizes the
    variance added to the gradient, ``"relative"`` the seed's mean relative error. The scale
    ``k`` never lets the shard's largest finite value saturate (:func:`cover_max`, checked on
    every encode): nothing finite is ever clipped. A non-finite input sets the header flag and the shard
    decodes to NaN on every rank; so does a value that would decode beyond float32's range
    (possible only for inputs in float32's top binade, above ``(2 - 2**-man_bits) * 2**127``,
    where the grid that covers them reaches ``2**128``: :func:`decodes_past_float32`), never
    a silent inf.

    Wire: 8-byte header + ``ceil(numel * bits / 8)`` bytes.

    Example:
        >>> codec = FPCodec(bits=6)
        >>> x = torch.randn(1000).mul(2).exp()
        >>> payload = codec.encode(x, key=1)
        >>> payload.numel() == codec.wire_bytes(1000) == 8 + 750
        True
    """

    tag = CodecTag.FP
    uses_fit = True

    def __init__(self, bits: int = 6, exp_bits: int | None = None, rounding: str = "stochastic",
                 criterion: str = "mse"):
        _check_bits(bits, exp_bits, rounding, "FPCodec")
        if criterion not in CRITERIA:
            raise ValueError(f"FPCodec: criterion must be one of {CRITERIA}, got {criterion!r}")
        self.bits = bits
        self.exp_bits = exp_bits
        self.rounding = rounding
        self.criterion = criterion
        self.stochastic = rounding == "stochastic"

    def plan(self, fit: lognormal.LognormalFit | None, numel: int | None = None) -> FPPlan:
        """Format and scale for ``fit`` (exact zeros code as zero at any plan: ``numel`` unused)."""
        check_plan_numel(numel)
        return fp_plan(self.bits, self.exp_bits, self.rounding, fit, self.criterion)

    def encode(self, x: torch.Tensor, *, key: int = 0, plan: FPPlan | None = None) -> torch.Tensor:
        xs = check_shard(x, "FPCodec.encode")
        if plan is None:
            plan = self.plan(fit_or_none(xs), xs.numel())
        fast = (kernels.encode_pack_with_stats(xs, plan.fmt, self.stochastic, key, plan.scale_exp,
                                               HEADER_BYTES) if xs.numel() else None)
        if fast is not None:
            # One pass: codes and max |x| together. In the rare case that the cached plan's scale
            # would saturate this shard's maximum, encode again at the raised scale.
            payload, amax, nonfinite = fast
            covered = cover_max(plan, xs, amax if not nonfinite else 0.0)
            if covered.scale_exp != plan.scale_exp:
                payload[HEADER_BYTES:] = encode_fp_values(xs, covered, self.stochastic, key)
            nonfinite = nonfinite or decodes_past_float32(payload[HEADER_BYTES:], covered.fmt,
                                                          covered.scale_exp, xs.numel())
            payload[:HEADER_BYTES] = make_header(self.tag, xs, covered.fmt, covered.scale_exp,
                                                 nonfinite=nonfinite)
            return payload
        amax, nonfinite = abs_max_and_nonfinite(xs)
        plan = cover_max(plan, xs, amax if not nonfinite else 0.0)
        values = encode_fp_values(xs, plan, self.stochastic, key)
        nonfinite = nonfinite or decodes_past_float32(values, plan.fmt, plan.scale_exp, xs.numel())
        header = make_header(self.tag, xs, plan.fmt, plan.scale_exp, nonfinite=nonfinite)
        return torch.cat([header, values])

    def layout_decoder(self, tag: CodecTag) -> Decoder | None:
        return decode_fp_into if tag == CodecTag.FP else None

    def wire_bytes(self, numel: int) -> int:
        return HEADER_BYTES + packed_size(numel, self.bits)

    def describe(self, plan: FPPlan | None) -> dict:
        if plan is None:
            return {"format": None}
        return {"format": plan.fmt.name, "scale_exp": plan.scale_exp,
                f"expected_{'nmse' if self.criterion == 'mse' else 'relative_error'}": plan.expected_error}


def decode_fp_into(payload: torch.Tensor, header: Header, numel: int, out: torch.Tensor) -> None:
    """FP: ``8 + ceil(numel bits / 8)`` bytes (shorter: ``ValueError``; trailing bytes ignored)."""
    if header.fmt is None:
        raise ValueError("FP payload without a value format in its header")
    nbytes = packed_size(numel, header.fmt.bits)
    check_payload_size(payload, header, numel, HEADER_BYTES + nbytes)
    decode_fp_values(payload[HEADER_BYTES:HEADER_BYTES + nbytes], header.fmt, header.scale_exp,
                     numel, out)
