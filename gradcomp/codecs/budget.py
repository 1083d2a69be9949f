"""Budget codec: the pruning sparsity and FP format that minimize the error for a bit budget.

:class:`BudgetCodec` takes a wire budget in bits per element (headers included, amortized over
the shard) and, per shard, chooses from the lognormal fit of ``|x|`` (SPEC 2) the layout --
dense FP (:class:`~gradcomp.codecs.dense.FPCodec`'s payload) or stochastic pruning with the kept
values FP-coded (:class:`~gradcomp.codecs.sparse.PruneFPCodec`'s payload) or sent as float32
(:class:`~gradcomp.codecs.sparse.PruneCodec`'s) -- the pruning threshold ``alpha`` (sparsity
``S``), the value width ``b``, its exponent/mantissa split and its power-of-two scale ``k`` that
minimize the expected error within the budget. The payloads are the ordinary FP / PRUNE_FP /
PRUNE payloads, so :func:`gradcomp.codecs.decode_payload` decodes them.

Error criterion
---------------
All our operators are unbiased with ``rounding="stochastic"`` (stochastic pruning, stochastic
rounding, and no saturation: see below), so what hurts SGD is the variance they add. The
criterion is the normalized expected squared error ::

    NMSE = E[(Q(x) - x)^2] / E[x^2],     |x| ~ Lognormal(mu, sigma)   (natural log)

which is additive over disjoint value ranges: pruning acts on ``|x| <= alpha`` and adds
``|x| (alpha - |x|)`` (:func:`pruning_nmse`); FP rounding acts on the kept values
``|x| > alpha``, scaled by ``2**-k``, and adds ``(y - lo)(hi - y)`` inside a grid cell ``[lo, hi)``
(stochastic) or the squared distance to the nearest grid point (nearest), plus ``(y - max)^2``
above the saturation point (:func:`fp_nmse`). Both are integrated in closed form, cell by cell,
with the lognormal partial moments of order 0, 1 and 2 (``E[u^p; a < u < b] = exp(p^2 s^2/2)
[Phi((ln b - p s^2)/s) - Phi((ln a - p s^2)/s)]`` for ``ln u ~ N(0, s^2)``); no sampling.

The shard's largest value ``max|x|`` is known (:class:`~gradcomp.codecs.base.ShardFit` carries
it; else the expected maximum of ``count`` samples is used). The codec never saturates it (as
FPCodec and PruneFPCodec, which raise the scale at encode time if needed: a saturated value is
biased), and the model is the lognormal truncated there: nothing lies above ``max|x|``, and
``E[x^2]`` is the energy below it. This matters for heavy tails: ``E[x^2]`` is carried by the
largest values (``ln|x|`` around ``mu + 2 sigma^2``, 4 standard deviations up at sigma 2), and an
untruncated model would spend precision on values no shard of realistic size contains. The
NMSE-optimal scale therefore puts the format's top just above the data's, and pruning the many
small values is cheap: this is the trade for the variance of the summed gradient, not the
relative-error criterion FPCodec's split uses.

Wire model
----------
Expected payload bits per element of the chosen layout: dense FP is ``8 * (8 + ceil(n b / 8)) /
n``; PRUNE_FP / PRUNE is :func:`gradcomp.codecs.sparse.prune_fp_wire_bits` with the expected
nonzero fraction ``1 - S(alpha)`` and kept fraction ``P(|x| > alpha)`` (SPEC 2.1 closed forms).
``n`` is the shard's element count (``numel`` when :meth:`BudgetCodec.plan` is given it, else
the fit's ``count``, which is never more and so over-charges the header and treats every element
as nonzero -- both conservative). The budget holds in expectation under the fit: for lognormal
data the measured bits scatter by ``O(b / sqrt(n))`` around it (binomial counts), and data that
is not lognormal can land off by more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy import special

from .. import lognormal
from ..formats import FPFormat
from .base import HEADER_BYTES, Codec, check_shard, fit_or_none
from .dense import FPCodec, FPPlan, IdentityCodec, min_scale_exp
from .sparse import PRUNE_FIXED_BYTES, PruneCodec, PruneFPCodec, PrunePlan, prune_fp_wire_bits

__all__ = ["BudgetCodec", "BudgetPlan", "MIN_BUDGET_BITS", "pruning_nmse", "fp_nmse", "prune_fp_nmse"]

_LN2 = math.log(2.0)
_SQRT2 = math.sqrt(2.0)
_ROUNDING = lognormal.ROUNDING_MODES
# sigma below this is evaluated as this (the point-mass limit; the Phi differences saturate to
# 0/1 and every formula stays finite).
_MIN_SIGMA = 1e-9


# ---------------------------------------------------------------------------------------------
# validation


def _sigma(value) -> float:
    return max(lognormal._sigma(value), _MIN_SIGMA)


_real = lognormal._real
_rounding = lognormal._rounding


# ---------------------------------------------------------------------------------------------
# stable Phi differences


def _upper(t: np.ndarray) -> np.ndarray:
    """Upper tail ``1 - Phi(t) = Phi(-t)``: full relative precision for ``t > 0``.

    Phi differences are taken as differences of upper tails, ``Phi(b) - Phi(a) = U(a) - U(b)``:
    exact to full relative precision in the upper tail (where ``E[x^2]`` lives: the quantities
    here are normalized by it), to about 1e-16 absolute in the lower tail, where every term
    they multiply is small in NMSE units.
    """
    return special.ndtr(-t)


# ---------------------------------------------------------------------------------------------
# pruning (SPEC 2.1)


def _energy_below(log_top: float, s: float) -> float:
    """``E[u^2; u < e^log_top] / E[u^2] = Phi(log_top/s - 2s)``: the share of the energy below
    the top (1 for ``log_top = inf``); every NMSE of a model truncated there is divided by it.
    Floored at 1e-300 (reached only for sigma beyond about 25, where float32 data cannot follow
    the model anyway)."""
    return 1.0 if log_top == math.inf else max(float(special.ndtr(log_top / s - 2.0 * s)), 1e-300)


# Below this share of the energy under the top (log), the linear-space formulas lose their
# precision (absolute errors of about 1e-16 divided by the share); they are then evaluated in
# log space (``_log_space``): heavy tails (sigma beyond about 6 at 1e6 samples, e.g. data
# spread over 1e-30..1e30), where the energy sits in the far lower tail of the moment densities.
_LOG_SPACE_BELOW = math.log(1e-8)


def _log_energy_below(log_top: float, s: float) -> float:
    """``log Phi(log_top/s - 2s)``: the log of :func:`_energy_below`, without its floor."""
    return 0.0 if log_top == math.inf else float(special.log_ndtr(log_top / s - 2.0 * s))


def _log_space(log_top: float, s: float) -> bool:
    return _log_energy_below(log_top, s) < _LOG_SPACE_BELOW


def _log_phi_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``log(Phi(b) - Phi(a))`` for ``a <= b`` (``-inf`` where ``a == b``), to full relative
    precision in both tails (log_ndtr of the tail nearer to the interval)."""
    with np.errstate(all="ignore"):
        upper = a > 0
        la = np.where(upper, special.log_ndtr(-b), special.log_ndtr(a))
        lb = np.where(upper, special.log_ndtr(-a), special.log_ndtr(b))
        out = lb + np.log(-np.expm1(la - lb))
    return np.where(b > a, out, -np.inf)


def _log_top_of(amax: float, mu: float) -> float:
    """``ln(amax) - mu``, at least 0: a sample's maximum is never below its geometric mean
    ``e^mu``, so a negative value is float rounding (it would cut a point mass away)."""
    return max(math.log(amax) - mu, 0.0)


def _pruning_nmse_z(z: np.ndarray, s: float, log_top: float = math.inf) -> np.ndarray:
    """:func:`pruning_nmse` for ``z = ln(alpha) - mu`` (array), ``s > 0``, truncated at ``log_top``.

    With ``u = |x| e^-mu`` (``ln u ~ N(0, s^2)``, ``E u^2 = e^(2 s^2)``), ``a = e^z`` and
    ``y = min(z, log_top)`` (no values above the top)::

        NMSE = (a E[u; u<e^y] - E[u^2; u<e^y]) / E[u^2; u < e^log_top]
             = [e^(z - 3 s^2/2) Phi(y/s - s) - Phi(y/s - 2s)] / Phi(log_top/s - 2s).

    For ``y = z`` the two terms agree to leading order as ``z -> -inf`` (catastrophic
    cancellation), so for ``z/s - s < 0`` the identical ``exp(-t2^2/2)/2 [erfcx(-t1/sqrt2) -
    erfcx(-t2/sqrt2)]`` (``t1 = z/s - s``, ``t2 = z/s - 2s``) is used: the exponents of both
    terms equal ``-t2^2/2``, erfcx of positive arguments is bounded and its difference well
    conditioned. For ``z > log_top`` the direct form is safe (``a > e^y``).
    """
    z = np.asarray(z, dtype=np.float64)
    y = np.minimum(z, log_top)
    t1, t2 = y / s - s, y / s - 2.0 * s
    if _log_space(log_top, s):
        # The same two forms, normalized inside the exponentials (the share underflows).
        lg = _log_energy_below(log_top, s)
        with np.errstate(over="ignore", invalid="ignore", under="ignore", divide="ignore"):
            direct = (np.exp(z - 1.5 * s * s + special.log_ndtr(t1) - lg)
                      - np.exp(special.log_ndtr(t2) - lg))
            lower = 0.5 * np.exp(-0.5 * t2 * t2 - lg) * (special.erfcx(-t1 / _SQRT2) - special.erfcx(-t2 / _SQRT2))
        out = np.where((t1 < 0) & (z <= log_top), lower, direct)
        out = np.where(np.isneginf(z), 0.0, out)
        return np.maximum(np.nan_to_num(out, nan=0.0, posinf=np.inf), 0.0)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        direct = np.exp(z - 1.5 * s * s + special.log_ndtr(t1)) - special.ndtr(t2)
        lower = 0.5 * np.exp(-0.5 * t2 * t2) * (special.erfcx(-t1 / _SQRT2) - special.erfcx(-t2 / _SQRT2))
    out = np.where((t1 < 0) & (z <= log_top), lower, direct)
    out = np.where(np.isneginf(z), 0.0, out)
    return np.maximum(out, 0.0) / _energy_below(log_top, s)


def _log_top(mu: float, upper: float) -> float:
    upper = _real(upper, "upper") if upper != math.inf else math.inf
    if not upper > 0:
        raise ValueError(f"upper must be > 0 (the largest |x|; inf for none), got {upper!r}")
    return math.log(upper) - mu if upper < math.inf else math.inf


def pruning_nmse(alpha, mu: float, sigma: float, upper: float = math.inf):
    """Return the NMSE that stochastic pruning at threshold ``alpha`` adds, for lognormal ``|x|``.

    ``E[(T(x) - x)^2] / E[x^2]`` with ``T`` the unbiased stochastic pruning of SPEC 2.1 and
    ``|x| ~ Lognormal(mu, sigma)`` (natural log). An entry with ``|x| <= alpha`` becomes
    ``sign(x) alpha`` with probability ``|x|/alpha``, else 0: variance ``|x| (alpha - |x|)``;
    entries above ``alpha`` are untouched. In closed form (``z = ln alpha - mu``)::

        NMSE = e^(z - 3 sigma^2/2) Phi(z/sigma - sigma) - Phi(z/sigma - 2 sigma)

    evaluated without cancellation (see ``_pruning_nmse_z``). ``upper``: the lognormal
    truncated at ``|x| <= upper`` (a shard's largest value; the numerator's integrals stop
    there and the denominator is ``E[x^2; |x| <= upper]``). ``alpha = 0`` gives 0;
    ``sigma == 0`` is the point mass: ``max(0, alpha e^-mu - 1)``.

    Args:
        alpha: threshold(s) >= 0, scalar or numpy array.
        mu, sigma: natural-log lognormal parameters of ``|x|``, ``sigma >= 0``.
        upper: largest ``|x|`` (``> 0``), ``inf`` for the untruncated lognormal.

    Returns:
        float for scalar ``alpha``, else a float64 array of ``alpha``'s shape.

    Example:
        >>> round(pruning_nmse(math.exp(-1.0), mu=-1.0, sigma=1.0), 6)
        0.012651
    """
    mu = _real(mu, "mu")
    s = _sigma(sigma)
    log_top = _log_top(mu, upper)
    a = np.asarray(alpha, dtype=np.float64)
    if np.isnan(a).any() or (a < 0).any() or np.isposinf(a).any():
        raise ValueError("alpha must be finite and >= 0")
    with np.errstate(divide="ignore"):
        z = np.log(a) - mu
    out = _pruning_nmse_z(z, s, log_top)
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------------------------------------
# FP rounding of the kept values (SPEC 2.2, exact for the real format)


@dataclass(frozen=True)
class _Cells:
    """A format's error integrand, cell by cell, in format units (positive half-line).

    Cell ``i`` spans ``[bounds[i], bounds[i+1])`` and its squared error is the quadratic
    ``c0 + c1 y + c2 y^2`` (exactly, for every ``y`` in it); the last cell is ``[max, inf)``.
    Coefficients are kept as ``log|c_p|`` and ``sign(c_p)`` (``c2`` is always +-1).
    """

    log_bounds: np.ndarray  # (ncell + 1,), -inf first, +inf last
    log_abs: np.ndarray  # (2, ncell): log|c0|, log|c1|
    sign: np.ndarray  # (3, ncell): sign(c0), sign(c1), sign(c2)


@lru_cache(maxsize=256)
def _cells(fmt: FPFormat, rounding: str) -> _Cells:
    grid = lognormal._grid(fmt)  # ascending, grid[0] = 0, grid[-1] = max
    top = grid[-1]
    if rounding == "stochastic":
        # [lo, hi): E(Q - y)^2 = (y - lo)(hi - y) = -y^2 + (lo + hi) y - lo hi; above max the
        # value saturates: (y - max)^2.
        lo, hi = grid[:-1], grid[1:]
        c2 = np.append(-np.ones_like(lo), 1.0)
        c1 = np.append(lo + hi, -2.0 * top)
        c0 = np.append(-lo * hi, top * top)
        bounds = np.append(grid, np.inf)
    else:
        # Half cells around each grid point q: (y - q)^2 = y^2 - 2 q y + q^2. [0, g1/2) -> 0; the
        # top half cell [max, inf) is the saturation range, same expression with q = max.
        g = grid[1:]
        mids = (grid[:-1] + grid[1:]) / 2.0
        bounds = np.empty(2 * g.size + 2)
        bounds[0] = 0.0
        bounds[1:-1:2] = mids
        bounds[2:-1:2] = g
        bounds[-1] = np.inf
        q = np.concatenate(([0.0], np.repeat(g, 2)))
        c2 = np.ones_like(q)
        c1 = -2.0 * q
        c0 = q * q
    with np.errstate(divide="ignore"):
        log_bounds = np.log(bounds)
        log_abs = np.log(np.abs(np.stack((c0, c1))))
    sign = np.sign(np.stack((c0, c1, c2)))
    for a in (log_bounds, log_abs, sign):
        a.setflags(write=False)
    return _Cells(log_bounds, log_abs, sign)


_EXACT_PREFIX_CELLS = 16  # grid cells near zero that the per-binade model keeps exact


@lru_cache(maxsize=256)
def _binade_cells(fmt: FPFormat, rounding: str) -> _Cells:
    """Per-binade approximation of :func:`_cells` for wide formats (used by the search only).

    Inside a range of equal spacing ``w`` (the subnormals, each binade ``[2**e, 2**(e+1))``, the
    top binade up to ``max``) the squared error is a periodic function of ``y`` with mean
    ``w^2/6`` (stochastic: ``r (w - r)``, ``r = y mod w``) or ``w^2/12`` (nearest). Where the
    density is smooth on the scale of ``w``, integrating the mean instead of the periodic
    function is off by a relative ``O((w/y)^2)``, ``O(4**-man_bits)`` in the normal binades (the
    oscillating remainder integrates to boundary terms that vanish at multiples of ``w``). Near
    zero ``w/y`` is not small, so the first :data:`_EXACT_PREFIX_CELLS` grid cells stay exact,
    and so does saturation above ``max``. About ``2**exp_bits + 16`` cells instead of
    ``2**(bits-1)``.
    """
    exact = _cells(fmt, rounding)
    m = fmt.man_bits
    w_sub = math.ldexp(1.0, fmt.min_subnormal_exponent)
    y0 = min(_EXACT_PREFIX_CELLS * w_sub, math.ldexp(1.0, fmt.min_exponent))
    n_pre = int(np.searchsorted(exact.log_bounds, math.log(y0)))  # exact cells below y0
    c = 1.0 / 6.0 if rounding == "stochastic" else 1.0 / 12.0
    exps = np.arange(fmt.min_exponent, fmt.max_exponent + 1)
    starts = np.concatenate(([y0], np.ldexp(1.0, exps)))
    spacing = np.ldexp(1.0, np.concatenate(([fmt.min_exponent], exps)) - m)
    keep = np.concatenate((starts[:-1] < starts[1:], [True]))  # y0 may equal 2**emin
    starts, spacing = starts[keep], spacing[keep]
    top = fmt.max
    with np.errstate(divide="ignore"):
        log_bounds = np.concatenate((exact.log_bounds[:n_pre], np.log(starts), [math.log(top), np.inf]))
        approx_abs = np.stack((np.log(c * spacing * spacing), np.full(spacing.size, -np.inf)))
        sat_abs = np.log(np.abs(np.array([[top * top], [-2.0 * top]])))
    log_abs = np.concatenate((exact.log_abs[:, :n_pre], approx_abs, sat_abs), axis=1)
    approx_sign = np.stack((np.ones(spacing.size), np.zeros(spacing.size), np.zeros(spacing.size)))
    sign = np.concatenate((exact.sign[:, :n_pre], approx_sign, np.array([[1.0], [-1.0], [1.0]])), axis=1)
    for a in (log_bounds, log_abs, sign):
        a.setflags(write=False)
    return _Cells(log_bounds, log_abs, sign)


def _terms(log_abs: np.ndarray, sign: np.ndarray, log_c: np.ndarray, s: float, d: np.ndarray) -> np.ndarray:
    """Normalized contribution ``sum_p c_p c^(2-p) E[u^p; cell] / E[u^2]`` of cells.

    ``log_abs``/``sign``: (2, ...)/(3, ...) coefficients in format units; ``log_c``: log of the
    scale from format units to ``u`` units (broadcast); ``d``: (3, ...) Phi differences of the
    cell for ``p = 0, 1, 2``. The normalized partial moment is ``exp(p^2 s^2/2 - 2 s^2) d_p``, so
    the ``p = 2`` term is ``c2 d_2`` and the others are ``sign * exp(log|c_p| + (2-p) log c +
    (p^2/2 - 2) s^2 + log d_p)``, assembled in log space: a coefficient can overflow where its
    moment underflows (their product is at most about the cell's share of ``E[u^2]``).
    """
    out = sign[2] * d[2]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
        for p in (0, 1):
            e = log_abs[p] + (2 - p) * log_c + (p * p / 2.0 - 2.0) * s * s + np.log(d[p])
            out = out + sign[p] * np.exp(e)
    return out


def _fp_tables(fmts, ks_list, rounding: str, mu: float, s: float, log_lower: np.ndarray,
               exact: bool = True, log_top: float = math.inf) -> list[np.ndarray]:
    """FP NMSE of the values above each cutoff: one (K_i, A) table per format ``fmts[i]``.

    ``ks_list[i]``: the scales ``k`` (int array) to evaluate for ``fmts[i]``; ``log_lower``: (A,)
    cutoffs ``ln(lower) - mu`` (``-inf`` for none); ``log_top``: ``ln(upper) - mu``, the
    lognormal truncated there (cells clipped, NMSE normalized by the energy below it).
    ``exact=False`` uses :func:`_binade_cells` for formats of more than 8 bits. The (format, k)
    rows are evaluated in a few batches (formats with similar cell counts together, cells
    padded with empty ones).
    Every cell is integrated once per row, the cells above a cutoff are summed by a reverse
    cumulative sum, and only the cell holding the cutoff is integrated again from the cutoff up.
    """
    cells = [_binade_cells(f, rounding) if (not exact and f.bits > 8) else _cells(f, rounding)
             for f in fmts]
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(cells):
        if len(ks_list[i]):
            groups.setdefault(max(6, (c.sign.shape[1] - 1).bit_length()), []).append(i)
    out = [np.empty((0, log_lower.size))] * len(fmts)
    for group in groups.values():
        tabs = _fp_batch([cells[i] for i in group], [ks_list[i] for i in group], mu, s, log_lower, log_top)
        for i, t in zip(group, tabs):
            out[i] = t
    return out


# Above this |log| a row factor c^(2-p) e^((p^2/2-2) s^2) times a coefficient could leave
# float64; such batches (sigma beyond about 8) take the log-space path of _terms.
_LINEAR_LOG_LIMIT = 600.0


def _fp_batch(cells, ks_list, mu: float, s: float, log_lower: np.ndarray,
              log_top: float = math.inf) -> list[np.ndarray]:
    nb = max(c.log_bounds.size for c in cells)
    rows = sum(len(ks) for ks in ks_list)
    na = log_lower.size
    lb = np.full((rows, nb), np.inf)  # boundaries in u units (log)
    log_abs = np.full((2, rows, nb - 1), -np.inf)
    sign = np.zeros((3, rows, nb - 1))
    log_c = np.empty(rows)
    idx = np.empty((rows, na), dtype=np.int64)  # cell holding each cutoff
    r = 0
    for c, ks in zip(cells, ks_list):
        kk = len(ks)
        lc = np.asarray(ks, dtype=np.float64) * _LN2 - mu
        ncell = c.sign.shape[1]
        lb[r:r + kk, :ncell + 1] = c.log_bounds[None, :] + lc[:, None]
        log_abs[:, r:r + kk, :ncell] = c.log_abs[:, None, :]
        sign[:, r:r + kk, :ncell] = c.sign[:, None, :]
        log_c[r:r + kk] = lc
        rel = log_lower[None, :] - lc[:, None]
        idx[r:r + kk] = np.clip(np.searchsorted(c.log_bounds, rel, side="right") - 1, 0, ncell - 1)
        r += kk
    if log_top < math.inf:
        np.minimum(lb, log_top, out=lb)  # nothing above the top: those cells have no mass
    ps = (np.arange(3.0) * s * s)[:, None, None]
    with np.errstate(invalid="ignore"):
        t = (lb[None] - ps) / s  # (3, R, nb)
    if _log_space(log_top, s):
        return _fp_batch_log(t, log_abs, sign, log_c, s, log_lower, log_top, idx, ks_list)
    up = _upper(t)
    d = np.maximum(up[..., :-1] - up[..., 1:], 0.0)
    # Per-row factors c^(2-p) exp((p^2/2 - 2) s^2) of the p = 0, 1 terms (log).
    log_f = np.stack((2.0 * log_c - 2.0 * s * s, log_c - 1.5 * s * s))[:, :, None]  # (2, R, 1)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        worst = np.max(np.where(sign[:2] != 0, log_abs + log_f, -np.inf), initial=-np.inf)
    linear = bool(np.abs(log_f).max() < _LINEAR_LOG_LIMIT and worst < _LINEAR_LOG_LIMIT)
    if linear:
        with np.errstate(under="ignore"):
            coef = np.concatenate((sign[:2] * np.exp(log_abs) * np.exp(log_f), sign[2:]))  # (3, R, ncell)

        def terms(cf, dd):
            return cf[0] * dd[0] + cf[1] * dd[1] + cf[2] * dd[2]

        full = terms(coef, d)
    else:
        full = _terms(log_abs, sign, log_c[:, None], s, d)  # (R, ncell)
    above = np.zeros((rows, nb))
    above[:, :-1] = np.cumsum(full[:, ::-1], axis=1)[:, ::-1]
    # The cell holding each cutoff, integrated from the cutoff (or its lower end, when the
    # cutoff lies below the grid) up. The cutoff's tails depend on the column only.
    rr = np.arange(rows)[:, None]
    t_low = (log_lower[None, None, :] - ps) / s  # (3, 1, A)
    up_from = np.minimum(_upper(t_low), up[:, rr, idx])  # from max(cutoff, cell's lower end)
    d_part = np.maximum(up_from - up[:, rr, idx + 1], 0.0)
    if linear:
        part = terms(coef[:, rr, idx], d_part)
    else:
        part = _terms(log_abs[:, rr, idx], sign[:, rr, idx], log_c[:, None], s, d_part)
    table = np.nan_to_num(above[rr, idx + 1] + np.maximum(part, 0.0), nan=np.inf)
    table /= _energy_below(log_top, s)
    res, r = [], 0
    for ks in ks_list:
        res.append(table[r:r + len(ks)])
        r += len(ks)
    return res


def _fp_batch_log(t, log_abs, sign, log_c, s: float, log_lower, log_top: float, idx, ks_list) -> list[np.ndarray]:
    """:func:`_fp_batch` in log space (heavy tails: see ``_LOG_SPACE_BELOW``): every cell's Phi
    differences as logs (:func:`_log_phi_diff`), each term normalized by the energy below the
    top inside its exponential."""
    rows, nb = t.shape[1], t.shape[2]
    lg = _log_energy_below(log_top, s)
    pw = np.array([2.0, 1.0, 0.0])[:, None, None]  # power of c in the p = 0, 1, 2 terms
    sq = np.array([-2.0, -1.5, 0.0])[:, None, None] * s * s

    def terms(la, sg, lc, logd):
        # sum_p sign_p exp(log|c_p| + (2-p) log c + (p^2/2 - 2) s^2 + log d_p - log share)
        lab = np.concatenate((la, np.zeros_like(la[:1])))  # |c2| = 1
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            e = lab + pw * lc + sq + logd - lg
            v = np.where(sg != 0, sg * np.exp(np.where(sg != 0, e, -np.inf)), 0.0)
        return v.sum(axis=0)

    logd = _log_phi_diff(t[..., :-1], t[..., 1:])  # (3, R, ncell)
    full = terms(log_abs, sign, log_c[None, :, None], logd)
    above = np.zeros((rows, nb))
    above[:, :-1] = np.cumsum(full[:, ::-1], axis=1)[:, ::-1]
    rr = np.arange(rows)[:, None]
    ps = (np.arange(3.0) * s * s)[:, None, None]
    t_low = (log_lower[None, None, :] - ps) / s  # (3, 1, A)
    hi = t[:, rr, idx + 1]
    lo = np.minimum(np.maximum(t_low, t[:, rr, idx]), hi)
    part = terms(log_abs[:, rr, idx], sign[:, rr, idx], log_c[None, :, None], _log_phi_diff(lo, hi))
    table = np.nan_to_num(above[rr, idx + 1] + np.maximum(part, 0.0), nan=np.inf)
    res, r = [], 0
    for ks in ks_list:
        res.append(table[r:r + len(ks)])
        r += len(ks)
    return res


def fp_nmse(fmt: FPFormat, mu: float, sigma: float, scale_exp: int, rounding: str = "stochastic",
            lower: float = 0.0, upper: float = math.inf) -> float:
    """Return the NMSE that rounding the values above ``lower`` onto ``fmt`` adds.

    ``E[(Q(x) - x)^2; |x| > lower] / E[x^2]`` for ``|x| ~ Lognormal(mu, sigma)`` (natural log),
    where ``Q`` multiplies by ``2**-scale_exp``, rounds onto ``fmt``'s grid as gradcomp's quantizer
    does (subnormals, saturation to ``+-max``) and multiplies back. ``rounding="stochastic"``:
    inside a cell ``[lo, hi)`` the unbiased rounding has variance ``(y - lo)(hi - y)``
    (``lo = 0`` below the smallest subnormal); ``"nearest"``: the squared distance to the nearest
    grid point (below half the smallest subnormal: to 0); above ``max`` both saturate:
    ``(y - max)^2``. The denominator is the full ``E[x^2]`` (values at or below ``lower`` count
    there), so ``pruning_nmse(alpha) + fp_nmse(..., lower=alpha)`` is the total NMSE of pruning
    then rounding the kept values. ``upper``: the lognormal truncated at ``|x| <= upper`` (a
    shard's largest value), as in :func:`pruning_nmse`.

    Numerics: each cell's quadratic is integrated in closed form with partial moments of order
    0, 1, 2, Phi differences taken as upper-tail differences (see ``_upper``), coefficients
    assembled per scale (in log space when sigma is so large that they could overflow).
    The terms of a cell cancel down to its error, which loses about ``2 man_bits`` bits of the
    float64 precision (about 1e-11 relative for 8-bit formats). ``sigma == 0`` is evaluated as
    ``1e-9`` (the point mass).

    Args:
        fmt: value format.
        mu, sigma: natural-log lognormal parameters of ``|x|``.
        scale_exp: ``k``: values are multiplied by ``2**-k`` before rounding.
        rounding: ``"stochastic"`` or ``"nearest"``.
        lower: only values with ``|x| > lower`` are rounded (the pruning threshold), ``>= 0``.
        upper: largest ``|x|`` (``> 0``), ``inf`` for the untruncated lognormal.

    Example:
        >>> fmt = FPFormat(3, 2)  # max 28: at scale 2**1 it covers up to 56
        >>> e = fp_nmse(fmt, mu=0.0, sigma=1.0, scale_exp=1)
        >>> 0.0 < fp_nmse(fmt, 0.0, 1.0, 1, lower=1.0) < e < 0.01
        True
    """
    if not isinstance(fmt, FPFormat):
        raise ValueError(f"fmt must be a gradcomp.formats.FPFormat, got {type(fmt).__name__}")
    mu = _real(mu, "mu")
    s = _sigma(sigma)
    rounding = _rounding(rounding)
    if isinstance(scale_exp, bool) or not isinstance(scale_exp, (int, np.integer)):
        raise ValueError(f"scale_exp must be an int, got {scale_exp!r}")
    lower = _real(lower, "lower")
    if lower < 0:
        raise ValueError(f"lower must be >= 0, got {lower!r}")
    log_top = _log_top(mu, upper)
    with np.errstate(divide="ignore"):
        log_lower = np.array([math.log(lower) - mu if lower > 0 else -np.inf])
    return float(_fp_tables([fmt], [np.array([int(scale_exp)])], rounding, mu, s, log_lower,
                            log_top=log_top)[0][0, 0])


def prune_fp_nmse(alpha: float, fmt: FPFormat | None, mu: float, sigma: float, scale_exp: int = 0,
                  rounding: str = "stochastic", upper: float = math.inf) -> float:
    """Total NMSE of stochastic pruning at ``alpha`` then rounding the kept values onto ``fmt``.

    ``pruning_nmse(alpha) + fp_nmse(fmt, ..., lower=alpha)``: the two act on disjoint ranges
    (``|x| <= alpha`` and ``|x| > alpha``), the ``+-alpha`` survivors travel exactly, so their
    errors add. ``fmt=None`` means float32 values (rounding error neglected: 0). ``alpha = 0`` is
    dense FP. ``upper`` truncates the lognormal (see :func:`pruning_nmse`).
    """
    err = pruning_nmse(alpha, mu, sigma, upper) if alpha > 0 else 0.0
    if fmt is not None:
        err += fp_nmse(fmt, mu, sigma, scale_exp, rounding, lower=alpha, upper=upper)
    return float(err)


# ---------------------------------------------------------------------------------------------
# the search


# FP widths considered, dense and for PRUNE_FP values (FPFormat allows up to 16 bits).
DENSE_BITS = tuple(range(2, 17))
VALUE_BITS = DENSE_BITS + (32,)  # 32 = PRUNE (float32 values)
# Formats of more than 8 bits: only splits with 5+ mantissa bits (the per-binade error model is
# then accurate to about 1%) and 2..6 exponent bits.
_WIDE_MIN_MAN, _WIDE_MIN_EXP, _WIDE_MAX_EXP = 5, 2, 6


@lru_cache(maxsize=None)
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

    ``1 - S(z) = Phi(-z/s) + exp(s^2/2 - z + log Phi(z/s - s))`` (SPEC 2.1's closed form, the
    complement taken analytically so that high sparsities keep their relative precision).
    """
    z = np.asarray(z, dtype=np.float64)
    kept = special.ndtr(-z / s)
    with np.errstate(over="ignore", under="ignore"):
        nz = kept + np.exp(s * s / 2 - z + special.log_ndtr(z / s - s))
    return np.clip(nz, 0.0, 1.0), np.minimum(kept, nz)


def _prune_bits(n: int, nonzero: float, kept: float, value_bits: int) -> float:
    """Expected bits per element of the PRUNE / PRUNE_FP payload (:func:`prune_fp_wire_bits`)."""
    nonzero = min(max(float(nonzero), 0.0), 1.0)
    return 8.0 * prune_fp_wire_bits(n, nonzero, min(max(float(kept), 0.0), nonzero), value_bits) / n


def _dense_bits(n: int, bits: int) -> float:
    """Bits per element of the FP payload: ``8 (8 + ceil(n b / 8)) / n``."""
    return 8.0 * (HEADER_BYTES + (n * bits + 7) // 8) / n


@lru_cache(maxsize=1024)
def _grid_ends(s: float, top: float) -> tuple[float, float]:
    return tuple(math.log(lognormal.threshold_for_sparsity(p, 0.0, s)) for p in (_GRID_SPARSITY[0], top))


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

    Saturation is excluded (it biases the codec; FPCodec and PruneFPCodec raise the scale at
    encode time if it would happen), and above ``k_min`` a larger ``k`` only moves values from
    the normal binades, where the relative precision is the same everywhere, towards the
    subnormals: the NMSE hardly ever decreases. (Checked over every candidate format, sigma
    0.05..4, 1e3 and 1e6 samples, cutoffs up to ``2 sigma``: the minimum over ``k_min ..
    k_min + 39`` is at ``k_min`` in 99% of the cases and never more than 0.3% below it.)
    The scaled grid must stay inside float32 (decode tables are float32) and ``|k| <= 2**14``.
    """
    k_lo = max(min_scale_exp(amax, fmt), -_MAX_SCALE)
    k_hi = max(min(k_lo + _K_EXTRA, 127 - fmt.max_exponent, _MAX_SCALE), k_lo)
    return np.arange(k_lo, k_hi + 1)


def _best_scales(fmts, rounding: str, mu: float, s: float, log_lower: np.ndarray, amax: float):
    """Per format and cutoff: the minimum over :func:`_scales` of the FP NMSE, and that ``k``.

    Returns two (F, A) arrays. Formats wider than 8 bits use the per-binade error model.
    """
    ks_list = [_scales(f, amax) for f in fmts]
    tabs = _fp_tables(fmts, ks_list, rounding, mu, s, log_lower, exact=False,
                      log_top=_log_top_of(amax, mu))
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
    s = max(sigma, _MIN_SIGMA)
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
    log_top = _log_top_of(amax, mu)
    prune = _pruning_nmse_z(zs, s, log_top)
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
                   if b in bounds and float(_pruning_nmse_z(bounds[b], s, log_top)) < reference]
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
# bytes weigh least (see BudgetCodec's "Floor").
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

    Per shard (per :meth:`plan`, i.e. per refit), from the lognormal fit of ``|x|`` (SPEC 2),
    choose among

    * dense FP (FPCodec's payload) of 2..16 bits,
    * stochastic pruning at a threshold ``alpha`` with the kept values (``|x| > alpha``)
      FP-coded at 2..16 bits (PruneFPCodec's payload) or sent as float32 (PruneCodec's),
    * plain float32 (IdentityCodec's payload) once the budget affords ``32 + 64 / n`` bits,

    with every exponent/mantissa split up to 8 bits (wider formats: the splits with 5..10
    mantissa and 2..6 exponent bits) and the best power-of-two scale ``k``, the combination
    with the smallest expected normalized squared error ``NMSE = E[(Q(x) - x)^2] / E[x^2]``
    (module docstring: with stochastic rounding every operator is unbiased, so this is the
    variance they add) whose expected payload fits ``bits_per_element`` (headers included,
    amortized over the shard).

    Numerics: NMSE in closed form (:func:`pruning_nmse`, :func:`fp_nmse`: cell by cell for
    formats up to 8 bits; wider ones per binade, within about 1%) for the lognormal truncated
    at the shard's largest value. For each value width, the smallest ``alpha`` whose expected
    wire fits is solved continuously (regula falsi on :func:`prune_fp_wire_bits`); the optimum
    almost always sits there (a larger ``alpha`` prunes more), and the larger ``alpha`` of a
    grid of 20 sparsities from 1e-3 up to ``1 - 1e-6`` (at most ``1 - 2 / count``) are tried as
    well. The scale is the smallest ``k`` that does not saturate the shard's maximum, or up to
    2 above it if that is better (see ``_scales``). ``alpha`` is rounded up to float32 (it
    travels as one). A plan takes about 5 ms of CPU.

    Budget: in expectation under the fit; the binomial scatter of the counts (``O(b /
    sqrt(n))`` bits per element) and any departure of the data from a lognormal come on top.
    Floor: the cheapest candidate the search has is pruning to a nonzero fraction of ``1e-6``
    (the top of its sparsity grid) with 2-bit values, whose payload costs its 25 fixed bytes (8
    header + 17 PRUNE fields) plus about ``1e-6 * 34`` bits per element (sign, kept flag and
    Rice-coded position of each survivor). A shard of ``n`` elements therefore needs at least
    ``min(200 / n + 3.4e-5, 2 + 64 / n)`` bits per element (the second: dense 2-bit FP), and
    the smallest budget any shard can meet is that of the largest shard a payload can carry
    (``n = 2**31 - 1``, int32 counts): :data:`MIN_BUDGET_BITS` = 3.39e-5 bits per element.
    A smaller budget cannot be met by any shard, so the constructor rejects it
    (``ValueError``). Above it, a shard too small for the budget gets the cheapest candidate
    (dense 2-bit FP or pruning at the grid's top sparsity with 2-bit values: its error can
    be far above 1) and ``within_budget=False`` in its plan.

    Wire: FP, PRUNE_FP, PRUNE or IDENTITY payloads (the header's tag says which), decoded by
    :func:`gradcomp.codecs.decode_payload`; :meth:`wire_bytes` is ``None`` (data-dependent).
    Unbiased with ``rounding="stochastic"`` (nothing saturates: the delegate codecs raise the
    scale at encode time if a shard's maximum grew since its plan); ``"nearest"`` rounds the
    values to nearest (biased), pruning stays stochastic. Reduce side: :meth:`reduce_codec` is
    the codec itself (the mean is refitted and planned against the same budget).

    Args:
        bits_per_element: the budget, a finite number ``>= MIN_BUDGET_BITS`` (about 3.39e-5;
            bits per element, headers included).
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
        mu, s = fit.mu, max(fit.sigma, _MIN_SIGMA)
        log_top = _log_top_of(amax, mu)
        budget = self.bits_per_element
        if c.layout == "identity":
            bits = 8.0 * (HEADER_BYTES + 4 * n) / n
            return BudgetPlan("identity", None, None, 0, None, 0.0, 1.0, 0.0, bits, budget, n, True)
        if c.layout == "fp":
            err = _fp_tables([c.fmt], [np.array([c.scale_exp])], self.rounding, mu, s,
                             np.array([-np.inf]), exact=False, log_top=log_top)[0][0, 0]
            bits = _dense_bits(n, c.fmt.bits)
            return BudgetPlan("fp", FPPlan(c.fmt, c.scale_exp, None), c.fmt, c.scale_exp, None, 0.0, 1.0,
                              float(err), bits, budget, n, ok and bits <= budget)
        alpha = min(_f32_up(math.exp(mu + c.z)), float(np.finfo(np.float32).max))
        z = math.log(alpha) - mu
        nz, kept = (float(v) for v in _fractions(z, s))
        sparsity = min(max(1.0 - nz, 1e-12), 1.0 - 1e-12)
        err = float(_pruning_nmse_z(z, s, log_top))
        vb = 32
        values = None
        if c.layout == "prune_fp":
            vb = c.fmt.bits
            err += float(_fp_tables([c.fmt], [np.array([c.scale_exp])], self.rounding, mu, s,
                                    np.array([z]), exact=False, log_top=log_top)[0][0, 0])
            values = FPPlan(c.fmt, c.scale_exp, None)
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

    def wire_bytes(self, numel: int) -> None:
        """``None``: the layout and its size depend on the data (see :meth:`expected_wire_bytes`)."""
        return None

    def expected_wire_bytes(self, numel: int, fit: lognormal.LognormalFit | None) -> float:
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
