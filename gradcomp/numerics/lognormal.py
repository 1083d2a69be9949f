"""Lognormal model of gradient magnitudes: fitting, goodness of fit, pruning threshold, FP split.

Implements the analysis of Chmiel et al., "Neural gradients are near-lognormal: improved
quantized and sparse training" (ICLR 2021; "the seed paper" below) with one convention throughout:

* A fit is of ``|x|`` over the nonzero finite entries, with **natural-log** parameters
  ``mu = mean(ln|x|)`` and ``sigma = std(ln|x|)`` (population std, ``ddof=0``) -- the
  parameterization of ``scipy.stats.lognorm(s=sigma, scale=exp(mu))``. Functions that need
  log2 units (the seed's FP formula) convert inside: ``sigma2 = sigma / ln 2``.
* ``sigma == 0`` (all magnitudes equal) is accepted everywhere as the point-mass limit.

Contents: the fit and the seed's KS comparison (:func:`fit`, :func:`ks_statistic`); the expected
sparsity of stochastic pruning and its inverse (:func:`sparsity_for_threshold`,
:func:`threshold_for_sparsity`); the seed's closed-form FP error as published
(:func:`expected_relative_error`); the exact relative error of a real :class:`FPFormat`, its
best scale and exponent/mantissa split (:func:`exact_relative_error`, :func:`scale_exponent`,
:func:`optimal_exp_bits`, :func:`split_table`; the errors are integrated by
:func:`gradcomp.numerics.error_model.relative_errors`). Nothing here keeps state or draws from a
global RNG; random subsampling takes a ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from scipy import optimize, special, stats

from gradcomp.numerics.checks import ROUNDING_MODES, check_real, check_rounding, check_sigma
from gradcomp.numerics.error_model import TIE_ATOL, TIE_RTOL, relative_errors
from gradcomp.numerics.formats import MAX_EXP_BITS, MAX_MAN_BITS, FPFormat

__all__ = [
    "LognormalFit",
    "KSResult",
    "SplitRow",
    "ROUNDING_MODES",
    "fit",
    "subsample",
    "ks_statistic",
    "sparsity_for_threshold",
    "threshold_for_sparsity",
    "expected_relative_error",
    "exact_relative_error",
    "scale_exponent",
    "optimal_exp_bits",
    "split_table",
    "candidate_formats",
]

KS_DISTRIBUTIONS = ("normal", "lognormal")
SPLIT_METHODS = ("exact", "closed_form")

_LN2 = math.log(2.0)
# scale_exponent searches k0 - _SCALE_WINDOW .. k0 + _SCALE_WINDOW around the centring scale k0:
# the nearest-rounding optimum lies within it (benchmarks/results/codec_error.md, "Planner design
# checks"). Stochastic rounding's optimum can be a scale that saturates most of the data, far
# outside; it is deliberately not searched for (saturation is biased).
_SCALE_WINDOW = 6
_MAX_CLOSED_FORM_MAN_BITS = 23
_MIN_TOTAL_BITS, _MAX_TOTAL_BITS = 2, 16
_MAX_ABS_MU = 1e4


# ---------------------------------------------------------------------------------------------
# validation helpers


def _mu(value) -> float:
    out = check_real(value, "mu")
    # ln|x| of any float64 lies in [-745, 710]; the bound only keeps scale exponents small ints.
    if abs(out) > _MAX_ABS_MU:
        raise ValueError(
            f"mu must be a finite number with |mu| <= {_MAX_ABS_MU:g} (natural log), got {value!r}"
        )
    return out


def _int(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int in {lo}..{hi}, got {value!r}")
    out = int(value)
    if not lo <= out <= hi:
        raise ValueError(f"{name} must be an int in {lo}..{hi}, got {value!r}")
    return out


def _format(value) -> FPFormat:
    if not isinstance(value, FPFormat):
        raise ValueError(f"fmt must be a gradcomp.numerics.formats.FPFormat, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# fitting and goodness of fit


@dataclass(frozen=True)
class LognormalFit:
    """Lognormal fit of ``|x|``: natural-log ``mu``, ``sigma`` (ddof=0) and the entries used."""

    mu: float
    sigma: float
    count: int

    @property
    def sigma2(self) -> float:
        """``sigma`` in log2 units (``sigma / ln 2``), the seed's FP-formula parameter."""
        return self.sigma / _LN2

    def scipy(self):
        """Return the frozen ``scipy.stats.lognorm(s=sigma, scale=exp(mu))`` of this fit."""
        return stats.lognorm(s=self.sigma, scale=math.exp(self.mu))


class KSResult(NamedTuple):
    """Kolmogorov-Smirnov statistic and p-value; unpacks as ``stat, p = ks_statistic(...)``."""

    statistic: float
    pvalue: float


def _check_array_like(x, what: str) -> None:
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise ValueError(f"{what}: complex tensors are not supported, got dtype {x.dtype}")
    elif not isinstance(x, np.ndarray):
        raise ValueError(f"{what}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    elif np.iscomplexobj(x):
        raise ValueError(f"{what}: complex arrays are not supported, got dtype {x.dtype}")


def fit(x) -> LognormalFit:
    """Fit a lognormal to ``|x|``: ``mu = mean(ln|x|)``, ``sigma = std(ln|x|)``.

    ``x``: a torch tensor (any device) or numpy array, any shape, any float dtype (float16,
    bfloat16 and ml_dtypes types are widened exactly). Numerics: natural log; zeros and
    non-finite entries are ignored; logs and moments in float64 (population std, ``ddof=0``;
    ``torch.std_mean`` on the tensor's device, two-pass numpy for arrays). A single usable entry
    gives ``sigma == 0``. ``ValueError`` if ``x`` has no nonzero finite entry, or is complex or
    not array-like.

    Example:
        >>> f = fit(torch.tensor([0.0, -1.0, float("inf"), 2.0 ** 2]))
        >>> round(f.mu, 6), round(f.sigma, 6), f.count
        (0.693147, 0.693147, 2)
    """
    _check_array_like(x, "fit")
    if isinstance(x, torch.Tensor):
        a = x.detach().reshape(-1)
        if a.is_floating_point() and a.dtype != torch.float64:
            # Widening to float64 is exact; the masked copy is the only full-size temporary.
            a = a.abs()
            a = a[torch.isfinite(a) & (a > 0)].to(torch.float64)
        else:
            a = a.to(torch.float64).abs()
            a = a[torch.isfinite(a) & (a > 0)]
        count = int(a.numel())
        if count == 0:
            raise ValueError("fit: x has no nonzero finite entries (zeros, inf and NaN are ignored)")
        std, mean = torch.std_mean(a.log_(), correction=0)
        mu, sigma = float(mean), float(std)
    else:
        arr = np.abs(np.asarray(x).reshape(-1).astype(np.float64, copy=False))
        arr = arr[np.isfinite(arr) & (arr > 0)]
        count = int(arr.size)
        if count == 0:
            raise ValueError("fit: x has no nonzero finite entries (zeros, inf and NaN are ignored)")
        logs = np.log(arr)
        mu = float(np.mean(logs))
        sigma = float(np.sqrt(np.mean((logs - mu) ** 2)))
    return LognormalFit(mu=mu, sigma=sigma, count=count)


def subsample(x, max_samples: int, seed: int = 0) -> np.ndarray:
    """Return a reproducible subsample of ``x`` (without replacement) as 1-D float64 numpy.

    If ``x`` has at most ``max_samples`` entries, all of them are returned (flattened, in order).
    Otherwise ``max_samples`` distinct positions are drawn by ``numpy.random.default_rng(seed)``
    (a local generator; the global RNG is never touched) and returned in index order. Entries
    are not filtered: zeros and non-finite values stay. Tensors are gathered on their device and
    only the subsample is copied to the host.

    Example:
        >>> s = subsample(torch.arange(1000.0), 10, seed=1)
        >>> s.shape, bool((s == subsample(torch.arange(1000.0), 10, seed=1)).all())
        ((10,), True)
    """
    _check_array_like(x, "subsample")
    max_samples = _int(max_samples, "max_samples", 1, 2**62)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    n = int(x.numel()) if isinstance(x, torch.Tensor) else int(np.size(x))
    idx = None
    if n > max_samples:
        idx = np.sort(np.random.default_rng(int(seed)).choice(n, size=max_samples, replace=False))
    if isinstance(x, torch.Tensor):
        flat = x.detach().reshape(-1)
        if idx is not None:
            flat = flat[torch.from_numpy(idx).to(flat.device)]
        return flat.to(torch.float64).cpu().numpy()
    arr = np.asarray(x).reshape(-1)
    if idx is not None:
        arr = arr[idx]
    return arr.astype(np.float64)


def ks_statistic(x, dist: str, max_samples: int = 100_000, seed: int = 0) -> KSResult:
    """Return the Kolmogorov-Smirnov fit of ``x`` to a Normal or of ``|x|`` to a Lognormal.

    As in the seed's KS table: ``dist="normal"`` tests the finite entries of ``x`` against
    ``Normal(mean, std)`` (``ddof=0``); ``dist="lognormal"`` tests the nonzero finite ``|x|``
    against :func:`fit`'s lognormal, computed as the identical (log-invariant, better
    conditioned) test of ``ln|x|`` against ``Normal(mu, sigma)``. Both use ``scipy.stats.kstest``
    on :func:`subsample` ``(x, max_samples, seed)``, filtered after subsampling. The parameters
    come from the same data, so the p-value is conservative (Lilliefors), as in the seed.

    Raises:
        ValueError: unknown ``dist``; fewer than two usable entries or zero spread.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(10_000, generator=g).exp()
        >>> ks_statistic(x, "lognormal").statistic < ks_statistic(x, "normal").statistic
        True
    """
    if dist not in KS_DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {KS_DISTRIBUTIONS}, got {dist!r}")
    sample = subsample(x, max_samples, seed)
    if dist == "normal":
        values = sample[np.isfinite(sample)]
    else:
        a = np.abs(sample)
        values = np.log(a[np.isfinite(a) & (a > 0)])
    if values.size < 2:
        raise ValueError(
            f"ks_statistic: need at least 2 usable entries for dist={dist!r}, got {values.size}"
        )
    loc = float(np.mean(values))
    scale = float(np.sqrt(np.mean((values - loc) ** 2)))
    if not scale > 0:
        raise ValueError(f"ks_statistic: the usable entries for dist={dist!r} have zero spread")
    res = stats.kstest(values, "norm", args=(loc, scale))
    return KSResult(float(res.statistic), float(res.pvalue))


# ---------------------------------------------------------------------------------------------
# stochastic pruning


def _sparsity_z(z, sigma: float):
    """Expected sparsity as a function of ``z = ln(alpha) - mu`` (array), for ``sigma >= 0``."""
    z = np.asarray(z, dtype=np.float64)
    if sigma == 0.0:
        # Point mass at e^mu: pruned with probability 1 - e^mu/alpha when alpha > e^mu.
        return np.where(z > 0, -np.expm1(-np.maximum(z, 0.0)), 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        u = z / sigma
        # E[|x|; |x|<alpha]/alpha = exp(mu + sigma^2/2 - ln alpha) Phi(z/sigma - sigma); keeping
        # the exponent and log Phi together never overflows (their sum is <= -z^2/(2 sigma^2)).
        tail = np.exp(sigma * sigma / 2 - z + special.log_ndtr(u - sigma))
        s = special.ndtr(u) - tail
    s = np.where(np.isneginf(z), 0.0, np.where(np.isposinf(z), 1.0, s))
    # Cancellation can leave a few ulps below 0 or above 1.
    return np.clip(s, 0.0, 1.0)


def sparsity_for_threshold(alpha, mu: float, sigma: float):
    """Return the expected sparsity of stochastic pruning at threshold ``alpha``.

    The seed paper's closed form for ``|x| ~ Lognormal(mu, sigma)`` (natural log),
    ``S(alpha) = P(|x| < alpha) - E[|x|; |x| < alpha] / alpha`` (its erf expression), evaluated
    in the equivalent stable form, with ``z = ln(alpha) - mu``::

        S = Phi(z/sigma) - exp(sigma^2/2 - z + log Phi(z/sigma - sigma))

    which neither overflows for large ``sigma`` nor loses the small differences at extreme
    ``alpha``; absolute accuracy about 1e-15.
    ``sigma == 0`` is the point mass at ``e^mu``: ``S = max(0, 1 - e^mu/alpha)``.

    ``alpha``: threshold(s) ``>= 0``, scalar (returns a float) or numpy array (returns float64
    of its shape); ``0 -> 0``, ``inf -> 1``. ``mu``, ``sigma``: natural log, ``sigma >= 0``.

    Example:
        >>> round(sparsity_for_threshold(threshold_for_sparsity(0.85, -7.0, 2.0), -7.0, 2.0), 12)
        0.85
    """
    mu = check_real(mu, "mu")
    sigma = check_sigma(sigma)
    a = np.asarray(alpha, dtype=np.float64)
    if np.isnan(a).any() or (a < 0).any():
        raise ValueError(
            "alpha must be >= 0 (a threshold on |x|; inf allowed), got NaN or a negative value"
        )
    with np.errstate(divide="ignore"):
        z = np.log(a) - mu
    s = _sparsity_z(z, sigma)
    return float(s) if s.ndim == 0 else s


def threshold_for_sparsity(sparsity: float, mu: float, sigma: float) -> float:
    """Return the pruning threshold ``alpha`` whose expected sparsity is ``sparsity``.

    Inverts :func:`sparsity_for_threshold` (strictly increasing in ``alpha``) in log space:
    ``z = ln(alpha) - mu`` is solved by ``scipy.optimize.brentq`` to ``|dz| <= 1e-14 + 1e-15 |z|``
    between bounds that bracket the target for any ``sigma``; ``dS/dz <= 1``, so the sparsity of
    the result is exact to about 1e-13. ``alpha`` itself is formed only at the end (no overflow
    in the search). ``sigma == 0`` gives ``e^mu / (1 - sparsity)``.

    ``ValueError``: ``sparsity`` outside (0, 1), invalid ``mu``/``sigma`` (natural log), or
    ``alpha`` beyond float64.

    Example:
        >>> alpha = threshold_for_sparsity(0.5, 0.0, 1.0)
        >>> round(alpha, 6), round(sparsity_for_threshold(alpha, 0.0, 1.0), 12)
        (2.400791, 0.5)
    """
    s = check_real(sparsity, "sparsity")
    if not 0.0 < s < 1.0:
        raise ValueError(f"sparsity must be in the open interval (0, 1), got {sparsity!r}")
    mu = check_real(mu, "mu")
    sigma = check_sigma(sigma)
    if sigma == 0.0:
        z = -math.log1p(-s)
    else:
        lo = sigma * min(-40.0, float(special.ndtri(s)) - 1.0)
        hi = max(40.0 * sigma, sigma * sigma / 2 - math.log1p(-s) + 1.0)

        def residual(zz: float) -> float:
            return float(_sparsity_z(zz, sigma)) - s

        z = optimize.brentq(residual, lo, hi, xtol=1e-14, rtol=4 * np.finfo(float).eps, maxiter=500)
    log_alpha = mu + z
    if log_alpha > math.log(np.finfo(np.float64).max):
        raise ValueError(f"threshold_for_sparsity: alpha = exp({log_alpha:.6g}) exceeds float64's range")
    return math.exp(log_alpha)


# ---------------------------------------------------------------------------------------------
# FP quantization: the seed's closed form


def expected_relative_error(man_bits: int, exp_bits: int, sigma: float) -> float:
    """Return the seed's closed-form expected relative error ``E[|x_q - x| / |x|]``.

    Exactly the seed paper's formula, for ``log2|x| ~ Normal(0, sigma2^2)`` with
    ``sigma2 = sigma / ln 2`` (``sigma`` is the natural-log std, converted here),
    ``Emax = 2**(exp_bits - 1)``, ``n1 = man_bits``::

        (2 Phi(Emax/sigma2) - 1) / (8 ln2 (2^n1 - 1))
        + 2^(Emax-1) e^(sigma2^2 ln^2 2 / 2) (erf(sigma2 ln2/sqrt2 + Emax/(sqrt2 sigma2)) - 1)
        - 1/2 erf(Emax/(sqrt2 sigma2)) + 3/2 - Phi(Emax/sigma2)

    The overflow term is evaluated via ``erfcx`` (no overflow or cancellation for any ``sigma``).
    It models the seed's quantizer (exponents clipped to [-Emax, Emax], no subnormals), not a real
    format, and overestimates the mantissa error for small ``man_bits``: choose formats with
    :func:`exact_relative_error`. ``man_bits == 0`` (division by ``2**0 - 1``) returns
    ``math.inf``; ``sigma == 0`` returns the limit ``1 / (8 ln2 (2^n1 - 1))``.

    ``man_bits`` in 0..23, ``exp_bits`` in 1..8, ``sigma >= 0`` (natural log).

    Example:
        >>> round(expected_relative_error(2, 3, 1.0), 6)
        0.063208
    """
    man_bits = _int(man_bits, "man_bits", 0, _MAX_CLOSED_FORM_MAN_BITS)
    exp_bits = _int(exp_bits, "exp_bits", 1, MAX_EXP_BITS)
    sigma = check_sigma(sigma)
    if man_bits == 0:
        return math.inf
    mantissa_scale = 1.0 / (8.0 * _LN2 * (2.0**man_bits - 1.0))
    if sigma == 0.0:
        return mantissa_scale
    s2 = sigma / _LN2
    e_max = 2.0 ** (exp_bits - 1)
    r = e_max / s2
    phi_r = float(special.ndtr(r))
    mantissa = (2.0 * phi_r - 1.0) * mantissa_scale
    w = s2 * _LN2 / math.sqrt(2.0) + r / math.sqrt(2.0)
    overflow = -float(special.erfcx(w)) * math.exp(
        (e_max - 1.0) * _LN2 + (s2 * _LN2) ** 2 / 2.0 - w * w
    )
    rest = -0.5 * math.erf(r / math.sqrt(2.0)) + 1.5 - phi_r
    return mantissa + overflow + rest


# ---------------------------------------------------------------------------------------------
# FP quantization: exact expected error of a real format


def _centre_scale(mu: float, fmt: FPFormat) -> int:
    centre = (fmt.min_subnormal_exponent + fmt.max_exponent + 1) / 2.0
    return math.floor(mu / _LN2 - centre + 0.5)


def _best_scale(fmt: FPFormat, mu: float, sigma: float, rounding: str) -> tuple[int, float]:
    k0 = _centre_scale(mu, fmt)
    # Candidates ordered by distance from k0 (k0, k0-1, k0+1, ...): the first minimizer wins.
    offsets = np.arange(1, _SCALE_WINDOW + 1)
    ks = np.concatenate(([k0], np.stack((k0 - offsets, k0 + offsets), axis=1).reshape(-1)))
    errs = relative_errors(fmt, mu, sigma, ks, rounding)
    best = float(np.min(errs))
    i = int(np.argmax(errs <= best * (1.0 + TIE_RTOL) + TIE_ATOL))
    return int(ks[i]), float(errs[i])


def exact_relative_error(fmt: FPFormat, sigma: float, mu: float = 0.0, rounding: str = "nearest",
                         scale_exp: int | None = None) -> float:
    """Return the exact ``E[|Q(x) - x| / |x|]`` of format ``fmt`` for lognormal ``|x|``.

    Model: ``|x| ~ Lognormal(mu, sigma)`` (natural log) is multiplied by ``2**-scale_exp`` and
    rounded onto ``fmt``'s grid as gradcomp's quantizer does: subnormals, saturation to
    ``+-max`` (error ``1 - max/y`` above it), ``"nearest"`` (round half to even; ties have
    measure zero, values below half the smallest subnormal become 0, error 1) or
    ``"stochastic"`` (unbiased: between neighbours ``lo < hi``, ``E|Q(y) - y| =
    2 (y - lo)(hi - y)/(hi - lo)``, with ``lo = 0`` below the smallest subnormal). The relative
    error does not depend on the sign, so only ``|x|`` matters.

    Numerics: :func:`gradcomp.numerics.error_model.relative_errors`, no sampling; each
    quantization cell is integrated in closed form with the lognormal partial moments of order
    -1, 0, 1 (tail-safe Phi differences, log-space coefficients). Relative accuracy about
    ``4**man_bits * 2e-14`` (cancellation inside narrow cells): ~1e-10 for 6-bit formats.
    ``sigma == 0`` evaluates the point mass ``|x| = e^mu``.

    ``scale_exp``: ``k`` in ``x * 2**-k``; ``None`` uses :func:`scale_exponent` (the best scale).

    Example:
        >>> fmt = FPFormat(3, 2)
        >>> round(exact_relative_error(fmt, sigma=1.0), 4), scale_exponent(0.0, 1.0, fmt)
        (0.0467, -1)
        >>> round(exact_relative_error(fmt, 1.0, rounding="stochastic", scale_exp=-1), 4)
        0.062
    """
    fmt = _format(fmt)
    sigma = check_sigma(sigma)
    mu = _mu(mu)
    rounding = check_rounding(rounding)
    if scale_exp is None:
        return _best_scale(fmt, mu, sigma, rounding)[1]
    k = _int(scale_exp, "scale_exp", -(2**20), 2**20)
    return float(relative_errors(fmt, mu, sigma, np.array([k]), rounding)[0])


def scale_exponent(mu: float, sigma: float, fmt: FPFormat, rounding: str = "nearest") -> int:
    """Return the power-of-two scale ``k``: the data are multiplied by ``2**-k`` before encoding.

    Start from ``k0 = floor(mu/ln2 - c + 1/2)``, where ``c = (min_subnormal_exponent +
    max_exponent + 1) / 2`` is the centre, in log2, of the format's representable range
    ``[min_subnormal, 2**(max_exponent+1))``: this puts the fitted median ``e^mu`` at that
    centre. Then return the ``k`` in ``k0 - 6 .. k0 + 6`` minimizing
    :func:`exact_relative_error`. Ties (errors within a relative 1e-6 plus 1e-14, above the
    evaluation noise) go to the ``k`` closest to ``k0``, then to the smaller ``k``:
    deterministic and exactly reproducible.

    Relative error is the only criterion: with ``rounding="stochastic"`` and few bits or a large
    ``sigma`` the minimizer shifts towards ``max`` (saturation's ``1 - max/y`` is cheaper than
    stochastic rounding's error), so part of the data may saturate, which is biased. Codecs
    raise the scale to the smallest non-saturating one.

    Example:
        >>> scale_exponent(mu=-7.0 * math.log(2), sigma=0.0, fmt=FPFormat(3, 2))
        -7
    """
    mu = _mu(mu)
    sigma = check_sigma(sigma)
    fmt = _format(fmt)
    rounding = check_rounding(rounding)
    return _best_scale(fmt, mu, sigma, rounding)[0]


# ---------------------------------------------------------------------------------------------
# exponent/mantissa split


@dataclass(frozen=True)
class SplitRow:
    """One candidate split of a bit budget: format, its best scale and both error estimates."""

    exp_bits: int
    man_bits: int
    fmt: FPFormat
    scale_exp: int
    exact_error: float
    closed_form_error: float


def candidate_formats(total_bits: int) -> list[FPFormat]:
    """Return the formats that split ``total_bits`` (sign included) into exponent and mantissa.

    ``exp_bits`` runs over ``1..min(8, total_bits - 1)`` with ``man_bits = total_bits - 1 -
    exp_bits <= 10`` (FPFormat's limits). The bias is the default ``2**(exp_bits-1) - 1`` except
    for 8 exponent bits, where it is 128 so that the top binade fits float32 (the bias only
    shifts the grid by a power of two, which the scale absorbs, so errors are unaffected).

    Example:
        >>> [f.name for f in candidate_formats(4)]
        ['float4_e1m2fn', 'float4_e2m1fn', 'float4_e3m0fn']
    """
    total_bits = _int(total_bits, "total_bits", _MIN_TOTAL_BITS, _MAX_TOTAL_BITS)
    out = []
    for e in range(1, min(MAX_EXP_BITS, total_bits - 1) + 1):
        m = total_bits - 1 - e
        if m > MAX_MAN_BITS:
            continue
        bias = max(2 ** (e - 1) - 1, 2**e - 1 - 127)
        out.append(FPFormat(e, m, bias))
    return out


def _method(value) -> str:
    if value not in SPLIT_METHODS:
        raise ValueError(f"method must be one of {SPLIT_METHODS}, got {value!r}")
    return value


def split_table(total_bits: int, sigma: float, rounding: str = "nearest",
                mu: float = 0.0) -> list[SplitRow]:
    """Return, per exponent width, both error estimates for a ``total_bits`` budget.

    Rows follow :func:`candidate_formats`; ``exact_error`` is :func:`exact_relative_error` at the
    best scale (``scale_exp``) for ``rounding``; ``closed_form_error`` is
    :func:`expected_relative_error` (``inf`` for ``man_bits == 0``). ``sigma`` natural log.

    Example:
        >>> [(r.exp_bits, round(r.exact_error, 3)) for r in split_table(4, 1.0)]
        [(1, 0.218), (2, 0.172), (3, 0.177)]
    """
    sigma = check_sigma(sigma)
    mu = _mu(mu)
    rounding = check_rounding(rounding)
    rows = []
    for fmt in candidate_formats(total_bits):
        k, err = _best_scale(fmt, mu, sigma, rounding)
        closed = expected_relative_error(fmt.man_bits, fmt.exp_bits, sigma)
        rows.append(SplitRow(fmt.exp_bits, fmt.man_bits, fmt, k, err, closed))
    return rows


def optimal_exp_bits(total_bits: int, sigma: float, method: str = "exact", rounding: str = "nearest",
                     mu: float = 0.0) -> int:
    """Return the exponent width ``E*`` minimizing the expected relative error for ``total_bits``.

    ``total_bits`` (2..16) includes the sign; ``man_bits = total_bits - 1 - exp_bits``; the
    candidates are :func:`candidate_formats`. ``method="exact"`` minimizes
    :func:`exact_relative_error` of the real format at its best scale (for ``rounding`` and
    ``mu``; the recommended criterion). ``method="closed_form"`` minimizes the seed's
    :func:`expected_relative_error` (``rounding``/``mu`` unused; ``man_bits == 0`` candidates are
    ``inf`` there). Ties (errors within a relative 1e-6 plus 1e-14) go to the smaller ``exp_bits``.
    ``sigma`` is the natural-log std.

    Raises:
        ValueError: invalid arguments, or no finite closed-form candidate (``total_bits == 2``).

    Example:
        >>> optimal_exp_bits(6, sigma=2.0 * math.log(2)), optimal_exp_bits(6, 0.1)
        (3, 1)
    """
    total_bits = _int(total_bits, "total_bits", _MIN_TOTAL_BITS, _MAX_TOTAL_BITS)
    sigma = check_sigma(sigma)
    method = _method(method)
    rounding = check_rounding(rounding)
    mu = _mu(mu)
    formats = candidate_formats(total_bits)
    if method == "closed_form":
        errs = [expected_relative_error(f.man_bits, f.exp_bits, sigma) for f in formats]
        if not any(math.isfinite(e) for e in errs):
            raise ValueError(
                f"closed_form has no finite candidate for total_bits={total_bits} (every split has "
                "man_bits == 0, where the seed's formula is undefined); use method='exact'"
            )
    else:
        errs = [_best_scale(f, mu, sigma, rounding)[1] for f in formats]
    err_arr = np.asarray(errs)
    # First (smallest exp_bits) candidate within the tie tolerance of the best: near-equal errors,
    # e.g. a point mass sitting on a grid point of every candidate, go to the longer mantissa.
    return formats[int(np.argmax(err_arr <= np.min(err_arr) * (1.0 + TIE_RTOL) + TIE_ATOL))].exp_bits
