"""Sparse codecs: stochastic pruning (fp32 or FP-coded survivors) and top-k.

Three codecs share one way of sending positions (Rice-coded gaps, below):

* :class:`PruneCodec` -- stochastic pruning at a lognormal-fitted threshold, kept values as raw
  float32. Unbiased.
* :class:`PruneFPCodec` -- the same pruning, kept values FP-coded with a format and scale fitted
  to the truncated (``|x| > alpha``) tail. Unbiased with stochastic rounding.
* :class:`TopKCodec` -- the ``ceil(ratio * numel)`` largest (nonzero) magnitudes, values as
  float32. Biased (needs error feedback).

Positions: Rice-coded gaps
--------------------------
The nonzero positions ``i_0 < i_1 < ...`` are sent as the gaps ``g_j = i_j - i_{j-1} - 1``
(``i_{-1} = -1``), each split by a Rice parameter ``k`` into ``q = g >> k`` and the remainder
``g mod 2**k``. The remainders go into a fixed-width field (``k`` bits each); the ``q`` go into
a *unary stream*: ``q`` zero bits then a one, concatenated. ``k = 0`` is exactly the nonzero
bitmap (truncated after the last nonzero). The encoder computes the exact cost ``n (k + 1) + sum(g >>
k)`` of ``k = 0`` and of the few ``k`` around the model's optimum (:func:`rice_parameter`) and
sends the cheapest, so positions never cost more than a bitmap, and clustered sparsity (whole
rows pruned) gets cheaper. For independent elements sent with probability ``p`` the gaps are
geometric and the expected cost (:func:`rice_expected_bits`) is close to the entropy.

Payload layout (after the 8-byte header of :mod:`gradcomp.codecs.base`; little-endian; each
bit field packed with :func:`gradcomp.numerics.packing.pack_unchecked` and padded to a whole byte)::

    PRUNE / PRUNE_FP                           TOPK
    float32  alpha (the float32 threshold)     int32  n        (entries sent)
    int32    n        (nonzero entries)        int32  U        (unary stream bits)
    int32    n_kept   (entries |T(x)| > alpha) uint8  k        (Rice parameter)
    int32    U        (unary stream bits)      n x float32     values, in position order
    uint8    k        (Rice parameter)         n x k bits      Rice remainders
    values   n_kept x (32 bits fp32 | b-bit FP codes), in position order
    n bits        kept flag per nonzero entry (1 = value sent, 0 = +-alpha)
    n-n_kept bits sign of each +-alpha entry (1 = negative), in position order
    n x k bits    Rice remainders
    U bits        unary stream

On CPU the native kernels of :mod:`gradcomp.numerics.kernels` produce the same bytes as the eager tensor
code below (the reference and fallback, ``GRADCOMP_KERNELS=eager``).

The header's format/scale fields describe the FP codes (PRUNE_FP) or are zero. Decoders check the
counts and the payload's length against the layout first: a shorter payload or impossible counts
raise ``ValueError`` (the same message in every kernel mode); trailing bytes are ignored. A
non-finite input sets the header flag and the shard decodes to all-NaN.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy import optimize, special

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
from gradcomp.codecs.dense import (
    FPPlan,
    _check_bits,
    check_payload_size,
    decode_fp_values,
    decodes_past_float32,
    encode_fp_values,
    fp_plan,
    min_scale_exp,
)
from gradcomp.numerics import kernels, lognormal
from gradcomp.numerics.error_model import TIE_ATOL, TIE_RTOL, fp_tables
from gradcomp.numerics.packing import pack_unchecked, packed_size, unpack
from gradcomp.numerics.pruning import stochastic_prune
from gradcomp.numerics.rng import derive_key

# Rice parameters are packed as k-bit remainders, and the packer takes 1..16 bits. A capped k
# only matters below about one nonzero in 2**16 elements, where the unary part then grows by
# gap / 2**16 bits per entry: negligible next to the 32-bit value each entry carries.
MAX_RICE_K = 16
_PRUNE_FIXED = struct.Struct("<fiiiB")  # alpha, n, n_kept, unary bits, k
_TOPK_FIXED = struct.Struct("<iiB")  # n, unary bits, k
PRUNE_FIXED_BYTES = _PRUNE_FIXED.size  # 17
TOPK_FIXED_BYTES = _TOPK_FIXED.size  # 9
_MAX_NUMEL = 2**31 - 1  # counts travel as int32; the counter-based RNG indexes with int32
# Expected padding of one byte-aligned bit field whose length mod 8 is uniform: 7/16 byte.
_PAD_BYTES = 7.0 / 16.0
# Reduce side of the pruning codecs: re-prune the averaged shard at this sparsity (or the phase-1
# sparsity if lower) with values of at least this many bits (the rule and its measurements:
# benchmarks/results/reduce_side_error.md).
REDUCE_SPARSITY = 0.3
REDUCE_BITS = 8
_F32_MAX = float(torch.finfo(torch.float32).max)
_F32_TINY = 2.0**-149


# ---------------------------------------------------------------------------------------------
# Rice-coded positions


def rice_parameter(count: int, numel: int) -> int:
    """Return the Rice parameter ``k`` (0..16) for ``count`` positions among ``numel``.

    Minimizes the expected bits per position for geometric gaps with ``p = count / numel``:
    ``k + 1 + rho / (1 - rho)``, ``rho = (1 - p)**(2**k)`` (``k`` remainder bits, the terminating
    one, and ``E[q] = sum_t rho**t``). Ties go to the smaller ``k``. ``count == 0`` gives 0.

    Example:
        >>> rice_parameter(150_000, 1_000_000), rice_parameter(10_000, 1_000_000)
        (2, 6)
    """
    if count <= 0 or numel <= 0 or count >= numel:
        return 0
    lam = -math.log1p(-count / numel)  # (1 - p)**m = exp(-m * lam)
    best_k, best = 0, math.inf
    for k in range(MAX_RICE_K + 1):
        # rho / (1 - rho) = 1 / expm1(m * lam), stable when rho is close to 1.
        cost = k + 1 + 1.0 / math.expm1(min(700.0, (1 << k) * lam))
        if cost < best:
            best_k, best = k, cost
    return best_k


def rice_expected_bits(numel: int, p: float, k: int | None = None) -> float:
    """Expected bits of the Rice-coded positions (unary stream + remainders), exact in the model.

    Model: each of ``numel`` elements is sent independently with probability ``p``. With
    ``m = 2**k``: ``numel p (k + 1) + p sum_{t=1}^{T} (numel - t m)(1 - p)^(t m)`` bits,
    ``T = floor((numel - 1) / m)`` (the second term is ``E[sum (g >> k)]``), summed in closed
    form. ``k=None`` uses :func:`rice_parameter` at the expected count. Padding is not included.

    Example:
        >>> round(rice_expected_bits(1_000_000, 0.15) / 1_000_000, 4)
        0.6138
    """
    if numel <= 0 or p <= 0.0:
        return 0.0
    p = min(1.0, p)
    if k is None:
        k = rice_parameter(round(numel * p), numel)
    m = 1 << k
    n_expected = numel * p
    t_max = (numel - 1) // m
    if p >= 1.0 or t_max == 0:
        return n_expected * (k + 1)
    log_r = m * math.log1p(-p)
    r = math.exp(log_r)
    one_minus_r = -math.expm1(log_r)
    if one_minus_r > 1e-4:
        r_t = math.exp(t_max * log_r)
        s0 = r * (1.0 - r_t) / one_minus_r
        s1 = r * (1.0 - (t_max + 1) * r_t + t_max * r_t * r) / (one_minus_r * one_minus_r)
        tail = numel * s0 - m * s1
    else:
        # r close to 1 only when k is capped and p < ~1e-5; then t_max = numel / 2**16 is small
        # enough to sum directly (the closed form would cancel).
        t = torch.arange(1, t_max + 1, dtype=torch.float64)
        tail = float(((numel - t * m) * torch.exp(t * log_r)).sum())
    return n_expected * (k + 1) + p * tail


def _rice_encode(idx: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Rice-code sorted positions (int32 or int64): return (packed remainders, packed unary,
    unary bits, k).

    ``k`` is the cheapest, by exact cost on these gaps, of 0 and ``k0 - 2 .. k0 + 2`` (``k0`` the
    model optimum), ties to the smaller. Native kernel on CPU (:mod:`gradcomp.numerics.kernels`, the same
    bytes); the eager path costs one small host sync for the costs, one for the stream length.
    """
    empty = torch.empty(0, dtype=torch.uint8, device=idx.device)
    n = idx.numel()
    if n == 0:
        return empty, empty, 0, 0
    k0 = rice_parameter(n, numel)
    ks = sorted({0} | {k for k in range(k0 - 2, k0 + 3) if 0 <= k <= MAX_RICE_K})
    fast = kernels.rice_encode(idx, ks)
    if fast is not None:
        return fast
    idx = idx.to(torch.int64)
    gaps = torch.diff(idx, prepend=idx.new_full((1,), -1)) - 1
    # One reduction per candidate (at most 6), stacked so the costs come back in one sync.
    costs = torch.stack([(gaps >> c).sum() for c in ks]).tolist()
    k = min(ks, key=lambda c: (costs[ks.index(c)] + n * (c + 1), c))
    ends = torch.cumsum((gaps >> k) + 1, 0) - 1  # the terminating one of each unary code
    unary_bits = int(ends[-1]) + 1
    unary = torch.zeros(unary_bits, dtype=torch.uint8, device=idx.device)
    unary[ends] = 1
    rem = pack_unchecked(gaps & ((1 << k) - 1), k) if k else empty
    return rem, pack_unchecked(unary, 1), unary_bits, k


def _rice_decode(rem: torch.Tensor, unary: torch.Tensor, unary_bits: int, k: int, n: int,
                 numel: int) -> torch.Tensor:
    """Invert :func:`_rice_encode`: return the ``n`` positions (int64), validated ``< numel``.

    The ones of the unary stream sit at ``e_j = sum_{l<=j} (q_l + 1) - 1``, so ``q = diff(e) - 1``
    and ``i = cumsum((q << k | remainder) + 1) - 1``.
    """
    fast = kernels.rice_decode(rem, unary, unary_bits, k, n, numel)
    if fast is not None and fast[1] == 0:
        return fast[0]
    # The eager path (also after a native error status: it raises the detailed message).
    ends = torch.nonzero(unpack(unary, 1, unary_bits)).reshape(-1)
    if ends.numel() != n:
        raise ValueError(f"corrupt sparse payload: unary stream holds {ends.numel()} codes, header says {n}")
    gaps = (torch.diff(ends, prepend=ends.new_full((1,), -1)) - 1) << k
    if k:
        gaps |= unpack(rem, k, n).to(torch.int64)
    idx = torch.cumsum(gaps + 1, 0) - 1
    if n and int(idx[-1]) >= numel:
        raise ValueError(f"corrupt sparse payload: position {int(idx[-1])} beyond numel={numel}")
    return idx


# ---------------------------------------------------------------------------------------------
# shared helpers


def _check_key(key: int, what: str) -> int:
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 2**63:
        raise ValueError(f"{what}: key must be an int in [0, 2**63), got {key!r}")
    return key


def _check_numel(xs: torch.Tensor, what: str) -> None:
    if xs.numel() > _MAX_NUMEL:
        raise ValueError(f"{what}: at most {_MAX_NUMEL} elements per shard (int32 counts), got {xs.numel()}")


def _check_sparsity(sparsity: float, what: str) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
            or not math.isfinite(sparsity) or not 0.0 < sparsity < 1.0:
        raise ValueError(f"{what}: sparsity must be a number in the open interval (0, 1), got {sparsity!r}")
    return float(sparsity)


THRESHOLDS = ("shard", "tensor")


def _check_threshold(threshold: str, what: str) -> str:
    if threshold not in THRESHOLDS:
        raise ValueError(f"{what}: threshold must be one of {THRESHOLDS}, got {threshold!r}")
    return threshold


def _check_count_zeros(count_zeros: bool, what: str) -> bool:
    if not isinstance(count_zeros, bool):
        raise ValueError(f"{what}: count_zeros must be True or False, got {count_zeros!r}")
    return count_zeros


def _float32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _alpha32(alpha: float) -> float:
    """A plan's threshold as the float32 that is used and sent (``inf`` stays: prune all)."""
    try:
        a = float(alpha) if not isinstance(alpha, bool) else math.nan
    except (TypeError, ValueError):
        a = math.nan
    if not a > 0:
        raise ValueError(f"PrunePlan.alpha must be a positive number (inf: prune everything), got {alpha!r}")
    if math.isinf(a):
        return math.inf
    return min(max(_float32(min(a, _F32_MAX)), _F32_TINY), _F32_MAX)


def _bytes_of(values: list[int] | bytes, device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.uint8, device=device)


def _as_float32(seg: torch.Tensor) -> torch.Tensor:
    """View a uint8 segment as float32; copies when the slice is not 4-byte aligned."""
    if seg.storage_offset() % 4:
        seg = seg.clone()
    return seg.view(torch.float32)


class _Reader:
    """Cursor over a payload's byte-aligned fields (raises on a short payload)."""

    def __init__(self, payload: torch.Tensor, offset: int):
        self.payload, self.offset = payload, offset

    def take(self, nbytes: int) -> torch.Tensor:
        end = self.offset + nbytes
        if end > self.payload.numel():
            raise ValueError(f"truncated sparse payload: need {end} bytes, got {self.payload.numel()}")
        seg = self.payload[self.offset:end]
        self.offset = end
        return seg


def _fixed_fields(payload: torch.Tensor, header: Header, numel: int, fmt: struct.Struct) -> tuple:
    check_payload_size(payload, header, numel, HEADER_BYTES + fmt.size)
    seg = payload[HEADER_BYTES:HEADER_BYTES + fmt.size]
    return fmt.unpack(bytes(seg.tolist()))


# ---------------------------------------------------------------------------------------------
# pruning


@dataclass(frozen=True)
class PrunePlan:
    """Pruning threshold and value format for one shard (cacheable between steps).

    ``alpha`` is the threshold used for pruning and sent on the wire as float32 (:meth:`plan`
    returns float32 values; others are rounded to float32 at encode time, so pruning and wire
    always agree); ``alpha = inf`` is the plan of a shard without a usable (nonzero finite)
    entry: everything encodes as zero. ``sparsity``: the target ``alpha`` was solved for
    (informational). ``values``: the format and scale of the kept values; ``None`` means float32.
    """

    alpha: float
    sparsity: float
    values: FPPlan | None = None


def pruned_fraction(fit: lognormal.LognormalFit, alpha: float) -> float:
    """Expected fraction of ``fit``'s usable entries that stochastic pruning at ``alpha`` zeroes:
    ``mean(max(0, 1 - |x| / alpha))`` over the fit's sample where it carries one
    (:class:`~gradcomp.codecs.base.ShardFit`), else the lognormal closed form
    :func:`lognormal.sparsity_for_threshold`."""
    sample = getattr(fit, "sample", ())
    if sample:
        return float(np.maximum(0.0, 1.0 - np.asarray(sample) / alpha).mean())
    return float(lognormal.sparsity_for_threshold(alpha, fit.mu, fit.sigma))


def _solve_alpha(zeros, fits) -> float:
    """The threshold where ``zeros(log_alpha)`` (increasing) crosses 0, in float64, by bisection
    over the fits' range (clamped to ``[2**-100, float32 max]``)."""
    lo = max(min(f.mu - 40.0 * max(f.sigma, 1.0) for f in fits), math.log(_ALPHA_MIN))
    hi = min(max(f.mu + 40.0 * max(f.sigma, 1.0) + f.sigma ** 2 for f in fits), math.log(_F32_MAX))
    if zeros(hi) <= 0:
        return _F32_MAX
    if zeros(lo) >= 0:
        return _ALPHA_MIN
    return math.exp(optimize.brentq(zeros, lo, hi, xtol=1e-9, maxiter=200))


def threshold_plan_alpha(sparsity: float, fit: lognormal.LognormalFit | None) -> float:
    """Return the float32 threshold for ``sparsity`` under ``fit`` (``inf`` without a fit).

    ``alpha = threshold_for_sparsity(sparsity, fit.mu, fit.sigma)`` rounded to float32 (the
    value that is used and sent), clamped into ``[2**-149, float32 max]``; with a fit that carries
    a sample (:class:`~gradcomp.codecs.base.ShardFit`) the ``alpha`` whose
    :func:`pruned_fraction` of the sample is ``sparsity`` instead; ``sparsity <= 0``
    gives ``2**-100``, which prunes nothing above it (no gradient value in practice).
    """
    if fit is None:
        return math.inf
    if sparsity <= 0.0:
        return _ALPHA_MIN
    if getattr(fit, "sample", ()):
        return _alpha32(_solve_alpha(lambda t: pruned_fraction(fit, math.exp(t)) - sparsity, [fit]))
    try:
        alpha = lognormal.threshold_for_sparsity(sparsity, fit.mu, fit.sigma)
    except ValueError:  # beyond float64: far beyond every float32 input as well
        return _F32_MAX
    return _alpha32(alpha)


def usable_sparsity(sparsity: float, fit: lognormal.LognormalFit | None, numel: int | None) -> float:
    """The sparsity to prune the usable (nonzero finite) entries at, for ``sparsity`` of the shard.

    A shard of ``numel`` elements with ``fit.count`` usable ones has a share ``z = 1 - count /
    numel`` of exact zeros, which prune for free. So the usable entries are pruned at ``(sparsity
    - z) / (1 - z)``, and the whole shard reaches ``sparsity`` (not ``z + (1 - z) sparsity``).
    When the zeros alone reach the target (``z >= sparsity``) nothing usable is pruned: ``0.0``.
    ``numel=None`` or no fit: ``sparsity`` unchanged.

    Example:
        >>> fit = lognormal.LognormalFit(mu=0.0, sigma=1.0, count=300)
        >>> round(usable_sparsity(0.85, fit, 1000), 6), usable_sparsity(0.6, fit, 1000)
        (0.5, 0.0)
    """
    if fit is None or numel is None or numel <= 0 or fit.count >= numel:
        return sparsity
    zeros = 1.0 - fit.count / numel
    if zeros >= sparsity:
        return 0.0
    return (sparsity - zeros) / (1.0 - zeros)


# The threshold of "prune nothing" (the zeros alone reach the target): below every gradient
# value in practice, and high enough that the pruning test ``u * alpha <= |x|`` cannot underflow
# to 0 (which would turn exact zeros into +-alpha).
_ALPHA_MIN = 2.0**-100


def pruning_fractions(fit: lognormal.LognormalFit, alpha: float) -> tuple[float, float]:
    """Expected (nonzero fraction ``1 - S(alpha)``, kept fraction ``P(|x| > alpha)``) under ``fit``.

    Per usable (nonzero finite) entry; multiply by ``fit.count / numel`` for a shard with zeros.
    """
    if math.isinf(alpha):
        return 0.0, 0.0
    nonzero = 1.0 - lognormal.sparsity_for_threshold(alpha, fit.mu, fit.sigma)
    z = math.log(alpha) - fit.mu
    if fit.sigma == 0.0:
        kept = 1.0 if z < 0 else 0.0
    else:
        kept = float(special.ndtr(-z / fit.sigma))
    return max(0.0, nonzero), kept


def truncated_log_moments(mu: float, sigma: float, alpha: float) -> tuple[float, float]:
    """Mean and std of ``ln|x|`` given ``|x| > alpha``, for ``ln|x| ~ Normal(mu, sigma)``.

    Truncated-normal moments with ``beta = (ln alpha - mu) / sigma`` and the inverse Mills ratio
    ``lam = phi(beta) / (1 - Phi(beta))``: mean ``mu + sigma lam``, variance
    ``sigma^2 (1 + beta lam - lam^2)`` (clamped at 0 against rounding for large ``beta``).
    ``sigma == 0`` returns ``(mu, 0)``.

    Example:
        >>> m, s = truncated_log_moments(0.0, 1.0, 1.0)
        >>> round(m, 4), round(s, 4)
        (0.7979, 0.6028)
    """
    if sigma == 0.0 or math.isinf(alpha):
        return mu, 0.0
    beta = (math.log(alpha) - mu) / sigma
    lam = math.exp(-0.5 * beta * beta - 0.5 * math.log(2 * math.pi) - float(special.log_ndtr(-beta)))
    var = max(0.0, 1.0 + beta * lam - lam * lam)
    return mu + sigma * lam, sigma * math.sqrt(var)


_TAIL_SIGMAS = 8.0  # the kept tail is integrated up to max(mu, ln alpha) + 8 sigma
_TAIL_SCALE_WINDOW = 8
_LN2 = math.log(2.0)


def _tail_median(lo: float, hi: float, mu: float, sigma: float) -> float:
    """Median of ``ln|x| ~ Normal(mu, sigma)`` truncated to ``[lo, hi]``: the point that halves the
    upper-tail mass, ``Q(t) = (Q(lo) + Q(hi)) / 2`` with ``Q = 1 - Phi`` taken in log space
    (``log_ndtr``/``ndtri_exp``), so a cutoff far in either tail keeps full precision."""
    q_lo = float(special.log_ndtr(-(lo - mu) / sigma))
    q_hi = float(special.log_ndtr(-(hi - mu) / sigma))
    log_q = q_lo + math.log1p(math.exp(q_hi - q_lo)) - math.log(2.0)
    return mu - sigma * float(special.ndtri_exp(log_q))


def tail_fp_plan(bits: int, exp_bits: int | None, rounding: str,
                 fit: lognormal.LognormalFit | None, alpha: float) -> FPPlan:
    """Choose format and scale for the values kept by pruning: the ``|x| > alpha`` tail of ``fit``.

    Criterion: the smallest exact expected relative error ``E[|Q(x) - x| / |x| | |x| > alpha]``
    among the candidate formats (:func:`lognormal.candidate_formats`, or only ``exp_bits``) and
    scales ``k`` that do not saturate the largest entry of the shard -- ``fit.max_abs`` where the
    fit carries it, else the expected maximum ``exp(mu + sigma Phi^-1(1 - 1/(count + 1)))``
    (``k >= min_scale_exp``, :mod:`gradcomp.codecs.dense`) -- searched up to
    8 above the scale that centres the tail's median in the format's range. The error is
    :func:`gradcomp.numerics.error_model.relative_errors` of the real format (subnormals,
    saturation, ``rounding``; closed form, no sampling) over the lognormal truncated to
    ``alpha < |x| <= exp(max(mu, ln alpha) + 8 sigma)`` (the cut above drops less than 1e-15 of
    the mass). Ties (errors within a relative 1e-6 plus 1e-14 of the best, the evaluation
    noise) go to the smaller ``k``, then the smaller ``exp_bits``. The tail keeps its true shape
    (a hard floor at ``alpha``, the original upper tail): a lognormal with its truncated moments
    (:func:`truncated_log_moments`) would choose scales that saturate the largest kept values
    (measured in ``benchmarks/results/codec_error.md``, "Planner design checks").
    :class:`PruneFPCodec` also raises the scale at encode time if the actual maximum needs it.
    ``fit=None``, ``sigma == 0`` (nothing exceeds ``alpha``) or ``alpha = inf``: :func:`fp_plan`.

    Example:
        >>> fit = lognormal.LognormalFit(mu=-7.0, sigma=2.0, count=1_000_000)
        >>> tail_fp_plan(6, None, "stochastic", fit, threshold_plan_alpha(0.85, fit)).fmt.name
        'float6_e4m1fn'
    """
    if fit is None or fit.sigma == 0.0 or math.isinf(alpha):
        return fp_plan(bits, exp_bits, rounding, fit)
    formats = [f for f in lognormal.candidate_formats(bits) if exp_bits is None or f.exp_bits == exp_bits]
    lo = math.log(alpha)
    hi = max(fit.mu, lo) + _TAIL_SIGMAS * fit.sigma
    t_median = _tail_median(lo, hi, fit.mu, fit.sigma)
    max_abs = getattr(fit, "max_abs", None)  # the shard's own maximum, where the fit carries it
    if max_abs is not None and 0.0 < max_abs < math.inf:
        t_top = max(lo, math.log(max_abs))
    else:
        t_top = max(lo, fit.mu + fit.sigma * float(special.ndtri(1.0 - 1.0 / (fit.count + 1))))
    ks_list = []
    for fmt in formats:
        centre = (fmt.min_subnormal_exponent + fmt.max_exponent + 1) / 2.0
        k_centre = math.floor(t_median / _LN2 - centre + 0.5)
        k_min = min_scale_exp(math.exp(min(t_top, 700.0)), fmt)
        k_lo = max(k_min, k_centre - _TAIL_SCALE_WINDOW)
        ks_list.append(np.arange(k_lo, max(k_lo, k_centre + _TAIL_SCALE_WINDOW) + 1))
    tables = fp_tables(formats, ks_list, rounding, fit.mu, fit.sigma, np.array([lo - fit.mu]),
                       log_top=hi - fit.mu, kind="relative")
    cands = [(float(err), int(k), fmt.exp_bits, fmt)
             for fmt, ks, tab in zip(formats, ks_list, tables) for k, err in zip(ks, tab[:, 0])]
    best = min(err for err, *_ in cands)
    err, k, _, fmt = min((c for c in cands if c[0] <= best * (1.0 + TIE_RTOL) + TIE_ATOL),
                         key=lambda c: (c[1], c[2]))
    return FPPlan(fmt, k, err)


def prune_fp_wire_bytes(numel: int, nonzero_fraction: float, kept_fraction: float,
                       value_bits: int) -> float:
    """Return the expected payload size in bytes (header included) of a PRUNE / PRUNE_FP payload.

    For ``numel`` elements of which a fraction ``nonzero_fraction`` (``1 - S``) survives pruning and
    ``kept_fraction`` (``P(|x| > alpha)``) keeps its value at ``value_bits`` bits (32 for
    :class:`PruneCodec`, ``bits`` for :class:`PruneFPCodec`), with the entries independent::

        8 + 17 + [n_kept vb + n + (n - n_kept) + E[Rice bits]] / 8 + padding,

    ``n = numel * nonzero_fraction``, ``n_kept = numel * kept_fraction``, Rice bits from
    :func:`rice_expected_bits` (``k`` chosen at the expected count, as the encoder does), and
    ``7/16`` byte of padding per non-empty bit field (bit lengths mod 8 taken as uniform).

    Example:
        >>> round(8 * prune_fp_wire_bytes(1_000_000, 0.15, 0.05, 6) / 1_000_000, 3)
        1.164
    """
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if not (0.0 <= kept_fraction <= nonzero_fraction <= 1.0):
        raise ValueError("need 0 <= kept_fraction <= nonzero_fraction <= 1, got "
                         f"kept_fraction={kept_fraction!r}, nonzero_fraction={nonzero_fraction!r}")
    if isinstance(value_bits, bool) or not isinstance(value_bits, int) or not 1 <= value_bits <= 32:
        raise ValueError(f"value_bits must be an int in 1..32, got {value_bits!r}")
    n = numel * nonzero_fraction
    n_kept = numel * kept_fraction
    k = rice_parameter(round(n), numel)
    bits = n_kept * value_bits + n + (n - n_kept) + rice_expected_bits(numel, nonzero_fraction, k)
    fields = [n_kept if value_bits % 8 else 0, n, n - n_kept, n * k, n]
    padding = _PAD_BYTES * sum(1 for f in fields if f > 0)
    return HEADER_BYTES + PRUNE_FIXED_BYTES + bits / 8.0 + padding


class _PruneBase(Codec):
    uses_fit = True
    sparsity: float
    count_zeros: bool
    threshold: str
    _with_values: ClassVar[bool]  # plans carry an FPPlan for the kept values (PRUNE_FP)

    @property
    def _value_bits(self) -> int:
        """Bits per kept value on the wire (float32 unless a subclass FP-codes them)."""
        return 32

    def _alpha(self, fit, numel):
        check_plan_numel(numel)
        target = usable_sparsity(self.sparsity, fit, numel) if self.count_zeros else self.sparsity
        return threshold_plan_alpha(target, fit)

    def _plan_at(self, fit, alpha: float) -> PrunePlan:
        raise NotImplementedError

    def plan(self, fit: lognormal.LognormalFit | None, numel: int | None = None) -> PrunePlan:
        return self._plan_at(fit, self._alpha(fit, numel))

    def plan_segments(self, fits, numels) -> list[PrunePlan]:
        """Plans for the segments of one shard: with ``threshold="shard"`` one threshold for all.

        ``"shard"``: ``alpha`` is solved so that the segments' fits, taken as a mixture of
        lognormals weighted by their usable counts (plus the exact zeros with ``count_zeros``),
        reach ``sparsity`` over the whole shard; each segment's kept values still get a value
        plan from its own fit. One threshold is the allocation of a given expected number of
        survivors that minimises the shard's total variance (an entry survives with probability
        ``min(1, |x| / alpha)``), so small-scale tensors are pruned harder than large ones.
        ``"tensor"``: every segment pruned at ``sparsity`` alone (equal relative treatment:
        per-tensor error bounded, total error larger).
        """
        live = [(f, n) for f, n in zip(fits, numels) if f is not None and n > 0]
        if self.threshold == "tensor" or len(fits) <= 1 or not live:
            return [self.plan(f, n) for f, n in zip(fits, numels)]
        total, usable = sum(numels), sum(min(f.count, n) for f, n in live)
        want = self.sparsity * total - (total - usable) if self.count_zeros else self.sparsity * usable
        if want <= 0:
            alpha = _ALPHA_MIN
        else:
            def zeros(log_alpha: float) -> float:
                a = math.exp(log_alpha)
                return sum(min(f.count, n) * pruned_fraction(f, a) for f, n in live) - want
            alpha = _solve_alpha(zeros, [f for f, _ in live])
        alpha = _alpha32(alpha)
        return [self._plan_at(f, alpha if f is not None else math.inf) for f in fits]

    def layout_decoder(self, tag: CodecTag) -> Decoder | None:
        return decode_prune_into if tag == self.tag else None

    def wire_bytes(self, numel: int) -> None:
        """``None``: the size depends on the data (see :meth:`expected_wire_bytes`)."""
        return None

    def expected_wire_bytes(self, numel: int, fit: lognormal.LognormalFit | None = None) -> float:
        """Expected payload bytes for ``numel`` elements whose usable entries follow ``fit``.

        :func:`prune_fp_wire_bytes` at the fractions of :func:`pruning_fractions` for the plan's
        threshold (:meth:`plan` with this ``numel``), scaled by ``min(1, fit.count / numel)``
        (exact zeros are always pruned). ``fit=None``: all zeros.
        """
        if fit is None or numel == 0:
            return float(HEADER_BYTES + PRUNE_FIXED_BYTES)
        nonzero, kept = pruning_fractions(fit, self._alpha(fit, numel))
        usable = min(1.0, fit.count / numel)
        return prune_fp_wire_bytes(numel, nonzero * usable, kept * usable, self._value_bits)

    def _check_plan(self, plan) -> PrunePlan:
        want_values = self._with_values
        if not isinstance(plan, PrunePlan) or (plan.values is None) == want_values:
            kind = "values=FPPlan" if want_values else "values=None"
            raise ValueError(f"{type(self).__name__}.encode: plan must be a PrunePlan with {kind} "
                             f"(from {type(self).__name__}.plan), got {plan!r}")
        return plan

    def _encode(self, x: torch.Tensor, key: int, plan: PrunePlan | None) -> torch.Tensor:
        what = f"{type(self).__name__}.encode"
        xs = check_shard(x, what)
        _check_numel(xs, what)
        _check_key(key, what)
        plan = self.plan(fit_or_none(xs), xs.numel()) if plan is None else self._check_plan(plan)
        fplan = plan.values
        alpha = _alpha32(plan.alpha)
        empty = math.isinf(alpha) or xs.numel() == 0
        fast = None if empty else kernels.prune_select(xs, alpha, derive_key(key, 1))
        if fast is not None:
            # The native kernel prunes and compacts in one pass (the same bits as below).
            idx, kept_vals, flags, signs, top, nonfinite = fast
            n, n_kept = idx.numel(), kept_vals.numel()
        else:
            if empty:
                idx = torch.empty(0, dtype=torch.int64, device=xs.device)
                vals = xs.new_empty(0)
            else:
                pruned = stochastic_prune(xs, alpha, key=derive_key(key, 1))
                idx = torch.nonzero(pruned).reshape(-1)  # NaN counts as nonzero (and stays kept)
                vals = pruned[idx]
            at_alpha = vals.abs() == alpha
            kept_vals = vals[~at_alpha]
            n, n_kept = idx.numel(), kept_vals.numel()
            flags = pack_unchecked((~at_alpha).to(torch.uint8), 1)
            signs = pack_unchecked(torch.signbit(vals[at_alpha]).to(torch.uint8), 1)
            nonfinite = None  # make_header computes it
            top = float(kept_vals.abs().amax()) if n_kept and fplan is not None else 0.0
        if fplan is None:
            header = make_header(self.tag, xs, nonfinite=nonfinite)
            value_bytes = kept_vals.contiguous().view(torch.uint8)
        else:
            # Saturation would bias stochastic rounding: raise the scale (never lower it) until
            # this shard's largest kept value fits. Inf/NaN are always kept, and then ``top`` is
            # not finite (eager) or ``nonfinite`` is set (native): the payload is flagged anyway.
            if n_kept and not nonfinite and math.isfinite(top) \
                    and min_scale_exp(top, fplan.fmt) > fplan.scale_exp:
                fplan = FPPlan(fplan.fmt, min_scale_exp(top, fplan.fmt), fplan.expected_error)
            value_bytes = encode_fp_values(kept_vals, fplan, self.stochastic, derive_key(key, 2))
            # A kept value that would decode beyond float32's range flags the shard (as inf would).
            if not nonfinite and decodes_past_float32(value_bytes, fplan.fmt, fplan.scale_exp, n_kept):
                nonfinite = True
            header = make_header(self.tag, xs, fplan.fmt, fplan.scale_exp, nonfinite=nonfinite)
        rem, unary, unary_bits, k = _rice_encode(idx, xs.numel())
        fixed = _bytes_of(_PRUNE_FIXED.pack(alpha, n, n_kept, unary_bits, k), xs.device)
        return torch.cat([header, fixed, value_bytes, flags, signs, rem, unary])

    def describe(self, plan: PrunePlan | None) -> dict:
        if plan is None:
            return {"format": None, "sparsity": self.sparsity, "alpha": None}
        out = {"format": plan.values.fmt.name if plan.values else "float32",
               "sparsity": plan.sparsity, "alpha": plan.alpha}
        if plan.values:
            out.update(scale_exp=plan.values.scale_exp,
                       expected_relative_error=plan.values.expected_error)
        return out


class PruneCodec(_PruneBase):
    """Stochastically prune at a lognormal-fitted threshold; send survivors' values as float32.

    Numerics: ``alpha = threshold_for_sparsity(sparsity, mu, sigma)`` of the shard's fit (the seed
    paper's closed form for the expected sparsity, inverted), rounded to float32 once and used
    for both pruning and the wire. Entries with ``|x| > alpha`` are sent exactly; the others
    become ``sign(x) alpha`` with probability ``|x| / alpha`` (uniforms from ``derive_key(key,
    1)``), else 0. Unbiased: ``E[decode] = x``. The achieved sparsity matches the target to the
    extent ``|x|`` is lognormal. A shard without a nonzero finite entry (``fit=None``) encodes as
    all zeros (``alpha = inf`` on the wire). Exact zeros are pruned for free; with
    ``count_zeros=True`` (default) they count toward ``sparsity``, so the usable entries are
    pruned at :func:`usable_sparsity` and the shard as a whole reaches ``sparsity`` (this needs
    ``numel`` in :meth:`plan`); ``False`` prunes the usable entries at ``sparsity``.

    Wire: the PRUNE layout (module docstring) with 32-bit values; the size depends on the data
    (:meth:`wire_bytes` is ``None``), its expectation is :meth:`expected_wire_bytes`.

    Reduce side (two-phase all-reduce): :meth:`reduce_codec` is ``PruneFPCodec(min(sparsity,
    0.3), 8, count_zeros=False)`` (the same ``threshold``), by the rule stated in :class:`PruneFPCodec`.

    Example:
        >>> codec = PruneCodec(0.85)
        >>> x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)).mul(2).exp()
        >>> plan = codec.plan(lognormal.fit(x))
        >>> y = codec.decode(codec.encode(x, key=3, plan=plan), 10_000)
        >>> bool(((y == 0) | (y == x) | (y == plan.alpha)).all())  # x > 0 here
        True
    """

    tag = CodecTag.PRUNE
    stochastic = True
    _with_values = False

    def __init__(self, sparsity: float = 0.85, count_zeros: bool = True, threshold: str = "shard"):
        self.sparsity = _check_sparsity(sparsity, "PruneCodec")
        self.count_zeros = _check_count_zeros(count_zeros, "PruneCodec")
        self.threshold = _check_threshold(threshold, "PruneCodec")

    def plan(self, fit: lognormal.LognormalFit | None, numel: int | None = None) -> PrunePlan:
        """Return the float32 threshold for this shard's fit (``alpha = inf`` without one).

        The threshold prunes the usable entries at :func:`usable_sparsity`, so that with the
        shard's exact zeros (``numel``) the whole shard reaches ``sparsity``.
        """
        return self._plan_at(fit, self._alpha(fit, numel))

    def _plan_at(self, fit, alpha: float) -> PrunePlan:
        return PrunePlan(alpha, self.sparsity, None)

    def encode(self, x: torch.Tensor, *, key: int = 0, plan: PrunePlan | None = None) -> torch.Tensor:
        """Prune ``x`` (flattened) and return the PRUNE payload; ``plan=None`` fits ``x``."""
        return self._encode(x, key, plan)

    def reduce_codec(self) -> Codec:
        """``PruneFPCodec(min(sparsity, 0.3), 8)``: re-prune the mean lightly, 8-bit values."""
        return PruneFPCodec(min(self.sparsity, REDUCE_SPARSITY), REDUCE_BITS, count_zeros=False,
                            threshold=self.threshold)


class PruneFPCodec(_PruneBase):
    """Stochastically prune, then FP-code the survivors with a tail-fitted format and scale.

    Numerics: pruning exactly as :class:`PruneCodec` (uniforms from ``derive_key(key, 1)``).
    The kept values (``|x| > alpha``) are rounded onto a ``bits``-bit float (sign inside the
    code) with ``rounding`` (stochastic: uniforms from ``derive_key(key, 2)``) after the exact
    power-of-two scaling ``2**-k``. Format and ``k`` come from :func:`tail_fp_plan`: the least
    exact expected relative error over the truncated lognormal ``|x| > alpha`` of the fit,
    among scales that do not saturate the shard's largest entry (``fit.max_abs``, else the
    ``1 - 1/(count + 1)`` quantile). Encode raises ``k`` (never lowers it; the header carries
    the ``k`` used) whenever this shard's largest kept value would still saturate.

    With stochastic rounding the codec is unbiased: pruning is unbiased, stochastic rounding is
    exactly unbiased conditionally on the pruning, and nothing saturates. A kept value may
    round below ``alpha`` (or to 0 under the smallest subnormal): still unbiased, merely not
    monotone. ``rounding="nearest"`` is biased (``stochastic`` is then ``False``).

    Wire: the PRUNE_FP layout (module docstring), ``bits``-bit value codes; the size depends on
    the data, its expectation is :meth:`expected_wire_bytes` / :func:`prune_fp_wire_bytes`.

    Reduce side (two-phase all-reduce): :meth:`reduce_codec` is ``PruneFPCodec(min(sparsity,
    0.3), max(bits, 8), count_zeros=False)`` (``exp_bits`` kept only if the width is; the same
    ``threshold``). The mean
    of N pruned shards is denser than one of them and not lognormal (spikes at multiples of
    ``alpha/N``); its zeros are phase 1's pruning, so the sparsity applies to its nonzeros and
    the payload grows with the mean's density (``reduce_codec()`` cannot see N). Rule: the
    cheapest phase-2 codec whose added NMSE stays below the phase-1 NMSE at every N and that
    adds no bias; the candidates and their measurements are in
    ``benchmarks/results/reduce_side_error.md``.

    Example:
        >>> codec = PruneFPCodec(0.85, bits=6)
        >>> x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)).mul(2).exp()
        >>> payload = codec.encode(x, key=7)
        >>> 8 * payload.numel() / 100_000 < 1.3
        True
    """

    tag = CodecTag.PRUNE_FP
    _with_values = True

    def __init__(self, sparsity: float = 0.85, bits: int = 6, exp_bits: int | None = None,
                 rounding: str = "stochastic", count_zeros: bool = True, threshold: str = "shard"):
        self.sparsity = _check_sparsity(sparsity, "PruneFPCodec")
        self.count_zeros = _check_count_zeros(count_zeros, "PruneFPCodec")
        self.threshold = _check_threshold(threshold, "PruneFPCodec")
        _check_bits(bits, exp_bits, rounding, "PruneFPCodec")
        self.bits = bits
        self.exp_bits = exp_bits
        self.rounding = rounding
        self.stochastic = rounding == "stochastic"

    @property
    def _value_bits(self) -> int:
        return self.bits

    def plan(self, fit: lognormal.LognormalFit | None, numel: int | None = None) -> PrunePlan:
        """Return the float32 threshold (as :meth:`PruneCodec.plan`) and the FP plan of the kept tail."""
        return self._plan_at(fit, self._alpha(fit, numel))

    def _plan_at(self, fit, alpha: float) -> PrunePlan:
        return PrunePlan(alpha, self.sparsity, tail_fp_plan(self.bits, self.exp_bits, self.rounding, fit, alpha))

    def encode(self, x: torch.Tensor, *, key: int = 0, plan: PrunePlan | None = None) -> torch.Tensor:
        """Prune ``x`` (flattened), FP-code the kept values, return the PRUNE_FP payload."""
        return self._encode(x, key, plan)

    def reduce_codec(self) -> Codec:
        """``PruneFPCodec(min(sparsity, 0.3), max(bits, 8))``: re-prune the mean lightly."""
        bits = max(self.bits, REDUCE_BITS)
        return PruneFPCodec(min(self.sparsity, REDUCE_SPARSITY), bits,
                            self.exp_bits if bits == self.bits else None, self.rounding, count_zeros=False,
                            threshold=self.threshold)


def _check_counts(n: int, unary_bits: int, k: int, numel: int, extra: str = "") -> None:
    """Counts a Rice stream can have: ``0 <= n <= numel``, ``n <= U <= numel`` (``U = n + sum(gap
    >> k)`` and the gaps sum to at most ``numel - n``), ``U = 0`` when ``n = 0``, ``k`` in 0..16."""
    if not (0 <= n <= unary_bits <= numel and 0 <= k <= MAX_RICE_K and (n > 0 or unary_bits == 0)):
        raise ValueError(f"corrupt sparse payload: n={n}{extra}, k={k}, unary bits {unary_bits} "
                         f"for numel={numel}")


def _prune_fields(payload: torch.Tensor, header: Header, numel: int, with_values: bool = True):
    """Parse a PRUNE / PRUNE_FP payload: ``(alpha, n, n_kept, unary bits, k, values, flag bytes,
    sign bytes, remainder bytes, unary bytes)``; ``values`` decoded to float32 (``None`` when
    ``n == 0``: the streams are then empty; also ``None`` with ``with_values=False``, which only
    validates).

    Validation (the same in every kernel mode, before any kernel runs): the counts
    (:func:`_check_counts`, ``n_kept <= n``), ``alpha`` (positive; ``inf`` only with ``n = 0``),
    the header's value format (PRUNE_FP), and the
    length: ``8 + 17 + values + ceil(n/8) + ceil((n - n_kept)/8) + ceil(n k/8) + ceil(U/8)``
    bytes; a shorter payload raises ``ValueError``, trailing bytes are ignored.
    """
    alpha, n, n_kept, unary_bits, k = _fixed_fields(payload, header, numel, _PRUNE_FIXED)
    if not 0 <= n_kept <= n:
        raise ValueError(f"corrupt sparse payload: n={n}, n_kept={n_kept} for numel={numel}")
    if not (alpha > 0 and (n == 0 or math.isfinite(alpha))):  # NaN fails too; inf: n = 0 only
        raise ValueError(f"corrupt sparse payload: threshold alpha={alpha!r} with n={n}")
    _check_counts(n, unary_bits, k, numel, f", n_kept={n_kept}")
    value_fmt = None  # the kept values' format: PRUNE_FP only
    if header.tag == CodecTag.PRUNE_FP:
        if header.fmt is None:
            raise ValueError("PRUNE_FP payload without a value format in its header")
        value_fmt = header.fmt
        value_bytes = packed_size(n_kept, value_fmt.bits)
    else:
        value_bytes = 4 * n_kept
    need = (HEADER_BYTES + PRUNE_FIXED_BYTES + value_bytes + packed_size(n, 1) + packed_size(n - n_kept, 1)
            + (packed_size(n, k) if k else 0) + packed_size(unary_bits, 1))
    check_payload_size(payload, header, numel, need)
    if n == 0 or not with_values:
        return alpha, n, n_kept, unary_bits, k, None, None, None, None, None
    rd = _Reader(payload, HEADER_BYTES + PRUNE_FIXED_BYTES)
    if value_fmt is not None:
        values = torch.empty(n_kept, dtype=torch.float32, device=payload.device)
        decode_fp_values(rd.take(packed_size(n_kept, value_fmt.bits)), value_fmt,
                         header.scale_exp, n_kept, values)
    else:
        values = _as_float32(rd.take(4 * n_kept))
    flag_bytes = rd.take(packed_size(n, 1))
    sign_bytes = rd.take(packed_size(n - n_kept, 1))
    rem = rd.take(packed_size(n, k) if k else 0)
    unary = rd.take(packed_size(unary_bits, 1))
    return alpha, n, n_kept, unary_bits, k, values, flag_bytes, sign_bytes, rem, unary


def decode_prune_into(payload: torch.Tensor, header: Header, numel: int, out: torch.Tensor) -> None:
    """PRUNE / PRUNE_FP: validated by :func:`_prune_fields` (also when flagged non-finite);
    malformed payloads raise ``ValueError``, trailing bytes are ignored."""
    alpha, n, n_kept, unary_bits, k, values, flag_bytes, sign_bytes, rem, unary = \
        _prune_fields(payload, header, numel, with_values=not header.nonfinite)
    if header.nonfinite:
        return  # decode_payload fills the shard with NaN
    if n == 0:
        out.zero_()
        return
    status = kernels.prune_scatter(values, flag_bytes, sign_bytes, rem, unary, unary_bits, k, n,
                                   alpha, out)
    if status == 0:
        return
    # The eager path (also after a native error status: it raises the detailed message).
    flags = unpack(flag_bytes, 1, n).bool()
    signs = unpack(sign_bytes, 1, n - n_kept)
    idx = _rice_decode(rem, unary, unary_bits, k, n, numel)
    kept_idx = idx[flags]
    if kept_idx.numel() != n_kept:
        raise ValueError(f"corrupt sparse payload: {kept_idx.numel()} kept flags, header says {n_kept}")
    out.zero_()
    # +-alpha entries: 1 - 2*sign is +1 / -1, exact in float32.
    out[idx[~flags]] = (1.0 - 2.0 * signs.to(torch.float32)) * alpha
    out[kept_idx] = values


def sum_prune_payloads(payloads: list[torch.Tensor], headers: list[Header], numel: int,
                       out: torch.Tensor) -> bool:
    """Write ``decode(p_0) + decode(p_1) + ...`` (float32, left to right) into ``out`` natively.

    The first payload is scattered into a zeroed ``out``, the others are added at their
    nonzero positions only. That equals the eager dense sum bit for bit because adding the
    ``+0.0`` of a pruned entry changes nothing but a ``-0.0``, and no ``-0.0`` can arise when no
    decoded value is ``-0.0`` (``+-alpha`` never is; a kept FP value that rounds to zero may be:
    then this returns ``False``). ``False`` also when the kernels do not apply, a payload is
    flagged non-finite or is not PRUNE / PRUNE_FP, or a stream is corrupt (the caller's eager
    decode then raises the detailed error); ``out`` is then to be overwritten by the caller.
    """
    if not payloads or any(h.tag not in (CodecTag.PRUNE, CodecTag.PRUNE_FP) or h.nonfinite
                           for h in headers):
        return False
    for j, (payload, header) in enumerate(zip(payloads, headers)):
        alpha, n, n_kept, unary_bits, k, values, flag_bytes, sign_bytes, rem, unary = \
            _prune_fields(payload, header, numel)
        if n == 0:
            if j == 0:
                out.zero_()
            continue
        if n_kept and bool(((values == 0) & torch.signbit(values)).any()):
            return False
        status = kernels.prune_scatter(values, flag_bytes, sign_bytes, rem, unary, unary_bits, k,
                                       n, alpha, out, accumulate=j > 0)
        if status != 0:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# top-k


class TopKCodec(Codec):
    """Send the ``ceil(ratio * numel)`` largest magnitudes as float32 with Rice-coded positions.

    Numerics: ``n = min(numel, max(1, ceil(ratio * numel)))`` entries (0 for an empty shard;
    ``ratio * numel`` is taken with a relative tolerance of 1e-12 so that decimal ratios behave
    as written), chosen by ``torch.topk`` of ``|x|`` (ties broken by torch, deterministically on
    one device), sent exactly; all others decode to 0. Biased (it drops the small entries
    systematically): use it with error feedback, which the hook state provides
    (``worker_feedback``) -- without it, the dropped mass is lost. No fit, no randomness.

    Wire: the TOPK layout (module docstring): header, ``n``, the unary length and the Rice
    parameter (9 bytes), ``n`` float32 values in position order, then the Rice-coded positions,
    about ``log2(1/ratio) + 1.5`` bits per entry.

    Reduce side: :meth:`reduce_codec` is ``TopKCodec(1.0)``, which sends every nonzero of the
    averaged shard exactly (zeros are never sent): lossless, at about ``(32 + Rice) / 8`` bytes
    per nonzero of the mean (at most ``N * ratio`` of the shard). A second ``TopKCodec(ratio)``
    is cheaper but biased, and what the reducing rank drops escapes the workers' error feedback
    (their residual is ``x - decode(own payload)``); with reduce-side error feedback enabled,
    passing ``reduce_codec=TopKCodec(ratio)`` to the hook is the cheaper valid choice
    (measurements: ``benchmarks/results/reduce_side_error.md``).

    Example:
        >>> codec = TopKCodec(0.25)
        >>> x = torch.tensor([0.1, -4.0, 0.2, 3.0, 0.0, -0.3, 0.05, 1.0])
        >>> codec.decode(codec.encode(x), 8).tolist()
        [0.0, -4.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    """

    tag = CodecTag.TOPK

    def __init__(self, ratio: float = 0.01):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
                or not 0.0 < ratio <= 1.0:
            raise ValueError(f"TopKCodec: ratio must be a number in (0, 1], got {ratio!r}")
        self.ratio = float(ratio)

    def count(self, numel: int) -> int:
        """Entries sent for a shard of ``numel`` elements (fewer if it has fewer nonzeros)."""
        if numel <= 0:
            return 0
        return min(numel, max(1, math.ceil(self.ratio * numel * (1.0 - 1e-12))))

    def plan(self, fit: lognormal.LognormalFit | None, numel: int | None = None) -> None:
        """``None``: top-k needs no fit (``uses_fit`` is ``False``, so callers need not fit)."""
        check_plan_numel(numel)
        return None

    def encode(self, x: torch.Tensor, *, key: int = 0, plan=None) -> torch.Tensor:
        """Return the TOPK payload of ``x`` (flattened); ``key`` and ``plan`` are unused."""
        xs = check_shard(x, "TopKCodec.encode")
        _check_numel(xs, "TopKCodec.encode")
        header = make_header(self.tag, xs)
        nnz = int(torch.count_nonzero(xs))  # NaN counts as nonzero (and is flagged anyway)
        n = min(self.count(xs.numel()), nnz)
        if n == nnz:  # every nonzero goes: no selection needed, and zeros are never sent
            idx = torch.nonzero(xs).reshape(-1)
        else:  # n < nnz, so the n largest magnitudes are all nonzero
            idx = torch.topk(xs.abs(), n, sorted=False).indices.sort().values
        rem, unary, unary_bits, k = _rice_encode(idx, xs.numel())
        fixed = _bytes_of(_TOPK_FIXED.pack(n, unary_bits, k), xs.device)
        return torch.cat([header, fixed, xs[idx].view(torch.uint8), rem, unary])

    def layout_decoder(self, tag: CodecTag) -> Decoder | None:
        return decode_topk_into if tag == CodecTag.TOPK else None

    def wire_bytes(self, numel: int) -> None:
        """``None``: the position code depends on the data (see :meth:`expected_wire_bytes`)."""
        return None

    def expected_wire_bytes(self, numel: int, fit: lognormal.LognormalFit | None = None) -> float:
        """Expected payload bytes, positions modelled as independent with ``p = n / numel``.

        ``8 + 9 + 4 n + E[Rice bits] / 8`` plus ``7/16`` byte of padding per non-empty bit field.
        ``fit`` is unused (accepted for a uniform interface).
        """
        n = self.count(numel)
        if n == 0:
            return float(HEADER_BYTES + TOPK_FIXED_BYTES)
        k = rice_parameter(n, numel)
        bits = rice_expected_bits(numel, n / numel, k)
        return HEADER_BYTES + TOPK_FIXED_BYTES + 4 * n + bits / 8 + _PAD_BYTES * (1 + (k > 0))

    def describe(self, plan=None) -> dict:
        return {"format": "float32", "ratio": self.ratio}

    def reduce_codec(self) -> Codec:
        """``TopKCodec(1.0)``: every nonzero of the mean, exactly (lossless)."""
        return TopKCodec(1.0)


def decode_topk_into(payload: torch.Tensor, header: Header, numel: int, out: torch.Tensor) -> None:
    """TOPK: ``8 + 9 + 4 n + ceil(n k/8) + ceil(U/8)`` bytes with valid counts (checked also when
    flagged non-finite); malformed payloads raise ``ValueError``, trailing bytes are ignored."""
    n, unary_bits, k = _fixed_fields(payload, header, numel, _TOPK_FIXED)
    _check_counts(n, unary_bits, k, numel)
    check_payload_size(payload, header, numel, HEADER_BYTES + TOPK_FIXED_BYTES + 4 * n
                       + (packed_size(n, k) if k else 0) + packed_size(unary_bits, 1))
    if header.nonfinite:
        return
    out.zero_()
    if n == 0:
        return
    rd = _Reader(payload, HEADER_BYTES + TOPK_FIXED_BYTES)
    values = _as_float32(rd.take(4 * n))
    rem = rd.take(packed_size(n, k) if k else 0)
    idx = _rice_decode(rem, rd.take(packed_size(unary_bits, 1)), unary_bits, k, n, numel)
    out[idx] = values
