"""The error model: expected error of the codecs' operators on (truncated) lognormal data.

One place for the mathematics every planner uses. Two error kinds of rounding onto a real
:class:`FPFormat` are integrated here, by one integrator (:func:`fp_tables`):

* ``"squared"``: the normalized expected squared error, for
  :class:`~gradcomp.codecs.dense.FPCodec`'s ``"mse"`` criterion and
  :class:`~gradcomp.codecs.budget.BudgetCodec`'s search (:func:`fp_nmse`, :func:`pruning_nmse`,
  :func:`prune_fp_nmse`);
* ``"relative"``: the mean relative error ``E[|Q(x) - x| / |x|]`` over the rounded range, for the
  format choice of :mod:`gradcomp.numerics.lognormal` (:func:`relative_errors`) and
  :func:`~gradcomp.codecs.sparse.tail_fp_plan` (the kept tail of pruning).

Squared error
-------------
All our operators are unbiased with ``rounding="stochastic"`` (stochastic pruning, stochastic
rounding, and no saturation: see below), so what hurts SGD is the variance they add. The
criterion is the normalized expected squared error ::

    NMSE = E[(Q(x) - x)^2] / E[x^2],     |x| ~ Lognormal(mu, sigma)   (natural log)

which is additive over disjoint value ranges: pruning acts on ``|x| <= alpha`` and adds
``|x| (alpha - |x|)`` (:func:`pruning_nmse`); FP rounding acts on the kept values
``|x| > alpha``, scaled by ``2**-k``, and adds ``(y - lo)(hi - y)`` inside a grid cell ``[lo, hi)``
(stochastic) or the squared distance to the nearest grid point (nearest), plus ``(y - max)^2``
above the saturation point (:func:`fp_nmse`).

The shard's largest value ``max|x|`` is known (:class:`~gradcomp.codecs.base.ShardFit` carries
it; else the expected maximum of ``count`` samples is used). The codec never saturates it (as
FPCodec and PruneFPCodec, which raise the scale at encode time if needed: a saturated value is
biased), and the model is the lognormal truncated there: nothing lies above ``max|x|``, and
``E[x^2]`` is the energy below it. This matters for heavy tails: ``E[x^2]`` is carried by the
largest values (``ln|x|`` around ``mu + 2 sigma^2``, 4 standard deviations up at sigma 2), and an
untruncated model would spend precision on values no shard of realistic size contains. The
NMSE-optimal scale therefore puts the format's top just above the data's, and pruning the many
small values is cheap: this is the trade for the variance of the summed gradient.

Relative error
--------------
``E[|Q(x) - x| / |x| ; lower < |x| <= upper] / P(lower < |x| <= upper)``: the mean relative
error over the rounded range (the whole lognormal, or the tail that pruning keeps). Inside a
cell the pointwise error is ``|q - y| / y`` (nearest, ``q`` the nearest grid point) or
``2 (y - lo)(hi - y) / ((hi - lo) y)`` (stochastic, unbiased), ``1 - max/y`` above ``max``.

Numerics
--------
Both kinds are the same computation: inside each cell of the format's grid the pointwise error
is exactly a polynomial ``sum_p c_p y^p`` (powers 0, 1, 2 for squared; -1, 0, 1 for relative),
integrated in closed form with the lognormal partial moments ``E[u^p; a < u < b] =
exp(p^2 s^2/2) [Phi((ln b - p s^2)/s) - Phi((ln a - p s^2)/s)]`` for ``ln u ~ N(0, s^2)``, cell by
cell, no sampling or quadrature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import special

from gradcomp.numerics.checks import check_real, check_rounding, check_sigma
from gradcomp.numerics.formats import FPFormat

__all__ = ["ERROR_KINDS", "MIN_SIGMA", "TIE_ATOL", "TIE_RTOL", "format_grid", "fp_nmse", "fp_tables", "log_top_of",
           "prune_fp_nmse", "pruning_nmse", "pruning_nmse_z", "relative_errors"]

_LN2 = math.log(2.0)
_SQRT2 = math.sqrt(2.0)
ERROR_KINDS = ("squared", "relative")
# sigma below this is evaluated as this by the squared-error functions (the point-mass limit; the
# Phi differences saturate to 0/1 and every formula stays finite).
MIN_SIGMA = 1e-9
# Planners that compare errors count values within TIE_RTOL * best + TIE_ATOL of the best as
# ties: above the evaluation noise of the closed forms (about 4**man_bits * 2e-14 relative, up
# to ~2e-8 at 10 mantissa bits), so the noise never picks among equally good candidates; the
# absolute floor covers errors that are zero up to rounding (a point mass on a grid point).
TIE_RTOL = 1e-6
TIE_ATOL = 1e-14


# ---------------------------------------------------------------------------------------------
# validation


def _sigma(value) -> float:
    return max(check_sigma(value), MIN_SIGMA)


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
    """``log(Phi(b) - Phi(a))`` for ``a <= b`` (``-inf`` where ``a == b`` or the interval lies
    beyond float64's tails), to full relative precision in both tails (log_ndtr of the tail
    nearer to the interval)."""
    with np.errstate(all="ignore"):
        upper = a > 0
        la = np.where(upper, special.log_ndtr(-b), special.log_ndtr(a))
        lb = np.where(upper, special.log_ndtr(-a), special.log_ndtr(b))
        out = lb + np.log(-np.expm1(la - lb))
    return np.where((b > a) & (lb > -np.inf), out, -np.inf)


def _log_cell_masses(t: np.ndarray) -> np.ndarray:
    """:func:`_log_phi_diff` of consecutive boundaries ``t[..., i], t[..., i+1]`` (ascending along
    the last axis), with each tail's ``log_ndtr`` evaluated once per boundary."""
    with np.errstate(all="ignore"):
        log_p, log_q = special.log_ndtr(t), special.log_ndtr(-t)
        upper = t[..., :-1] > 0
        la = np.where(upper, log_q[..., 1:], log_p[..., :-1])
        lb = np.where(upper, log_q[..., :-1], log_p[..., 1:])
        out = lb + np.log(-np.expm1(la - lb))
    return np.where((t[..., 1:] > t[..., :-1]) & (lb > -np.inf), out, -np.inf)


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
    upper = check_real(upper, "upper") if upper != math.inf else math.inf
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
    mu = check_real(mu, "mu")
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
# FP rounding: the format's grid and its error integrand, cell by cell


def format_grid(fmt: FPFormat) -> np.ndarray:
    """Return the ascending non-negative values of ``fmt`` as float64 (``fmt.code_values()``).

    ``grid[0] = 0``, then the subnormals, the normal binades and ``grid[-1] = fmt.max``; one
    entry per non-negative code, computed vectorized (``2**(bits-1)`` entries).

    Example:
        >>> format_grid(FPFormat(2, 1)).tolist()
        [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    """
    m = fmt.man_bits
    codes = np.arange(fmt.max_code + 1, dtype=np.int64)
    efield = codes >> m
    significand = (codes & ((1 << m) - 1)) + np.where(efield > 0, 1 << m, 0)
    exponent = (np.maximum(efield, 1) - fmt.bias - m).astype(np.int32)
    return np.ldexp(significand.astype(np.float64), exponent)


# Per error kind: the powers p of the cell polynomials sum_p c_p y^p (three each), the degree of
# the error in the scale (squared error scales with c^2, relative error not at all), and the
# order of the moment the squared error is normalized by (E[u^2]).
_KINDS = {"squared": ((0, 1, 2), 2, 2), "relative": ((-1, 0, 1), 0, 0)}


def _kind(value) -> str:
    if value not in ERROR_KINDS:
        raise ValueError(f"kind must be one of {ERROR_KINDS}, got {value!r}")
    return value


@dataclass(frozen=True)
class _Cells:
    """A format's error integrand, cell by cell, in format units (positive half-line).

    Cell ``i`` spans ``[bounds[i], bounds[i+1])`` and its pointwise error is the polynomial
    ``sum_j c_j y^(p_j)`` (exactly, for every ``y`` in it), ``p`` the kind's powers; the last
    cell is ``[max, inf)`` (saturation). Coefficients are kept as ``log|c_j|`` and
    ``sign(c_j)``.
    """

    log_bounds: np.ndarray  # (ncell + 1,), -inf first, +inf last
    log_abs: np.ndarray  # (3, ncell): log|c_j|
    sign: np.ndarray  # (3, ncell): sign(c_j)


@lru_cache(maxsize=256)
def _cells(fmt: FPFormat, rounding: str, kind: str = "squared") -> _Cells:
    grid = format_grid(fmt)  # ascending, grid[0] = 0, grid[-1] = max
    top = grid[-1]
    if rounding == "stochastic":
        # [lo, hi): rounds up with probability (y - lo)/(hi - lo); above max it saturates.
        lo, hi = grid[:-1], grid[1:]
        bounds = np.append(grid, np.inf)
        if kind == "squared":
            # E(Q - y)^2 = (y - lo)(hi - y) = -lo hi + (lo + hi) y - y^2; saturated (y - max)^2.
            coefs = (np.append(-lo * hi, top * top), np.append(lo + hi, -2.0 * top),
                     np.append(-np.ones_like(lo), 1.0))
        else:
            # E|Q - y|/y = 2 (y - lo)(hi - y)/((hi - lo) y)
            #            = (2/w) (-lo hi / y + (lo + hi) - y), w = hi - lo; saturated 1 - max/y.
            w = hi - lo
            coefs = (np.append(-2.0 * lo * hi / w, -top), np.append(2.0 * (lo + hi) / w, 1.0),
                     np.append(-2.0 / w, 0.0))
    else:
        # Half cells around each grid point q: [0, g1/2) -> 0, then [mid, q) and [q, mid'); the
        # top half cell [max, inf) is the saturation range, the same expression with q = max.
        g = grid[1:]
        mids = (grid[:-1] + grid[1:]) / 2.0
        bounds = np.empty(2 * g.size + 2)
        bounds[0] = 0.0
        bounds[1:-1:2] = mids
        bounds[2:-1:2] = g
        bounds[-1] = np.inf
        q = np.concatenate(([0.0], np.repeat(g, 2)))
        if kind == "squared":
            # (y - q)^2 = q^2 - 2 q y + y^2
            coefs = (q * q, -2.0 * q, np.ones_like(q))
        else:
            # |q - y|/y = sgn (q/y - 1): sgn = +1 below q, -1 above it (and on [0, g1/2))
            sgn = np.concatenate(([-1.0], np.tile([1.0, -1.0], g.size)))
            coefs = (sgn * q, -sgn, np.zeros_like(q))
    c = np.stack(coefs)
    with np.errstate(divide="ignore"):
        log_bounds = np.log(bounds)
        log_abs = np.log(np.abs(c))
    sign = np.sign(c)
    for a in (log_bounds, log_abs, sign):
        a.setflags(write=False)
    return _Cells(log_bounds, log_abs, sign)


_EXACT_PREFIX_CELLS = 16  # grid cells near zero that the per-binade model keeps exact


@lru_cache(maxsize=256)
def _binade_cells(fmt: FPFormat, rounding: str) -> _Cells:
    """Per-binade approximation of the squared-error :func:`_cells` for wide formats (used by the
    search only).

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
    exact = _cells(fmt, rounding, "squared")
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
    none = np.full(spacing.size, -np.inf)
    with np.errstate(divide="ignore"):
        log_bounds = np.concatenate((exact.log_bounds[:n_pre], np.log(starts), [math.log(top), np.inf]))
        approx_abs = np.stack((np.log(c * spacing * spacing), none, none))
        sat_abs = np.log(np.abs(np.array([[top * top], [-2.0 * top], [1.0]])))
    log_abs = np.concatenate((exact.log_abs[:, :n_pre], approx_abs, sat_abs), axis=1)
    approx_sign = np.stack((np.ones(spacing.size), np.zeros(spacing.size), np.zeros(spacing.size)))
    sign = np.concatenate((exact.sign[:, :n_pre], approx_sign, np.array([[1.0], [-1.0], [1.0]])), axis=1)
    for a in (log_bounds, log_abs, sign):
        a.setflags(write=False)
    return _Cells(log_bounds, log_abs, sign)


def _terms(log_abs: np.ndarray, sign: np.ndarray, log_f: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Normalized contribution ``sum_j c_j f_j d_j`` of cells, assembled in log space.

    ``log_abs``/``sign``: (3, ...) coefficients; ``log_f``: (3, ...) log of the per-row factors
    ``c^(D - p) exp(p^2 s^2/2 - q^2 s^2/2)`` (broadcast; see :func:`_batch`); ``d``: (3, ...)
    Phi differences of the cell. A coefficient can overflow where its moment underflows (their
    product is at most about the cell's share of the normalizer), hence ``exp(log|c| + log f +
    log d)``.
    """
    with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
        e = log_abs + log_f + np.log(d)
        return np.sum(np.where(sign != 0, sign * np.exp(e), 0.0), axis=0)


def fp_tables(fmts, ks_list, rounding: str, mu: float, s: float, log_lower: np.ndarray,
              exact: bool = True, log_top: float = math.inf, kind: str = "squared") -> list[np.ndarray]:
    """Error of rounding the values above each cutoff onto each format: one (K_i, A) table per format.

    The one integrator of format errors under a truncated lognormal ``|x| = e^mu u``,
    ``ln u ~ N(0, s^2)`` (natural log), ``s > 0``; every other function of this module that
    rounds onto a format calls it. ``fmts[i]`` is evaluated at the scales ``ks_list[i]`` (int
    array; values are multiplied by ``2**-k`` before rounding) for the cutoffs ``log_lower``
    ((A,) array of ``ln(lower) - mu``, ``-inf`` for none): only ``lower < |x|`` is rounded;
    ``log_top = ln(upper) - mu``: nothing lies above ``upper`` (``inf``: untruncated).
    ``kind`` (:data:`ERROR_KINDS`):

    * ``"squared"``: ``E[(Q(x) - x)^2; lower < |x| <= upper] / E[x^2; |x| <= upper]`` (NMSE;
      the denominator counts the values below ``lower`` too, so pruning's NMSE adds to it);
    * ``"relative"``: ``E[|Q(x) - x| / |x| ; lower < |x| <= upper] / P(lower < |x| <= upper)``,
      the mean relative error of the rounded values (NaN where that range is empty).

    ``exact=False`` uses the per-binade model (:func:`_binade_cells`, squared only, within about
    1% for 5+ mantissa bits) for formats of more than 8 bits.

    Numerics: each cell's polynomial is integrated with the lognormal partial moments (module
    docstring). Every cell is integrated once per (format, k) row, the cells above a cutoff are
    summed by a reverse cumulative sum, and only the cell holding the cutoff is integrated again
    from the cutoff up; rows are evaluated in a few batches (formats with similar cell counts
    together). Squared error: Phi differences as upper-tail differences (``_upper``), in log
    space when the energy below the top is under 1e-8 (heavy tails) or the coefficients could
    overflow. Relative error: always log space (every Phi difference from ``log_ndtr`` of the
    tail nearer to the cell), so cells far in either tail keep their relative precision. The
    terms of a cell cancel down to its error, which costs about ``2 man_bits`` bits of float64
    precision (about 1e-11 relative for 8-bit formats).

    Example:
        >>> fmt = FPFormat(3, 2)
        >>> sq, rel = (fp_tables([fmt], [np.array([-1, 0])], "nearest", 0.0, 1.0, np.array([-np.inf]),
        ...                      kind=k)[0] for k in ERROR_KINDS)
        >>> sq.shape, round(float(rel[0, 0]), 4)  # rows: k = -1, 0; one cutoff column
        ((2, 1), 0.0467)
    """
    kind = _kind(kind)
    if kind == "relative":
        exact = True
    cells = [_binade_cells(f, rounding) if (not exact and f.bits > 8) else _cells(f, rounding, kind)
             for f in fmts]
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(cells):
        if len(ks_list[i]):
            groups.setdefault(max(6, (c.sign.shape[1] - 1).bit_length()), []).append(i)
    out = [np.empty((0, log_lower.size))] * len(fmts)
    for group in groups.values():
        tabs = _batch([cells[i] for i in group], [ks_list[i] for i in group], kind, mu, s, log_lower, log_top)
        for i, t in zip(group, tabs):
            out[i] = t
    return out


# Above this |log| a row factor c^(2-p) e^((p^2/2-2) s^2) times a coefficient could leave
# float64; such batches (sigma beyond about 8) take the log-space path of _terms.
_LINEAR_LOG_LIMIT = 600.0


def _batch(cells, ks_list, kind: str, mu: float, s: float, log_lower: np.ndarray,
           log_top: float = math.inf) -> list[np.ndarray]:
    """:func:`fp_tables` for one batch of formats (``cells``) and their scales."""
    powers, degree, norm_order = _KINDS[kind]
    nb = max(c.log_bounds.size for c in cells)
    rows = sum(len(ks) for ks in ks_list)
    na = log_lower.size
    lb = np.full((rows, nb), np.inf)  # boundaries in u units (log)
    log_abs = np.full((3, rows, nb - 1), -np.inf)
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
    pw = np.array(powers, dtype=np.float64)[:, None, None]
    ps = pw * s * s
    with np.errstate(invalid="ignore"):
        t = (lb[None] - ps) / s  # (3, R, nb)
    # Per-row factors c^(D - p) exp((p^2 - q^2) s^2 / 2) of the terms (log), (3, R, 1): the
    # moment E[u^p; cell] = exp(p^2 s^2 / 2) d_p relative to the normalizing E[u^q].
    with np.errstate(invalid="ignore"):
        log_f = (degree - pw) * log_c[None, :, None] + (pw * pw - norm_order ** 2) / 2.0 * s * s
    log_f = np.where(pw == degree, (pw * pw - norm_order ** 2) / 2.0 * s * s, log_f)  # c^0 = 1
    if kind == "relative" or _log_space(log_top, s):
        return _batch_log(t, ps, log_abs, sign, log_f, kind, s, log_lower, log_top, idx, ks_list)
    up = _upper(t)
    d = np.maximum(up[..., :-1] - up[..., 1:], 0.0)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        worst = np.max(np.where(sign != 0, log_abs + log_f, -np.inf), initial=-np.inf)
    linear = bool(np.abs(log_f).max() < _LINEAR_LOG_LIMIT and worst < _LINEAR_LOG_LIMIT)
    if linear:
        with np.errstate(under="ignore"):
            coef = sign * np.exp(log_abs) * np.exp(log_f)  # (3, R, ncell)

        def terms(cf, dd):
            return cf[0] * dd[0] + cf[1] * dd[1] + cf[2] * dd[2]

        full = terms(coef, d)
    else:
        full = _terms(log_abs, sign, log_f, d)  # (R, ncell)
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
        part = _terms(log_abs[:, rr, idx], sign[:, rr, idx], log_f, d_part)
    table = np.nan_to_num(above[rr, idx + 1] + np.maximum(part, 0.0), nan=np.inf)
    table /= _energy_below(log_top, s)
    return _split_rows(table, ks_list)


def _split_rows(table: np.ndarray, ks_list) -> list[np.ndarray]:
    res, r = [], 0
    for ks in ks_list:
        res.append(table[r:r + len(ks)])
        r += len(ks)
    return res


def _batch_log(t, ps, log_abs, sign, log_f, kind: str, s: float, log_lower, log_top: float, idx,
               ks_list) -> list[np.ndarray]:
    """:func:`_batch` in log space: every cell's Phi differences as logs (:func:`_log_phi_diff`),
    each term divided by the normalizer inside its exponential (the energy below the top, for
    squared error; the largest probability of a cutoff's range, for relative error, the other
    columns rescaled at the end)."""
    rows, nb = t.shape[1], t.shape[2]
    if kind == "squared":
        log_norm = np.zeros(log_lower.size)
        shift = _log_energy_below(log_top, s)
    else:
        if log_top == math.inf and np.all(log_lower == -np.inf):
            log_norm = np.zeros(log_lower.size)  # the whole lognormal: probability 1
        else:
            log_norm = _log_phi_diff(log_lower / s, np.full(log_lower.size, log_top / s))
        shift = float(np.max(log_norm)) if np.isfinite(np.max(log_norm)) else 0.0
        log_norm = log_norm - shift

    def terms(la, sg, logd):
        # sum_j sign_j exp(log|c_j| + log f_j + log d_j - shift)
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            e = la + log_f + logd - shift
            v = np.where(sg != 0, sg * np.exp(np.where(sg != 0, e, -np.inf)), 0.0)
        return v.sum(axis=0)

    logd = _log_cell_masses(t)  # (3, R, ncell)
    full = terms(log_abs, sign, logd)
    above = np.zeros((rows, nb))
    above[:, :-1] = np.cumsum(full[:, ::-1], axis=1)[:, ::-1]
    rr = np.arange(rows)[:, None]
    if np.all(log_lower == -np.inf):  # no cutoff: every column is the sum over all cells
        part = np.repeat(full[:, :1], log_lower.size, axis=1)
    else:
        hi = t[:, rr, idx + 1]
        t_low = (log_lower[None, None, :] - ps) / s  # (3, 1, A)
        lo = np.minimum(np.maximum(t_low, t[:, rr, idx]), hi)
        part = terms(log_abs[:, rr, idx], sign[:, rr, idx], _log_phi_diff(lo, hi))
    table = np.nan_to_num(above[rr, idx + 1] + np.maximum(part, 0.0), nan=np.inf)
    if kind == "relative":
        # A relative error is >= 0: the cells' cancellation can leave a few ulps below (a point
        # mass on a grid point).
        with np.errstate(over="ignore", invalid="ignore"):
            table = np.maximum(table, 0.0) * np.exp(-log_norm)[None, :]
    return _split_rows(table, ks_list)


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
    mu = check_real(mu, "mu")
    s = _sigma(sigma)
    rounding = check_rounding(rounding)
    if isinstance(scale_exp, bool) or not isinstance(scale_exp, (int, np.integer)):
        raise ValueError(f"scale_exp must be an int, got {scale_exp!r}")
    lower = check_real(lower, "lower")
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


# ---------------------------------------------------------------------------------------------
# relative error


def _pointwise_relative_errors(grid: np.ndarray, y: np.ndarray, rounding: str) -> np.ndarray:
    """Relative error ``E|Q(y) - y| / y`` at points ``y > 0`` (the ``sigma == 0`` case)."""
    y = np.asarray(y, dtype=np.float64)
    top = grid[-1]
    i = np.clip(np.searchsorted(grid, y, side="right") - 1, 0, grid.size - 2)
    lo, hi = grid[i], grid[i + 1]
    with np.errstate(invalid="ignore", divide="ignore"):  # y = 0 / inf (exp under/overflow)
        if rounding == "nearest":
            # Ties are equally far from both neighbours: the tie rule does not change the error.
            err = np.where(y > 0, np.minimum(y - lo, hi - y) / y, 1.0)
        else:
            err = np.where(y > 0, 2.0 * (y - lo) * (hi - y) / ((hi - lo) * y), 2.0)
        return np.where(y >= top, 1.0 - top / y, err)


def relative_errors(fmt: FPFormat, mu: float, sigma: float, scale_exps, rounding: str = "nearest",
                    lower: float = 0.0, upper: float = math.inf) -> np.ndarray:
    """Return the mean relative error of rounding onto ``fmt``, one value per scale.

    ``E[|Q(x) - x| / |x| ; lower < |x| <= upper] / P(lower < |x| <= upper)`` for
    ``|x| ~ Lognormal(mu, sigma)`` (natural log), where ``Q`` multiplies by ``2**-k``, rounds
    onto ``fmt``'s grid as gradcomp's quantizer does (subnormals, saturation to ``+-max``: error
    ``1 - max/y``) and multiplies back. ``"nearest"``: ``|q - y| / y`` (values below half the
    smallest subnormal become 0: error 1); ``"stochastic"`` (unbiased): ``2 (y - lo)(hi - y) /
    ((hi - lo) y)`` between neighbours ``lo < hi`` (``lo = 0`` below the smallest subnormal).
    ``lower = 0, upper = inf`` is the whole lognormal; a cutoff ``lower`` gives the mean over the
    values that pruning keeps. Dimensionless; does not depend on the sign of ``x``.

    Numerics: :func:`fp_tables` with ``kind="relative"`` (closed form, log space; relative
    accuracy about ``4**man_bits * 2e-14``). ``sigma == 0`` evaluates the point mass
    ``|x| = e^mu`` exactly (NaN if it lies outside ``(lower, upper]``).

    Args:
        fmt: value format.
        mu, sigma: natural-log lognormal parameters of ``|x|``, ``sigma >= 0``.
        scale_exps: int or int array of scales ``k``.
        rounding: ``"nearest"`` or ``"stochastic"``.
        lower, upper: the rounded range, ``0 <= lower < upper`` (``upper = inf``: untruncated).

    Returns:
        float64 array of ``scale_exps``' shape (1-D for a scalar).

    Example:
        >>> fmt = FPFormat(3, 2)
        >>> [round(float(e), 4) for e in relative_errors(fmt, 0.0, 1.0, [-1, 0], "nearest")]
        [0.0467, 0.0505]
        >>> round(float(relative_errors(fmt, 0.0, 1.0, 0, "nearest", lower=1.0)[0]), 4)  # |x| > 1 only
        0.0463
    """
    if not isinstance(fmt, FPFormat):
        raise ValueError(f"fmt must be a gradcomp.numerics.formats.FPFormat, got {type(fmt).__name__}")
    mu = check_real(mu, "mu")
    sigma = check_sigma(sigma)
    rounding = check_rounding(rounding)
    ks = np.atleast_1d(np.asarray(scale_exps))
    if ks.dtype.kind not in "iu":
        raise ValueError(f"scale_exps must be ints, got {scale_exps!r}")
    lower = check_real(lower, "lower")
    if upper != math.inf:
        upper = check_real(upper, "upper")
    if not 0.0 <= lower < upper:
        raise ValueError(f"need 0 <= lower < upper, got lower={lower!r}, upper={upper!r}")
    if sigma == 0.0:
        with np.errstate(over="ignore"):  # exp(m) = inf saturates: error 1
            err = _pointwise_relative_errors(format_grid(fmt), np.exp(mu - ks.astype(np.float64) * _LN2), rounding)
        inside = (lower == 0.0 or math.log(lower) < mu) and (upper == math.inf or mu <= math.log(upper))
        return err if inside else np.full(ks.shape, np.nan)
    with np.errstate(divide="ignore"):
        log_lower = np.array([math.log(lower) - mu if lower > 0 else -np.inf])
    log_top = math.log(upper) - mu if upper < math.inf else math.inf
    return fp_tables([fmt], [ks.reshape(-1)], rounding, mu, sigma, log_lower, log_top=log_top,
                     kind="relative")[0][:, 0].reshape(ks.shape)

