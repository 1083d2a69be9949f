"""Unit tests for gradcomp.numerics.lognormal: fit, KS, pruning threshold, FP error model and split."""

import math
import time
import warnings

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special

from gradcomp.numerics import lognormal as ln
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.lognormal import (
    KSResult,
    LognormalFit,
    SplitRow,
    candidate_formats,
    exact_relative_error,
    expected_relative_error,
    fit,
    ks_statistic,
    optimal_exp_bits,
    scale_exponent,
    sparsity_for_threshold,
    split_table,
    subsample,
    threshold_for_sparsity,
)

LN2 = math.log(2.0)


def lognormal_sample(n, mu, sigma, seed, dtype=torch.float64):
    """``sign * exp(mu + sigma * z)`` with random signs, from a local generator."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return (sign * torch.exp(mu + sigma * z)).to(dtype)


# ---------------------------------------------------------------------------------------------
# fit


def test_fit_recovers_parameters():
    x = lognormal_sample(1_000_000, -7.0, 2.0, seed=1, dtype=torch.float32)
    f = fit(x)
    assert isinstance(f, LognormalFit)
    assert f.count == x.numel()
    assert abs(f.mu + 7.0) < 0.01 and abs(f.sigma - 2.0) < 0.01
    # Same numbers as a plain float64 numpy computation (population std).
    logs = np.log(np.abs(x.numpy().astype(np.float64)))
    assert f.mu == pytest.approx(logs.mean(), rel=1e-12)
    assert f.sigma == pytest.approx(logs.std(ddof=0), rel=1e-10)
    assert f.sigma2 == pytest.approx(f.sigma / LN2)
    frozen = f.scipy()
    assert frozen.median() == pytest.approx(math.exp(f.mu))


def test_fit_ignores_zeros_and_nonfinite():
    e = math.e
    x = torch.tensor([0.0, 1.0, -e, math.inf, math.nan, -math.inf, -0.0, e**3])
    f = fit(x)
    assert f.count == 3
    assert f.mu == pytest.approx(4.0 / 3.0)
    assert f.sigma == pytest.approx(np.std([0.0, 1.0, 3.0]))
    assert fit(x.numpy()) == f


def test_fit_single_entry_has_zero_sigma():
    f = fit(np.array([0.0, -0.25, np.nan]))
    assert (f.mu, f.sigma, f.count) == (pytest.approx(math.log(0.25)), 0.0, 1)


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(5),
        torch.tensor([math.nan, math.inf, 0.0]),
        torch.empty(0),
        np.zeros(3),
        np.array([np.inf]),
    ],
)
def test_fit_without_usable_entries_raises(x):
    with pytest.raises(ValueError, match="no nonzero finite entries"):
        fit(x)


@pytest.mark.parametrize(
    "bad", [[1.0, 2.0], 3.0, torch.ones(3, dtype=torch.complex64), np.ones(3, dtype=complex)]
)
def test_fit_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        fit(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_fit_dtypes_torch(dtype):
    x = lognormal_sample(20_000, -3.0, 1.5, seed=2, dtype=dtype)
    x[::7] = 0
    ref = np.abs(x.to(torch.float64).numpy())
    ref = np.log(ref[ref > 0])
    f = fit(x)
    assert f.count == ref.size
    assert f.mu == pytest.approx(ref.mean(), rel=1e-12)
    assert f.sigma == pytest.approx(ref.std(), rel=1e-10)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16, np.int32])
def test_fit_dtypes_numpy(dtype):
    x = lognormal_sample(20_000, 2.0, 1.0, seed=3).numpy().astype(dtype)
    ref = np.abs(x.astype(np.float64))
    ref = np.log(ref[ref > 0])
    f = fit(x)
    assert f.count == ref.size
    assert f.mu == pytest.approx(ref.mean(), rel=1e-12)
    assert f.sigma == pytest.approx(ref.std(), rel=1e-10)


def test_fit_does_not_touch_global_rng_or_input():
    x = lognormal_sample(1000, 0.0, 1.0, seed=4)
    before = x.clone()
    state = torch.get_rng_state()
    fit(x)
    assert torch.equal(x, before) and torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------------------------------------
# subsample and KS


def test_ks_lognormal_beats_normal_on_lognormal_data():
    x = lognormal_sample(300_000, -7.0, 2.0, seed=5, dtype=torch.float32)
    stat_ln, p_ln = ks_statistic(x, "lognormal")
    stat_n, p_n = ks_statistic(x, "normal")
    assert stat_ln < 0.01 and stat_n > 0.2
    assert p_ln > 1e-3 and p_n < 1e-10
    assert isinstance(ks_statistic(x, "lognormal"), KSResult)


def test_ks_normal_beats_lognormal_on_normal_data():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(6))
    assert ks_statistic(x, "normal").statistic < 0.01 < ks_statistic(x, "lognormal").statistic


def test_ks_matches_scipy_lognorm():
    x = lognormal_sample(5_000, 1.0, 0.7, seed=7)
    x[::11] = 0
    a = np.abs(x.numpy())
    a = a[a > 0]
    f = fit(a)
    from scipy import stats

    ref = stats.kstest(a, stats.lognorm(s=f.sigma, scale=math.exp(f.mu)).cdf)
    res = ks_statistic(x, "lognormal")
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-9)
    assert res.pvalue == pytest.approx(ref.pvalue, rel=1e-6)


def test_ks_invalid():
    x = torch.ones(10)
    with pytest.raises(ValueError, match="dist must be one of"):
        ks_statistic(x, "gamma")
    with pytest.raises(ValueError, match="zero spread"):
        ks_statistic(x, "lognormal")
    with pytest.raises(ValueError, match="at least 2"):
        ks_statistic(torch.tensor([0.0, 1.0]), "lognormal")


def test_subsample_reproducible():
    x = torch.arange(1_000_000, dtype=torch.float32)
    a, b, c = subsample(x, 1000, seed=3), subsample(x, 1000, seed=3), subsample(x, 1000, seed=4)
    assert a.dtype == np.float64 and a.shape == (1000,)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.unique(a).size == 1000  # without replacement
    assert np.array_equal(subsample(x.numpy(), 1000, seed=3), a)
    small = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    assert subsample(small, 10).tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError):
        subsample(x, 0)
    with pytest.raises(ValueError):
        subsample(x, 10, seed=-1)


def test_subsample_does_not_touch_global_rng():
    np_state = np.random.get_state()[1].copy()
    torch_state = torch.get_rng_state()
    subsample(torch.arange(10_000.0), 10, seed=1)
    assert np.array_equal(np_state, np.random.get_state()[1])
    assert torch.equal(torch_state, torch.get_rng_state())


# ---------------------------------------------------------------------------------------------
# stochastic pruning: sparsity closed form and its inverse


def seed_sparsity(alpha, mu, sigma):
    """The seed's formula, transcribed literally (SPEC 2.1)."""
    r = math.log(alpha / math.exp(mu))
    return 0.5 + math.exp(mu) / (2 * alpha) * (
        math.exp(sigma**2 / 2) * math.erf(sigma / math.sqrt(2) - r / (math.sqrt(2) * sigma))
        + alpha / math.exp(mu) * math.erf(r / (math.sqrt(2) * sigma))
        - math.exp(sigma**2 / 2)
    )


@pytest.mark.parametrize("mu", [-3.0, 0.0, 2.5])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("u", [-1.5, -0.5, 0.0, 0.7, 2.0])
def test_sparsity_matches_seed_formula(mu, sigma, u):
    alpha = math.exp(mu + u * sigma)
    expected = seed_sparsity(alpha, mu, sigma)
    assert sparsity_for_threshold(alpha, mu, sigma) == pytest.approx(expected, rel=1e-9)


def test_sparsity_monotone_limits_and_arrays():
    alpha = np.exp(np.linspace(-80, 80, 2001))
    for sigma in [0.05, 1.0, 4.0, 10.0]:
        s = sparsity_for_threshold(alpha, 0.0, sigma)
        assert s.shape == alpha.shape
        assert np.all(np.diff(s) >= 0) and np.all((s >= 0) & (s <= 1))
        assert s[0] < 1e-9 and s[-1] > 1 - 1e-9
    assert sparsity_for_threshold(0.0, 0.0, 1.0) == 0.0
    assert sparsity_for_threshold(math.inf, 0.0, 1.0) == 1.0
    assert isinstance(sparsity_for_threshold(1.0, 0.0, 1.0), float)
    out = sparsity_for_threshold(np.array([[0.5, 1.0], [2.0, 4.0]]), 0.0, 1.0)
    assert out.shape == (2, 2)


def test_sparsity_point_mass_limit():
    # sigma == 0: |x| = e^mu always; S = 1 - e^mu/alpha above it, 0 below; small sigma tends to it.
    assert sparsity_for_threshold(0.5, 0.0, 0.0) == 0.0
    assert sparsity_for_threshold(4.0, 0.0, 0.0) == pytest.approx(0.75)
    assert sparsity_for_threshold(4.0, 0.0, 1e-6) == pytest.approx(0.75, abs=1e-9)
    assert threshold_for_sparsity(0.75, 0.0, 0.0) == pytest.approx(4.0)
    assert threshold_for_sparsity(0.75, 0.0, 1e-8) == pytest.approx(4.0, rel=1e-7)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0, 5.0, 10.0])
@pytest.mark.parametrize("mu", [-20.0, 0.0, 5.0])
def test_threshold_inverts_sparsity(sigma, mu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value warnings anywhere
        for s in [1e-4, 0.1, 0.5, 0.85, 0.99, 0.9999]:
            alpha = threshold_for_sparsity(s, mu, sigma)
            assert math.isfinite(alpha) and alpha > 0
            assert sparsity_for_threshold(alpha, mu, sigma) == pytest.approx(s, abs=1e-9, rel=1e-9)


def test_threshold_known_value():
    # SPEC 2.1: sigma 2, S 0.85 keeps about 5% exact, 10% as +-alpha, prunes 85%.
    alpha = threshold_for_sparsity(0.85, 0.0, 2.0)
    exact = special.ndtr(-math.log(alpha) / 2.0)
    assert exact == pytest.approx(0.05, abs=0.01)


@pytest.mark.parametrize("s", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf, "0.5", True])
def test_threshold_invalid_sparsity(s):
    with pytest.raises(ValueError, match="sparsity"):
        threshold_for_sparsity(s, 0.0, 1.0)


@pytest.mark.parametrize("sigma", [-1.0, math.nan, math.inf, None])
def test_invalid_sigma(sigma):
    with pytest.raises(ValueError, match="sigma"):
        threshold_for_sparsity(0.5, 0.0, sigma)
    with pytest.raises(ValueError, match="sigma"):
        sparsity_for_threshold(1.0, 0.0, sigma)
    with pytest.raises(ValueError, match="sigma"):
        expected_relative_error(2, 3, sigma)
    with pytest.raises(ValueError, match="sigma"):
        exact_relative_error(FPFormat(3, 2), sigma)


def test_invalid_alpha_and_mu():
    with pytest.raises(ValueError, match="alpha"):
        sparsity_for_threshold(-1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        sparsity_for_threshold(np.array([1.0, np.nan]), 0.0, 1.0)
    with pytest.raises(ValueError, match="mu"):
        sparsity_for_threshold(1.0, math.inf, 1.0)


@settings(max_examples=60, deadline=None)
@given(
    mu=st.floats(-30, 30),
    sigma=st.floats(0.01, 12),
    a=st.floats(-60, 60),
    b=st.floats(-60, 60),
)
def test_property_sparsity_monotone(mu, sigma, a, b):
    lo, hi = sorted((a, b))
    s_lo = sparsity_for_threshold(math.exp(mu + lo), mu, sigma)
    s_hi = sparsity_for_threshold(math.exp(mu + hi), mu, sigma)
    assert 0.0 <= s_lo <= s_hi + 1e-15 <= 1.0 + 1e-15


@settings(max_examples=60, deadline=None)
@given(mu=st.floats(-30, 30), sigma=st.floats(0.01, 15), s=st.floats(1e-6, 0.9999))
def test_property_threshold_round_trip(mu, sigma, s):
    alpha = threshold_for_sparsity(s, mu, sigma)
    assert sparsity_for_threshold(alpha, mu, sigma) == pytest.approx(s, abs=1e-10)


# ---------------------------------------------------------------------------------------------
# the seed's closed-form FP error


def seed_relative_error(n1, n2, sigma):
    """SPEC 2.2 / the seed, transcribed literally with math.erf (sigma converted to log2)."""
    s = sigma / LN2
    e_max = 2 ** (n2 - 1)

    def phi(v):
        return 0.5 * (1 + math.erf(v / math.sqrt(2)))

    return (
        (2 * phi(e_max / s) - 1) / (8 * LN2 * (2**n1 - 1))
        + 2 ** (e_max - 1)
        * math.exp(s**2 * LN2**2 / 2)
        * (math.erf(s * LN2 / math.sqrt(2) + e_max / (math.sqrt(2) * s)) - 1)
        - 0.5 * math.erf(e_max / (math.sqrt(2) * s))
        + 1.5
        - phi(e_max / s)
    )


@pytest.mark.parametrize("n2", [1, 2, 3])
@pytest.mark.parametrize("n1", [1, 2, 5])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0, 3.0])
def test_closed_form_matches_seed_literal(n1, n2, sigma):
    expected = seed_relative_error(n1, n2, sigma)
    assert expected_relative_error(n1, n2, sigma) == pytest.approx(expected, rel=1e-9, abs=1e-13)


def test_closed_form_finite_everywhere_and_undefined_at_zero_mantissa():
    for n2 in range(1, 9):
        for n1 in range(1, 11):
            for sigma in [0.0, 1e-3, 0.5, 1.0, 3.0, 10.0, 50.0]:
                v = expected_relative_error(n1, n2, sigma)
                assert math.isfinite(v) and v > 0
        assert expected_relative_error(0, n2, 1.0) == math.inf
    # sigma -> 0 limit: only the mantissa term survives.
    assert expected_relative_error(3, 4, 0.0) == pytest.approx(1 / (8 * LN2 * 7))
    assert expected_relative_error(3, 4, 1e-4) == pytest.approx(1 / (8 * LN2 * 7), rel=1e-12)
    # huge sigma: everything is flushed or clipped, relative error -> 1.
    assert expected_relative_error(2, 1, 1e4) == pytest.approx(1.0, abs=1e-3)


def test_closed_form_overflow_term_stable_at_eight_exponent_bits():
    # The literal 2^(Emax-1) e^(...) (erf(...) - 1) is 2^127 * e^50 * (0.0) in float64; the
    # erfcx form gives the true (tiny, negative) value, and the total stays a sane error.
    v = expected_relative_error(7, 8, 10.0)
    mant = 1 / (8 * LN2 * (2**7 - 1))
    assert 0 < v and abs(v - mant) < 2e-3


@pytest.mark.parametrize(
    "args", [(-1, 3, 1.0), (2, 0, 1.0), (2, 9, 1.0), (2.0, 3, 1.0), (True, 3, 1.0), (2, 3, "1")]
)
def test_closed_form_invalid(args):
    with pytest.raises(ValueError):
        expected_relative_error(*args)


# ---------------------------------------------------------------------------------------------
# exact expected error of a real format


def pointwise_error(grid, y, rounding):
    """Independent reference: E|Q(y) - y| / y for y > 0 on the ascending grid (incl. 0)."""
    top = grid[-1]
    i = np.clip(np.searchsorted(grid, y, side="right") - 1, 0, grid.size - 2)
    lo, hi = grid[i], grid[i + 1]
    if rounding == "nearest":
        q = np.where(y - lo < hi - y, lo, hi)
        err = np.abs(q - y) / y
    else:
        p_up = (y - lo) / (hi - lo)
        err = (p_up * (hi - y) + (1 - p_up) * (y - lo)) / y
    return np.where(y > top, (y - top) / y, err)


def brute_force_error(fmt, sigma, mu, rounding, k, n=400_000, width=12.0):
    """Midpoint rule over t = ln y on [m - width sigma, m + width sigma], m = mu - k ln2."""
    grid = np.array(fmt.code_values())
    m = mu - k * LN2
    edges = np.linspace(m - width * sigma, m + width * sigma, n + 1)
    t = (edges[:-1] + edges[1:]) / 2
    pdf = np.exp(-0.5 * ((t - m) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return float(np.sum(pointwise_error(grid, np.exp(t), rounding) * pdf) * (edges[1] - edges[0]))


@pytest.mark.parametrize(
    "fmt", [FPFormat(3, 2), FPFormat(2, 1), FPFormat(4, 3), FPFormat(3, 0)], ids=str
)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("sigma", [0.4, 2.0])
@pytest.mark.parametrize("shift", [0, 3, -4])
def test_exact_matches_quadrature(fmt, rounding, sigma, shift):
    mu = -5.3
    # shift moves the data towards saturation (negative) or into the subnormals (positive).
    k = scale_exponent(mu, sigma, fmt, rounding) + shift
    exact = exact_relative_error(fmt, sigma, mu, rounding, scale_exp=k)
    assert exact == pytest.approx(brute_force_error(fmt, sigma, mu, rounding, k), rel=1e-4)


def test_exact_small_sigma_limit():
    fmt = FPFormat(5, 10)
    # The median on a grid point: the error vanishes with sigma.
    errs = [exact_relative_error(fmt, s, mu=0.0) for s in (1e-3, 1e-5, 1e-7)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-7
    assert exact_relative_error(fmt, 0.0, mu=0.0) == 0.0
    # Anywhere in the normal range, nearest is within half a grid step: below 2**-(man_bits+1).
    bound = 2.0 ** -(fmt.man_bits + 1)
    for sigma in (1e-4, 0.01, 0.3, 1.0):
        for r in ("nearest", "stochastic"):
            assert exact_relative_error(fmt, sigma, mu=0.37, rounding=r) < bound
    # For a smooth spread over many binades the mean nearest error is about 2**-m / (8 ln2).
    assert exact_relative_error(fmt, 1.0, mu=0.37) == pytest.approx(2.0**-10 / (8 * LN2), rel=0.01)


@pytest.mark.parametrize(
    "fmt", [FPFormat(2, 1), FPFormat(3, 2), FPFormat(4, 3), FPFormat(5, 2), FPFormat(2, 0)], ids=str
)
def test_stochastic_error_at_least_nearest(fmt):
    for sigma in [0.0, 0.1, 1.0, 3.0]:
        for mu in [0.0, 0.4]:
            for k in range(-6, 7):
                near = exact_relative_error(fmt, sigma, mu, "nearest", k)
                stoch = exact_relative_error(fmt, sigma, mu, "stochastic", k)
                assert stoch >= near * (1 - 1e-12)
            # (equal when the best scale saturates a point mass: both errors are 1 - max/y)
            best_near = exact_relative_error(fmt, sigma, mu)
            assert exact_relative_error(fmt, sigma, mu, "stochastic") >= best_near * (1 - 1e-12)


def test_exact_point_mass():
    fmt = FPFormat(3, 2)  # grid around 1: 1, 1.25, 1.5, ...
    y = 1.1
    assert exact_relative_error(fmt, 0.0, math.log(y), "nearest", 0) == pytest.approx(0.1 / 1.1)
    stochastic = 2 * 0.1 * 0.15 / (0.25 * 1.1)  # 2 (y - lo)(hi - y) / ((hi - lo) y)
    assert exact_relative_error(fmt, 0.0, math.log(y), "stochastic", 0) == pytest.approx(stochastic)
    assert exact_relative_error(fmt, 0.0, math.log(100.0), "nearest", 0) == pytest.approx(1 - 28 / 100)
    assert exact_relative_error(fmt, 0.0, math.log(0.01), "nearest", 0) == 1.0
    near_point = exact_relative_error(fmt, 1e-9, math.log(y), "nearest", 0)
    assert near_point == pytest.approx(0.1 / 1.1, rel=1e-6)


def test_exact_shift_equivariance_and_bias_invariance():
    fmt = FPFormat(3, 2)
    for r in ("nearest", "stochastic"):
        a = exact_relative_error(fmt, 1.3, 0.2, r, 1)
        assert exact_relative_error(fmt, 1.3, 0.2 + 5 * LN2, r, 6) == pytest.approx(a, rel=1e-12)
        # A different bias is the same grid scaled by a power of two: the scale absorbs it.
        shifted = exact_relative_error(FPFormat(3, 2, bias=5), 1.3, 0.2, r, 1 + 2)
        assert shifted == pytest.approx(a, rel=1e-12)


def test_exact_accepts_big_grids_and_extreme_parameters():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = exact_relative_error(FPFormat(5, 10), 2.0)  # 2**15 cells
        assert 0 < v < 1e-3
        for sigma in (1e-12, 10.0, 40.0, 100.0):
            for r in ("nearest", "stochastic"):
                for mu in (-300.0, 0.0, 300.0):
                    e = exact_relative_error(FPFormat(4, 3), sigma, mu, r)
                    # nearest errors are at most 1, stochastic at most 2 (tiny values -> 0 or h)
                    for e in (exact_relative_error(FPFormat(4, 3), sigma, mu, r),
                              exact_relative_error(FPFormat(4, 3), sigma, mu, r, scale_exp=0)):
                        assert math.isfinite(e) and 0 <= e <= (1.0 if r == "nearest" else 2.0) + 1e-9


def test_exact_is_fast_for_6_bit_formats():
    fmt = FPFormat(3, 2)
    exact_relative_error(fmt, 2.0, 0.0, "nearest", -1)
    for r in ("nearest", "stochastic"):
        t0 = time.perf_counter()
        for _ in range(100):
            exact_relative_error(fmt, 2.0, -9.0, r, -13)
        per_call = (time.perf_counter() - t0) / 100
        assert per_call < 1e-3, per_call  # measured ~70 us


def test_exact_invalid():
    with pytest.raises(ValueError, match="FPFormat"):
        exact_relative_error("e3m2", 1.0)
    with pytest.raises(ValueError, match="rounding"):
        exact_relative_error(FPFormat(3, 2), 1.0, rounding="up")
    with pytest.raises(ValueError, match="scale_exp"):
        exact_relative_error(FPFormat(3, 2), 1.0, scale_exp=1.5)
    with pytest.raises(ValueError, match="mu"):
        exact_relative_error(FPFormat(3, 2), 1.0, mu=math.nan)
    with pytest.raises(ValueError, match="mu"):
        scale_exponent(1e300, 1.0, FPFormat(3, 2))


def test_exact_point_mass_beyond_float_range():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fmt = FPFormat(3, 2)
        assert exact_relative_error(fmt, 0.0, 1000.0, scale_exp=0) == 1.0  # saturates
        assert exact_relative_error(fmt, 0.0, -1000.0, scale_exp=0) == 1.0  # flushed to 0
        assert exact_relative_error(fmt, 0.0, -1000.0, "stochastic", scale_exp=0) == 2.0


# ---------------------------------------------------------------------------------------------
# scale


def test_scale_exponent_documented_offset():
    fmt = FPFormat(3, 2)  # representable log2 range [-4, 5): centre c = 0.5
    # A point mass: every k keeping it in the normal range is exact; the tie goes to k0.
    assert scale_exponent(-7 * LN2, 0.0, fmt) == -7  # k0 = floor(-7 - 0.5 + 0.5)
    assert exact_relative_error(fmt, 0.0, -7 * LN2) == 0.0
    # Wide formats: many equally good scales (flat up to evaluation noise) -> k0.
    fmt = FPFormat(7, 4)
    c = (fmt.min_subnormal_exponent + fmt.max_exponent + 1) / 2
    assert scale_exponent(0.3, 1.0, fmt) == math.floor(0.3 / LN2 - c + 0.5)


SCALE_FORMATS = [FPFormat(2, 1), FPFormat(3, 0), FPFormat(2, 3), FPFormat(3, 2), FPFormat(4, 3),
                 FPFormat(5, 2), FPFormat(5, 10)]


@pytest.mark.parametrize("fmt", SCALE_FORMATS, ids=str)
def test_scale_exponent_is_the_best_scale(fmt):
    for sigma in [0.0, 0.2, 1.0, 2.0, 4.0] if fmt.bits <= 8 else [0.0, 1.0]:
        for mu in [0.0, -4.1]:
            for r in ("nearest", "stochastic"):
                k = scale_exponent(mu, sigma, fmt, r)
                best = exact_relative_error(fmt, sigma, mu, r, k)
                assert exact_relative_error(fmt, sigma, mu, r) == best
                if r == "nearest":
                    # the window search finds the global optimum (checked over +-20 here).
                    reach = 20 if fmt.bits <= 8 else 3
                    others = [exact_relative_error(fmt, sigma, mu, r, kk)
                              for kk in range(k - reach, k + reach + 1)]
                    assert best <= min(others) * (1 + 1e-6)
                # deterministic and equivariant under power-of-two shifts of the data
                assert scale_exponent(mu, sigma, fmt, r) == k
                assert scale_exponent(mu + 3 * LN2, sigma, fmt, r) == k + 3


def test_scale_exponent_invalid():
    with pytest.raises(ValueError):
        scale_exponent(0.0, 1.0, "e3m2")
    with pytest.raises(ValueError, match="rounding"):
        scale_exponent(0.0, 1.0, FPFormat(3, 2), "down")


# ---------------------------------------------------------------------------------------------
# exponent/mantissa split


def test_candidate_formats():
    splits = [(f.exp_bits, f.man_bits) for f in candidate_formats(6)]
    assert splits == [(1, 4), (2, 3), (3, 2), (4, 1), (5, 0)]
    assert [(f.exp_bits, f.man_bits) for f in candidate_formats(16)] == [(5, 10), (6, 9), (7, 8), (8, 7)]
    assert candidate_formats(16)[-1].bias == 128  # e8 needs bias >= 128 to fit float32
    assert [(f.exp_bits, f.man_bits) for f in candidate_formats(2)] == [(1, 0)]


@pytest.mark.parametrize("total_bits", [1, 17, 6.0, True, "6"])
def test_optimal_exp_bits_validates_total_bits(total_bits):
    with pytest.raises(ValueError, match="total_bits must be an int in 2..16"):
        optimal_exp_bits(total_bits, 1.0)


def test_optimal_exp_bits_validates_other_args():
    with pytest.raises(ValueError, match="method must be one of"):
        optimal_exp_bits(6, 1.0, method="table")
    with pytest.raises(ValueError, match="rounding"):
        optimal_exp_bits(6, 1.0, rounding="up")
    with pytest.raises(ValueError, match="sigma"):
        optimal_exp_bits(6, -1.0)
    with pytest.raises(ValueError, match="no finite candidate"):
        optimal_exp_bits(2, 1.0, method="closed_form")
    assert optimal_exp_bits(2, 1.0) == 1


def test_split_table():
    rows = split_table(6, 2.0)
    assert [r.exp_bits for r in rows] == [1, 2, 3, 4, 5]
    assert all(isinstance(r, SplitRow) and r.exp_bits + r.man_bits == 5 for r in rows)
    assert rows[-1].closed_form_error == math.inf and all(math.isfinite(r.exact_error) for r in rows)
    best = min(rows, key=lambda r: r.exact_error)
    assert best.exp_bits == optimal_exp_bits(6, 2.0)
    best_closed = min(rows, key=lambda r: r.closed_form_error)
    assert best_closed.exp_bits == optimal_exp_bits(6, 2.0, method="closed_form")
    for r in rows:
        assert r.exact_error == exact_relative_error(r.fmt, 2.0, 0.0, "nearest", r.scale_exp)
        assert r.closed_form_error == expected_relative_error(r.man_bits, r.exp_bits, 2.0)
    with pytest.raises(ValueError):
        split_table(17, 1.0)


@pytest.mark.parametrize("method", ["exact", "closed_form"])
def test_optimal_exp_bits_grows_with_sigma(method):
    s2 = np.arange(0.1, 8.0, 0.1)
    splits = [optimal_exp_bits(6, s * LN2, method=method) for s in s2]
    assert splits[0] == 1 and splits[-1] >= 4
    assert all(b >= a for a, b in zip(splits, splits[1:]))


def paper_table_6bit(sigma2):
    """The paper's reference-code table for 6 bits: sigma2 break points 0, 0.3, 0.9, 2, 4.9."""
    return 1 + sum(sigma2 >= b for b in (0.3, 0.9, 2.0, 4.9))


def test_closed_form_against_paper_table_6bit():
    # Well inside [0.9, 2) and [2, 4.9), in the sigma2 range 1..4 where SPEC 2.2 says they agree.
    for s2 in (1.25, 1.5, 1.75, 3.25, 3.5, 3.75, 4.0):
        assert optimal_exp_bits(6, s2 * LN2, method="closed_form") == paper_table_6bit(s2)
    # Not everywhere: the closed form moves to 4 exponent bits only at sigma2 = 2.975, not at 2
    # (and to 2 -> 3 at 1.058, not 0.9), so on (2, 2.975) it says 3 where the table says 4.
    assert optimal_exp_bits(6, 2.5 * LN2, method="closed_form") == 3 != paper_table_6bit(2.5)
    # The exact criterion also picks the table's 4 on most of [2, 4.9): its break is at 2.495.
    assert optimal_exp_bits(6, 3.0 * LN2) == 4
    # Above 4.9 the table says 5 (e5m0): the closed form cannot (undefined at man_bits 0),
    # the exact criterion agrees from sigma2 = 5.13.
    assert optimal_exp_bits(6, 6.0 * LN2) == 5 == paper_table_6bit(6.0)
    assert optimal_exp_bits(6, 6.0 * LN2, method="closed_form") == 4


# Break points in sigma2 = sigma / ln 2 (nearest rounding, mu = 0) where E* steps up by one,
# computed by bisection to 1e-4. The closed form and the exact criterion disagree between
# corresponding break points. Why: (1) the seed's mantissa term 1/(8 ln2 (2^n1 - 1)) overstates
# the real error ~2^-n1/(8 ln2) by 2^n1/(2^n1 - 1) (x2 at n1 = 1, x1.33 at n1 = 2, inf at n1 = 0),
# so at large sigma it holds on to mantissa bits too long (switches later, never to m0);
# (2) its model flushes exponents below -Emax to 0 with error 1, ignoring subnormals (gradual
# underflow), so at small sigma it gives up mantissa bits for range too early.
SPLIT_BREAKS = {
    4: {"closed_form": (1, [0.8322]), "exact": (1, [0.7481, 1.4764])},
    5: {"closed_form": (1, [0.5398, 1.5716]), "exact": (1, [0.6490, 1.3836, 2.7175])},
    6: {"closed_form": (1, [0.4479, 1.0580, 2.9750]), "exact": (1, [0.5702, 1.2362, 2.4954, 5.1290])},
    8: {
        "closed_form": (1, [0.3606, 0.7857, 1.7410, 4.0221]),
        "exact": (1, [0.4597, 1.0663, 2.1955, 4.1642]),
    },
}


@pytest.mark.parametrize("total_bits", sorted(SPLIT_BREAKS))
@pytest.mark.parametrize("method", ["closed_form", "exact"])
def test_documented_split_break_points(total_bits, method):
    start, breaks = SPLIT_BREAKS[total_bits][method]
    for i, b in enumerate(breaks):
        assert optimal_exp_bits(total_bits, (b - 0.002) * LN2, method=method) == start + i
        assert optimal_exp_bits(total_bits, (b + 0.002) * LN2, method=method) == start + i + 1
    assert optimal_exp_bits(total_bits, 8.0 * LN2, method=method) == start + len(breaks)


def test_documented_disagreement_6bit():
    # sigma2 -> (closed_form, exact): the intervals where the two criteria pick different splits.
    expected = {0.5: (2, 1), 1.1: (3, 2), 2.7: (3, 4), 6.0: (4, 5)}
    for s2, pair in expected.items():
        got = (optimal_exp_bits(6, s2 * LN2, method="closed_form"), optimal_exp_bits(6, s2 * LN2))
        assert got == pair
    for s2 in (0.2, 0.8, 1.5, 3.5):  # and where they agree
        assert optimal_exp_bits(6, s2 * LN2, method="closed_form") == optimal_exp_bits(6, s2 * LN2)


@settings(max_examples=40, deadline=None)
@given(
    e=st.integers(1, 5),
    m=st.integers(0, 4),
    sigma=st.floats(0.0, 6.0),
    mu=st.floats(-10, 10),
    k=st.integers(-8, 8),
)
def test_property_exact_error_bounds(e, m, sigma, mu, k):
    fmt = FPFormat(e, m)
    near = exact_relative_error(fmt, sigma, mu, "nearest", k)
    stoch = exact_relative_error(fmt, sigma, mu, "stochastic", k)
    assert -1e-12 <= near <= 1 + 1e-12
    assert near * (1 - 1e-9) - 1e-15 <= stoch <= 2 + 1e-12


def test_public_api():
    assert set(ln.__all__) >= {
        "fit", "subsample", "ks_statistic", "sparsity_for_threshold", "threshold_for_sparsity",
        "expected_relative_error", "exact_relative_error", "scale_exponent", "optimal_exp_bits",
        "split_table", "LognormalFit", "KSResult", "SplitRow",
    }
    for name in ln.__all__:
        assert hasattr(ln, name)


def _relative_error_quadrature(fmt, mu, sigma, k, rounding, lo, hi, nodes=1 << 18):
    """Midpoint rule in ln|x| over [lo, hi] of the pointwise relative error (brute force)."""
    from gradcomp.numerics.error_model import format_grid

    grid = format_grid(fmt)
    t = lo + (hi - lo) * (np.arange(nodes) + 0.5) / nodes
    w = np.exp(-0.5 * ((t - mu) / sigma) ** 2)
    y = np.exp(t - k * LN2)
    i = np.clip(np.searchsorted(grid, y, side="right") - 1, 0, grid.size - 2)
    lo_g, hi_g = grid[i], grid[i + 1]
    if rounding == "nearest":
        err = np.minimum(y - lo_g, hi_g - y) / y
    else:
        err = 2.0 * (y - lo_g) * (hi_g - y) / ((hi_g - lo_g) * y)
    err = np.where(y >= grid[-1], 1.0 - grid[-1] / y, err)
    return float(err @ w / w.sum())


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_relative_errors_match_quadrature_whole_and_truncated(rounding):
    from gradcomp.numerics.error_model import relative_errors

    fmt, mu, sigma = FPFormat(3, 2), -3.0, 1.3
    for k in (-6, -4):
        whole = relative_errors(fmt, mu, sigma, k, rounding)[0]
        assert whole == pytest.approx(exact_relative_error(fmt, sigma, mu, rounding, k), rel=1e-12)
        assert whole == pytest.approx(_relative_error_quadrature(fmt, mu, sigma, k, rounding, mu - 12 * sigma,
                                                                 mu + 12 * sigma), rel=1e-6)
        # the mean over a truncated range (the tail that pruning keeps, cut above)
        lower, upper = math.exp(mu + 0.7), math.exp(mu + 5.0)
        tail = relative_errors(fmt, mu, sigma, k, rounding, lower=lower, upper=upper)[0]
        ref = _relative_error_quadrature(fmt, mu, sigma, k, rounding, mu + 0.7, mu + 5.0)
        assert tail == pytest.approx(ref, rel=1e-6) and tail != pytest.approx(whole, rel=1e-3)


def test_exact_error_near_point_mass_on_a_grid_point():
    # |x| = 1 sits on a grid point (and on a cell boundary): no negative rounding residue, no NaN.
    for sigma in (1e-17, 1e-299):
        for fmt in (FPFormat(1, 3), FPFormat(1, 0)):
            for r in ("nearest", "stochastic"):
                e = exact_relative_error(fmt, sigma, 0.0, r, 0)
                assert 0.0 <= e <= (1.0 if r == "nearest" else 2.0)
