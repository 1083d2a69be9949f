"""The error model: expected squared error of the codecs' operators on lognormal data.

One place for the mathematics every planner uses: :class:`~gradcomp.codecs.dense.FPCodec`'s
``"mse"`` criterion and :class:`~gradcomp.codecs.budget.BudgetCodec`'s search both call
:func:`fp_nmse` / :func:`pruning_nmse` (and the batched tables behind them).

Criterion
---------
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import special

from gradcomp.numerics import lognormal
from gradcomp.numerics.formats import FPFormat

__all__ = ["MIN_SIGMA", "fp_nmse", "fp_tables", "log_top_of", "prune_fp_nmse", "pruning_nmse", "pruning_nmse_z"]

_LN2 = math.log(2.0)
_SQRT2 = math.sqrt(2.0)
_ROUNDING = lognormal.ROUNDING_MODES
# sigma below this is evaluated as this (the point-mass limit; the Phi differences saturate to
# 0/1 and every formula stays finite).
MIN_SIGMA = 1e-9


# ---------------------------------------------------------------------------------------------
# validation


def _sigma(value) -> float:
    return max(lognormal._sigma(value), MIN_SIGMA)


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
# pruning


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


def log_top_of(amax: float, mu: float) -> float:
    """``ln(amax) - mu``, at least 0: a sample's maximum is never below its geometric mean
    ``e^mu``, so a negative value is float rounding (it would cut a point mass away)."""
    return max(math.log(amax) - mu, 0.0)


def pruning_nmse_z(z: np.ndarray, s: float, log_top: float = math.inf) -> np.ndarray:
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

    ``E[(T(x) - x)^2] / E[x^2]`` with ``T`` the unbiased stochastic pruning of
    :mod:`gradcomp.numerics.pruning` and ``|x| ~ Lognormal(mu, sigma)`` (natural log). An entry
    with ``|x| <= alpha`` becomes
    ``sign(x) alpha`` with probability ``|x|/alpha``, else 0: variance ``|x| (alpha - |x|)``;
    entries above ``alpha`` are untouched. In closed form (``z = ln alpha - mu``)::

        NMSE = e^(z - 3 sigma^2/2) Phi(z/sigma - sigma) - Phi(z/sigma - 2 sigma)

    evaluated without cancellation (see ``pruning_nmse_z``). ``upper``: the lognormal
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
    out = pruning_nmse_z(z, s, log_top)
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------------------------------------
# FP rounding of the kept values (exact for the real format)


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


def fp_tables(fmts, ks_list, rounding: str, mu: float, s: float, log_lower: np.ndarray,
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
        raise ValueError(f"fmt must be a gradcomp.numerics.formats.FPFormat, got {type(fmt).__name__}")
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
    return float(fp_tables([fmt], [np.array([int(scale_exp)])], rounding, mu, s, log_lower,
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
