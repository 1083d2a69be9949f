"""Budget codec: the pruning sparsity and FP format that minimize the error for a bit budget.

:class:`BudgetCodec` takes a wire budget in bits per element (headers included, amortized over
the shard) and, per shard, chooses from the lognormal fit of ``|x|`` the layout (dense FP,
pruning with FP-coded or float32 kept values), the threshold ``alpha`` (sparsity ``S``), the
value width ``b``, its exponent/mantissa split and its power-of-two scale ``k`` that minimize
the expected NMSE of :mod:`gradcomp.numerics.error_model` within the budget. The payloads are the
ordinary FP / PRUNE_FP / PRUNE / IDENTITY payloads.

Wire model: dense FP costs ``8 * (8 + ceil(n b / 8)) / n`` bits per element; PRUNE_FP / PRUNE
cost :func:`gradcomp.codecs.sparse.prune_fp_wire_bytes` at the expected nonzero fraction
``1 - S(alpha)`` and kept fraction ``P(|x| > alpha)`` (the seed paper's closed forms). ``n`` is
``numel`` when :meth:`BudgetCodec.plan` is given it, else the fit's ``count`` (never more:
conservative). The budget holds in expectation under the fit; the binomial scatter of the
counts (``O(b / sqrt(n))`` bits per element) and any departure from a lognormal come on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch
from scipy import special

from gradcomp.codecs.base import HEADER_BYTES, Codec, CodecTag, Decoder, check_shard, fit_or_none
from gradcomp.codecs.dense import FPCodec, FPPlan, IdentityCodec, decode_fp_into, decode_identity_into, min_scale_exp
from gradcomp.codecs.sparse import (
    PRUNE_FIXED_BYTES,
    PruneCodec,
    PruneFPCodec,
    PrunePlan,
    decode_prune_into,
    prune_fp_wire_bytes,
    pruned_fraction,
)
from gradcomp.numerics import lognormal
from gradcomp.numerics.error_model import MIN_SIGMA, fp_tables, log_top_of, pruning_nmse_z
from gradcomp.numerics.formats import FPFormat

__all__ = ["BudgetCodec", "BudgetPlan", "MIN_BUDGET_BITS"]

_ROUNDING = lognormal.ROUNDING_MODES
_LN2 = math.log(2.0)

DENSE_BITS = tuple(range(2, 17))
VALUE_BITS = DENSE_BITS + (32,)  # 32 = PRUNE (float32 values)
# Formats of more than 8 bits: only splits with 5+ mantissa bits (the per-binade error model is
# then accurate to about 1%) and 2..6 exponent bits.
_WIDE_MIN_MAN, _WIDE_MIN_EXP, _WIDE_MAX_EXP = 5, 2, 6


@cache
def _formats(bits: int) -> tuple[FPFormat, ...]:
    """Candidate formats of a width: every split up to 8 bits, the restricted splits above."""
    fmts = lognormal.candidate_formats(bits)
    if bits > 8:
        fmts = [f for f in fmts
                if f.man_bits >= _WIDE_MIN_MAN and _WIDE_MIN_EXP <= f.exp_bits <= _WIDE_MAX_EXP]
    return tuple(fmts)


_GRID_POINTS = 20  # cutoffs z, uniform from sparsity 1e-3 to 1 - 1e-6 (optima sit at the budget boundary)
_GRID_SPARSITY = (1e-3, 1.0 - 1e-6)
_BISECT_STEPS = 24  # at most this many regula falsi steps per width's budget boundary
_K_EXTRA = 2  # scales searched: the smallest that does not saturate, and this many above it
_F32_MAX_LOG = math.log(float(np.finfo(np.float32).max))
_F32_MIN_NORMAL_LOG = -126 * _LN2
_MAX_SCALE = 2**14  # |k| limit of the quantizer (the header carries int16)


def _fractions(z, s: float):
    """(nonzero fraction ``1 - S``, kept fraction ``P(u > e^z)``) per usable entry, vectorized.

    ``1 - S(z) = Phi(-z/s) + exp(s^2/2 - z + log Phi(z/s - s))`` (the complement of
    :func:`gradcomp.numerics.lognormal.sparsity_for_threshold`, taken analytically so that high sparsities
    keep their relative precision).
    """
    z = np.asarray(z, dtype=np.float64)
    kept = special.ndtr(-z / s)
    with np.errstate(over="ignore", under="ignore"):
        nz = kept + np.exp(s * s / 2 - z + special.log_ndtr(z / s - s))
    return np.clip(nz, 0.0, 1.0), np.minimum(kept, nz)


def _prune_bits(n: int, nonzero: float, kept: float, value_bits: int) -> float:
    """Expected bits per element of the PRUNE / PRUNE_FP payload (:func:`prune_fp_wire_bytes`)."""
    nonzero = min(max(float(nonzero), 0.0), 1.0)
    return 8.0 * prune_fp_wire_bytes(n, nonzero, min(max(float(kept), 0.0), nonzero), value_bits) / n


def _dense_bits(n: int, bits: int) -> float:
    """Bits per element of the FP payload: ``8 (8 + ceil(n b / 8)) / n``."""
    return 8.0 * (HEADER_BYTES + (n * bits + 7) // 8) / n


@lru_cache(maxsize=1024)
def _grid_ends(s: float, top: float) -> tuple[float, float]:
    return (math.log(lognormal.threshold_for_sparsity(_GRID_SPARSITY[0], 0.0, s)),
            math.log(lognormal.threshold_for_sparsity(top, 0.0, s)))


def _cutoff_grid(mu: float, s: float, count: int) -> np.ndarray:
    """Candidate cutoffs ``z = ln(alpha) - mu``: uniform between sparsity 1e-3 and 1 - 1e-6.

    The top stays below ``1 - 2 / count`` (at least two nonzero entries expected: sparser is
    meaningless for the shard, and the wire model's position term is slow to evaluate there).
    Only candidates: the ends are computed for ``s`` rounded to 4 digits and cached. Clipped so
    that ``alpha = e^(mu + z)`` is a normal float32 (it travels as one). Cutoffs above the
    shard's largest value stay: every entry then survives with probability ``|x| / alpha``,
    the cheapest plans for tiny budgets, and the truncated model prices them correctly.
    """
    top = min(_GRID_SPARSITY[1], max(0.5, 1.0 - 2.0 / max(count, 1)))
    lo, hi = _grid_ends(float(f"{s:.4g}"), float(f"{top:.6g}"))
    grid = np.linspace(lo, hi, _GRID_POINTS)
    return np.unique(np.clip(grid, _F32_MIN_NORMAL_LOG - mu, _F32_MAX_LOG - mu - 1.0))


def _boundaries(grid, n: int, usable: float, s: float, budget: float) -> dict:
    """Per value width: the smallest cutoff ``z`` whose expected wire fits ``budget``.

    The wire decreases with ``z`` (fewer nonzeros and kept values): find the bracketing grid
    cell by bisection, then refine inside it (:func:`_refine_boundary`). Widths where even the
    largest grid cutoff does not fit are left out; where every grid point fits, ``grid[0]``.
    """
    nz, kept = _fractions(grid, s)
    nz, kept = nz * usable, kept * usable

    def fits(vb: int, i: int) -> bool:
        return _prune_bits(n, nz[i], kept[i], vb) <= budget

    out, open_ = {}, {}
    for vb in VALUE_BITS:
        if not fits(vb, grid.size - 1):
            continue
        if fits(vb, 0):
            out[vb] = float(grid[0])
            continue
        lo, hi = 0, grid.size - 1  # grid[lo] does not fit, grid[hi] fits
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(vb, mid) else (mid, hi)
        open_[vb] = [float(grid[lo]), float(grid[hi])]
    for vb, (zl, zh) in open_.items():
        out[vb] = _refine_boundary(zl, zh, n, usable, s, vb, budget)
    return out


def _refine_boundary(zl: float, zh: float, n: int, usable: float, s: float, vb: int, budget: float) -> float:
    """Smallest feasible cutoff in ``(zl, zh]`` (``zl`` over budget, ``zh`` within): Illinois
    regula falsi on the wire excess, stopped once within ``1e-4`` bit per element of the budget
    (the returned point is always on the feasible side)."""
    def excess(z: float) -> float:
        a, b = _fractions(z, s)
        return _prune_bits(n, float(a) * usable, float(b) * usable, vb) - budget

    gl, gh = excess(zl), excess(zh)
    tol = 1e-4
    side = 0
    for _ in range(_BISECT_STEPS):
        if gh > -tol or zh - zl < 1e-9 * (1.0 + abs(zh)):
            break
        zm = zh - gh * (zh - zl) / (gh - gl) if gl != gh else 0.5 * (zl + zh)
        if not zl < zm < zh:
            zm = 0.5 * (zl + zh)
        gm = excess(zm)
        if gm <= 0:
            zh, gh = zm, gm
            if side == -1:
                gl /= 2
            side = -1
        else:
            zl, gl = zm, gm
            if side == 1:
                gh /= 2
            side = 1
    return zh


def _scales(fmt: FPFormat, amax: float) -> np.ndarray:
    """Scales to search for ``fmt``: ``k_min .. k_min + 2``, ``k_min`` the smallest ``k`` that
    does not saturate the shard's largest value ``amax`` (:func:`~gradcomp.codecs.dense.min_scale_exp`).

    Saturation is excluded (it biases the codec), and above ``k_min`` a larger ``k`` only moves
    values from the normal binades towards the subnormals, so the NMSE hardly ever decreases
    (checked in ``benchmarks/results/codec_error.md``, "Planner design checks"). The scaled grid
    must stay inside float32 (decode tables are float32) and ``|k| <= 2**14``.
    """
    k_lo = max(min_scale_exp(amax, fmt), -_MAX_SCALE)
    k_hi = max(min(k_lo + _K_EXTRA, 127 - fmt.max_exponent, _MAX_SCALE), k_lo)
    return np.arange(k_lo, k_hi + 1)


def _best_scales(fmts, rounding: str, mu: float, s: float, log_lower: np.ndarray, amax: float):
    """Per format and cutoff: the minimum over :func:`_scales` of the FP NMSE, and that ``k``.

    Returns two (F, A) arrays. Formats wider than 8 bits use the per-binade error model.
    """
    ks_list = [_scales(f, amax) for f in fmts]
    tabs = fp_tables(fmts, ks_list, rounding, mu, s, log_lower, exact=False,
                      log_top=log_top_of(amax, mu))
    cols = np.arange(log_lower.size)
    errs, ks = [], []
    for kk, tt in zip(ks_list, tabs):
        j = np.argmin(tt, axis=0)
        errs.append(tt[j, cols])
        ks.append(kk[j])
    return np.array(errs), np.array(ks)


@dataclass(frozen=True)
class _Choice:
    layout: str  # "fp", "prune_fp" or "prune"
    fmt: FPFormat | None
    scale_exp: int
    z: float  # ln(alpha) - mu; -inf for dense
    nmse: float


def _search(mu: float, sigma: float, budget: float, n: int, usable: float, rounding: str,
            amax: float) -> tuple[_Choice, bool]:
    """Return the minimum-NMSE choice whose expected wire fits ``budget``, and whether one fits.

    Candidates: float32 (IdentityCodec) when it fits, else dense FP of the :data:`DENSE_BITS`
    widths (every split of :func:`_formats`, best scale each); PRUNE_FP with values of those
    widths (every split, best scale per cutoff) and PRUNE (float32 values), at the width's
    budget boundary (the smallest cutoff ``z`` that fits; solved continuously) and at every
    grid cutoff above it. All in the lognormal truncated at ``amax``. If nothing fits, the
    cheapest candidate (dense 2-bit FP, or the largest grid cutoff with 2-bit values) is
    returned with ``False``.
    """
    s = max(sigma, MIN_SIGMA)
    if 8.0 * (HEADER_BYTES + 4 * n) / n <= budget:  # float32 fits: nothing can beat exact
        return _Choice("identity", None, 0, -math.inf, 0.0), True
    grid = _cutoff_grid(mu, s, round(n * usable))
    bounds = _boundaries(grid, n, usable, s, budget)
    dense_ok = [b for b in DENSE_BITS if _dense_bits(n, b) <= budget]
    fallback = not bounds and not dense_ok
    if fallback:  # the cheapest candidate: dense 2-bit FP or pruning at the largest grid cutoff
        nz, kept = _fractions(grid[-1], s)
        if _dense_bits(n, 2) <= _prune_bits(n, float(nz) * usable, float(kept) * usable, 2):
            dense_ok = [2]
        else:
            bounds = {2: float(grid[-1])}
    zs = np.concatenate(([-np.inf], grid, sorted(bounds.values())))
    log_top = log_top_of(amax, mu)
    prune = pruning_nmse_z(zs, s, log_top)
    best: _Choice | None = None

    def offer(c: _Choice):
        nonlocal best
        if best is None or c.nmse < best.nmse:
            best = c

    if 32 in bounds:
        ok = zs >= bounds[32]
        i = int(np.argmin(np.where(ok, prune, np.inf)))
        offer(_Choice("prune", None, 0, float(zs[i]), float(prune[i])))
    # Narrow widths first, then the wide ones that can still win: a width's NMSE is at least the
    # pruning error at its budget boundary (the FP error is >= 0), which grows with the width.
    for phase in (lambda b: b <= 8, lambda b: b > 8):
        widths = [b for b in DENSE_BITS if phase(b)]
        reference = best.nmse if best is not None else math.inf
        dense_w = [b for b in widths if b in dense_ok]
        prune_w = [b for b in widths
                   if b in bounds and float(pruning_nmse_z(bounds[b], s, log_top)) < reference]
        fmts = [f for b in sorted(set(dense_w) | set(prune_w)) for f in _formats(b)]
        if not fmts:
            continue
        errs, ks = _best_scales(fmts, rounding, mu, s, zs, amax)
        for f, err, k in zip(fmts, errs, ks):
            if f.bits in dense_w:
                offer(_Choice("fp", f, int(k[0]), -math.inf, float(err[0])))
            if f.bits in prune_w:
                tot = np.where(zs >= bounds[f.bits], prune + err, np.inf)
                i = int(np.argmin(tot))
                offer(_Choice("prune_fp", f, int(k[i]), float(zs[i]), float(tot[i])))
    assert best is not None  # the fallback guarantees a candidate
    return best, not fallback


# ---------------------------------------------------------------------------------------------
# the codec


def _shard_max(fit) -> float:
    """The shard's largest ``|x|``: ``fit.max_abs`` where the fit carries it (a
    :class:`~gradcomp.codecs.base.ShardFit`), else the expected maximum of ``count`` lognormal
    samples, ``exp(mu + sigma Phi^-1(1 - 1/(count + 1)))`` (clamped to float32's range)."""
    amax = getattr(fit, "max_abs", math.inf)
    if not (0.0 < amax < math.inf):
        t = fit.mu + fit.sigma * float(special.ndtri(1.0 - 1.0 / (fit.count + 1)))
        amax = math.exp(min(t, _F32_MAX_LOG))
    return min(max(amax, math.exp(_F32_MIN_NORMAL_LOG)), float(np.finfo(np.float32).max))


_MAX_NUMEL = 2**31 - 1  # payload counts are int32
# The smallest budget any shard can meet: the cheapest candidate of the search (pruning to the
# grid's top sparsity, every survivor a +-alpha entry) on the largest shard, where the 25 fixed
# bytes weigh least (see BudgetCodec's "Budget").
MIN_BUDGET_BITS = _prune_bits(_MAX_NUMEL, 1.0 - _GRID_SPARSITY[1], 0.0, 2)


@dataclass(frozen=True)
class BudgetPlan:
    """What :class:`BudgetCodec` chose for one shard, and the plan its payload is encoded with.

    ``layout``: ``"fp"`` (dense FP, an FP payload), ``"prune_fp"`` (stochastic pruning, kept
    values FP-coded: a PRUNE_FP payload), ``"prune"`` (kept values as float32: a PRUNE
    payload) or ``"identity"`` (float32, when the budget affords it: an IDENTITY payload).
    ``encoding`` is the :class:`~gradcomp.codecs.dense.FPPlan` or
    :class:`~gradcomp.codecs.sparse.PrunePlan` handed to that codec (``None`` for identity).
    ``sparsity`` (expected fraction of zeros among the nonzero finite entries, 0 for dense) and
    ``kept_fraction`` (``P(|x| > alpha)``, 1 for dense) follow from ``alpha`` under the fit.
    ``expected_nmse`` is ``E[(Q(x) - x)^2] / E[x^2]`` under the fit (truncated at the shard's
    maximum) and ``expected_bits`` the expected payload bits per element for ``numel``
    elements (headers included); ``within_budget`` is ``False`` only when no candidate fits the
    budget (then this is the cheapest one).
    """

    layout: str
    encoding: object
    fmt: FPFormat | None
    scale_exp: int
    alpha: float | None
    sparsity: float
    kept_fraction: float
    expected_nmse: float
    expected_bits: float
    budget: float
    numel: int
    within_budget: bool


def _sample_fractions(fit, sample: np.ndarray, alpha: float) -> tuple[float, float]:
    """(nonzero, kept) fractions of stochastic pruning at ``alpha`` over ``fit``'s sample of
    ``|x|`` (``sample``, as an array): ``1 -`` :func:`pruned_fraction` and ``mean(|x| > alpha)``."""
    return 1.0 - pruned_fraction(fit, alpha), float((sample > alpha).mean())


def _meet_budget(fit, sample: np.ndarray, alpha: float, n: int, usable: float, value_bits: int,
                 budget: float) -> float:
    """``alpha`` when the sample's expected payload at ``alpha`` fits ``budget`` bits per element,
    else the least larger float32 threshold that does (bisection on ``ln alpha`` to 1e-4; when
    even pruning everything cannot fit -- the fixed bytes of a tiny shard -- the largest tried).

    The lognormal model places the threshold; real gradients' tails are not lognormal, so the
    model's kept fraction can be short of the sample's and the payload over budget.
    """
    def over(a: float) -> bool:
        nz, kept = _sample_fractions(fit, sample, a)
        return _prune_bits(n, nz * usable, kept * usable, value_bits) > budget

    if not over(alpha):
        return alpha
    lo = hi = math.log(alpha)
    step = 0.25
    while over(math.exp(hi)) and hi - lo < 60.0:
        lo, hi, step = hi, hi + step, 2 * step
    for _ in range(40):
        if hi - lo < 1e-4:
            break
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if over(math.exp(mid)) else (lo, mid)
    return _f32_up(min(math.exp(hi), float(np.finfo(np.float32).max)))


def _f32_up(x: float) -> float:
    """Smallest float32 >= ``x`` (as a Python float)."""
    f = np.float32(x)
    if float(f) < x:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


@lru_cache(maxsize=64)
def _delegate(layout: str, bits: int, exp_bits: int, rounding: str):
    """The codec that writes a plan's payload (its own sparsity is unused: plans carry alpha)."""
    if layout == "identity":
        return IdentityCodec()
    if layout == "fp":
        return FPCodec(bits, exp_bits, rounding)
    if layout == "prune_fp":
        return PruneFPCodec(0.5, bits, exp_bits, rounding)
    return PruneCodec(0.5)


class BudgetCodec(Codec):
    """Meet a wire budget in bits per element with the least expected error, shard by shard.

    Per shard (per :meth:`plan`, i.e. per refit), from the lognormal fit of ``|x|``, choose among
    dense FP of 2..16 bits (FPCodec's payload), stochastic pruning with the kept values
    (``|x| > alpha``) FP-coded at 2..16 bits (PruneFPCodec's) or sent as float32 (PruneCodec's),
    and plain float32 (IdentityCodec's, once the budget affords ``32 + 64 / n`` bits), with
    every exponent/mantissa split up to 8 bits (wider: 5..10 mantissa and 2..6 exponent bits)
    and the best power-of-two scale ``k``, the combination with the smallest expected
    ``NMSE = E[(Q(x) - x)^2] / E[x^2]`` (:mod:`gradcomp.numerics.error_model`; with stochastic rounding
    every operator is unbiased, so this is the variance they add) whose expected payload fits
    ``bits_per_element`` (headers included, amortized over the shard).

    Numerics: NMSE in closed form for the lognormal truncated at the shard's largest value (cell
    by cell up to 8 bits; per binade above, within about 1%). Per value width, the smallest
    ``alpha`` whose expected wire fits is solved continuously (regula falsi); the larger
    ``alpha`` of a grid of 20 sparsities from 1e-3 up to ``1 - 1e-6`` (at most ``1 - 2 /
    count``) are tried too. The scale is the smallest ``k`` that does not saturate the shard's
    maximum, or up to 2 above it if better. ``alpha`` is rounded up to float32 (it travels as one).

    Budget: met in expectation under the fit. The cheapest candidate is pruning to a nonzero
    fraction of ``1e-6`` with 2-bit values: 25 fixed bytes plus about ``1e-6 * 34`` bits per
    element, so a shard of ``n`` elements needs at least ``min(200 / n + 3.4e-5, 2 + 64 / n)``
    bits per element, and no shard (``n <= 2**31 - 1``, int32 counts) can meet less than
    :data:`MIN_BUDGET_BITS` (3.39e-5): the constructor rejects such a budget (``ValueError``). A
    shard too small for its budget gets the cheaper of dense 2-bit FP and that pruning (its
    error can be far above 1) and ``within_budget=False`` in its plan.

    Wire: FP, PRUNE_FP, PRUNE or IDENTITY payloads (the header's tag says which);
    :meth:`wire_bytes` is ``None``. Unbiased with ``rounding="stochastic"`` (the delegate codecs
    raise the scale at encode time if a shard's maximum grew since its plan); ``"nearest"``
    rounds values to nearest (biased), pruning stays stochastic. :meth:`reduce_codec` is the
    codec itself (the mean is refitted and planned against the same budget).

    Args:
        bits_per_element: the budget, a finite number ``>= MIN_BUDGET_BITS`` (bits per element,
            headers included).
        rounding: ``"stochastic"`` or ``"nearest"``.

    Example:
        >>> codec = BudgetCodec(2.0)
        >>> x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)).mul(2).exp()
        >>> payload = codec.encode(x, key=1)
        >>> 8 * payload.numel() / 100_000 <= 2.05
        True
    """

    uses_fit = True

    def __init__(self, bits_per_element: float = 2.0, rounding: str = "stochastic"):
        if isinstance(bits_per_element, (bool, np.bool_)) or not isinstance(
                bits_per_element, (int, float, np.integer, np.floating)) \
                or not math.isfinite(bits_per_element) or not bits_per_element >= MIN_BUDGET_BITS:
            raise ValueError(f"BudgetCodec: bits_per_element must be a finite number >= {MIN_BUDGET_BITS:.4g} "
                             "(payload bits per element, headers included; below it no shard of at most "
                             f"2**31 - 1 elements can meet the budget), got {bits_per_element!r}")
        if rounding not in _ROUNDING:
            raise ValueError(f"BudgetCodec: rounding must be one of {_ROUNDING}, got {rounding!r}")
        self.bits_per_element = float(bits_per_element)
        self.rounding = rounding
        self.stochastic = rounding == "stochastic"

    # -- planning ----------------------------------------------------------------------------

    def plan(self, fit: lognormal.LognormalFit | None, numel: int | None = None) -> BudgetPlan:
        """Choose layout, threshold, format and scale for a shard with lognormal ``fit``.

        ``numel``: the shard's element count, for the header amortization and the share of
        exact zeros (``fit.count / numel``); ``None`` uses ``fit.count`` (conservative: it never
        exceeds ``numel``). ``fit=None`` (no nonzero finite entry): a PRUNE plan with
        ``alpha = inf`` (the payload is the 25 fixed bytes; a non-finite shard still carries
        its flag).
        """
        if numel is not None and (isinstance(numel, bool) or not isinstance(numel, (int, np.integer))
                                  or numel < 0):
            raise ValueError(f"numel must be a non-negative int or None, got {numel!r}")
        budget = self.bits_per_element
        if fit is None or fit.count == 0 or numel == 0:
            n = int(numel or 0)
            bits = _prune_bits(n, 0.0, 0.0, 32) if n else 0.0
            return BudgetPlan("prune", PrunePlan(math.inf, 1.0 - 1e-6, None), None, 0, math.inf, 1.0, 0.0,
                              0.0, bits, budget, n, bits <= budget)
        n = int(numel) if numel is not None else int(fit.count)
        usable = min(1.0, fit.count / n)
        amax = _shard_max(fit)
        choice, ok = _search(fit.mu, fit.sigma, budget, n, usable, self.rounding, amax)
        return self._finish(choice, ok, fit, n, usable, amax)

    def plan_segments(self, fits, numels) -> list[BudgetPlan]:
        """Plans for the segments of one SEGMENTS payload that together meet the budget.

        The payload's fixed bytes -- its header, count and table (``12 + 8 S``) and each
        segment's own header and fixed fields (charged here at the sparse layouts' 25 bytes)
        -- are paid from the whole shard's budget: segment ``s`` is planned at ``b_eff + 8 *
        25 / numel_s`` bits per element, ``b_eff = b - 8 (12 + 33 S) / sum(numel)``, so a small
        tensor still affords its header. Where ``b_eff`` would fall below
        :data:`MIN_BUDGET_BITS` (a tiny shard of many tensors) every segment is planned at ``b``
        alone (then the shard exceeds the budget by its fixed bytes).
        """
        if len(numels) <= 1:
            return [self.plan(f, n) for f, n in zip(fits, numels)]
        total = sum(numels)
        fixed = HEADER_BYTES + PRUNE_FIXED_BYTES
        b_eff = self.bits_per_element - 8.0 * (12 + (8 + fixed) * len(numels)) / max(total, 1)
        if not b_eff >= MIN_BUDGET_BITS:
            return [self.plan(f, n) for f, n in zip(fits, numels)]
        return [BudgetCodec(b_eff + 8.0 * fixed / n, self.rounding).plan(f, n) if n else self.plan(f, n)
                for f, n in zip(fits, numels)]

    def _finish(self, c: _Choice, ok: bool, fit, n: int, usable: float, amax: float) -> BudgetPlan:
        mu, s = fit.mu, max(fit.sigma, MIN_SIGMA)
        log_top = log_top_of(amax, mu)
        budget = self.bits_per_element
        if c.layout == "identity":
            bits = 8.0 * (HEADER_BYTES + 4 * n) / n
            return BudgetPlan("identity", None, None, 0, None, 0.0, 1.0, 0.0, bits, budget, n, True)
        if c.layout == "fp":
            fmt = c.fmt
            assert fmt is not None  # dense choices carry their format
            err = fp_tables([fmt], [np.array([c.scale_exp])], self.rounding, mu, s,
                             np.array([-np.inf]), exact=False, log_top=log_top)[0][0, 0]
            bits = _dense_bits(n, fmt.bits)
            return BudgetPlan("fp", FPPlan(fmt, c.scale_exp, None), fmt, c.scale_exp, None, 0.0, 1.0,
                              float(err), bits, budget, n, ok and bits <= budget)
        vb = c.fmt.bits if c.layout == "prune_fp" and c.fmt is not None else 32
        alpha = min(_f32_up(math.exp(mu + c.z)), float(np.finfo(np.float32).max))
        sample = np.asarray(getattr(fit, "sample", ()), dtype=np.float64)
        if sample.size:  # the fit's own entries, not the lognormal model, decide the payload size
            alpha = _meet_budget(fit, sample, alpha, n, usable, vb, budget)
            nz, kept = _sample_fractions(fit, sample, alpha)
        z = math.log(alpha) - mu
        if not sample.size:
            nz, kept = (float(v) for v in _fractions(z, s))
        sparsity = min(max(1.0 - nz, 1e-12), 1.0 - 1e-12)
        err = float(pruning_nmse_z(z, s, log_top))
        values = None
        if c.layout == "prune_fp":
            fmt = c.fmt
            assert fmt is not None  # prune_fp choices carry the values' format
            err += float(fp_tables([fmt], [np.array([c.scale_exp])], self.rounding, mu, s,
                                    np.array([z]), exact=False, log_top=log_top)[0][0, 0])
            values = FPPlan(fmt, c.scale_exp, None)
        bits = _prune_bits(n, nz * usable, kept * usable, vb)
        return BudgetPlan(c.layout, PrunePlan(alpha, sparsity, values), c.fmt, c.scale_exp, alpha, sparsity,
                          kept, err, bits, budget, n, ok and bits <= budget + 1e-9)

    # -- encoding ----------------------------------------------------------------------------

    def _codec_for(self, plan: BudgetPlan) -> Codec:
        fmt = plan.fmt
        return _delegate(plan.layout, fmt.bits if fmt else 0, fmt.exp_bits if fmt else 0, self.rounding)

    def encode(self, x: torch.Tensor, *, key: int = 0, plan: BudgetPlan | None = None) -> torch.Tensor:
        """Return the FP / PRUNE_FP / PRUNE payload of ``x`` (flattened) under ``plan``.

        ``plan=None`` fits ``x`` and plans for its ``numel``. Randomness: the chosen codec's
        (``key`` for FP rounding; ``derive_key(key, 1)`` / ``derive_key(key, 2)`` for pruning
        and value rounding in the sparse layouts).
        """
        xs = check_shard(x, "BudgetCodec.encode")
        if plan is None:
            plan = self.plan(fit_or_none(xs), xs.numel())
        elif not isinstance(plan, BudgetPlan):
            raise ValueError("BudgetCodec.encode: plan must be a BudgetPlan (from BudgetCodec.plan), "
                             f"got {plan!r}")
        return self._codec_for(plan).encode(xs, key=key, plan=plan.encoding)

    def layout_decoder(self, tag: CodecTag) -> Decoder | None:
        """FP, PRUNE_FP, PRUNE or IDENTITY: the layouts a plan may choose."""
        return {CodecTag.FP: decode_fp_into, CodecTag.PRUNE_FP: decode_prune_into,
                CodecTag.PRUNE: decode_prune_into, CodecTag.IDENTITY: decode_identity_into}.get(tag)

    def wire_bytes(self, numel: int) -> None:
        """``None``: the layout and its size depend on the data (see :meth:`expected_wire_bytes`)."""
        return None

    def expected_wire_bytes(self, numel: int, fit: lognormal.LognormalFit | None = None) -> float:
        """Expected payload bytes of a ``numel``-element shard whose usable entries follow ``fit``."""
        return self.plan(fit, numel).expected_bits * numel / 8.0

    def reduce_codec(self) -> Codec:
        """The codec itself: the reduced mean is refitted and planned against the same budget."""
        return self

    def describe(self, plan: BudgetPlan | None) -> dict:
        """Summary of a plan: layout, format, sparsity, alpha, expected NMSE and bits/element."""
        if plan is None:
            return {"layout": None, "format": None, "budget_bits_per_element": self.bits_per_element}
        fmt = plan.fmt
        return {
            "layout": plan.layout,
            "format": (fmt.name if fmt is not None
                       else "float32" if plan.layout in ("prune", "identity") else None),
            "value_bits": fmt.bits if fmt is not None else 32,
            "exp_bits": fmt.exp_bits if fmt is not None else None,
            "man_bits": fmt.man_bits if fmt is not None else None,
            "scale_exp": plan.scale_exp,
            "sparsity": plan.sparsity,
            "kept_fraction": plan.kept_fraction,
            "alpha": plan.alpha,
            "expected_nmse": plan.expected_nmse,
            "expected_bits_per_element": plan.expected_bits,
            "budget_bits_per_element": plan.budget,
            "numel": plan.numel,
            "within_budget": plan.within_budget,
        }
