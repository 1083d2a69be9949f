"""Monte Carlo checks of gradcomp.numerics.lognormal's closed forms against sampled data.

* threshold_for_sparsity: apply stochastic pruning (SPEC 2.1, implemented inline here) at the
  computed threshold and measure the fraction of zeros.
* exact_relative_error: quantize samples with the real quantizer (gradcomp.numerics.quant.quantize) at
  the chosen power-of-two scale and measure the mean relative error.
All randomness comes from local torch.Generators.
"""

import math

import pytest
import torch

from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.lognormal import exact_relative_error, fit, scale_exponent, threshold_for_sparsity


def lognormal_sample(n, mu, sigma, gen):
    """``sign * exp(mu + sigma * z)`` in float64 with random signs."""
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return sign * torch.exp(mu + sigma * z)


def stochastic_prune(x, alpha, gen):
    """SPEC 2.1: keep if |x| > alpha; else sign(x) * alpha if alpha * eps <= |x|, else 0."""
    eps = torch.rand(x.shape, generator=gen, dtype=x.dtype)
    a = x.abs()
    small = torch.where(alpha * eps <= a, torch.sign(x) * alpha, torch.zeros_like(x))
    return torch.where(a > alpha, x, small)


@pytest.mark.parametrize("mu", [-9.0, 0.0, 3.0])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0, 4.0])
def test_threshold_reaches_target_sparsity(mu, sigma):
    gen = torch.Generator().manual_seed(int(1000 * sigma + 10 * mu) % 2**31)
    x = lognormal_sample(200_000, mu, sigma, gen)
    for target in (0.1, 0.5, 0.85, 0.99):
        alpha = threshold_for_sparsity(target, mu, sigma)
        out = stochastic_prune(x, alpha, gen)
        measured = (out == 0).double().mean().item()
        assert abs(measured - target) < 0.005, (target, measured)
        # pruning is unbiased: the sum survives up to sampling noise
        spread = (out - x).std().item() * math.sqrt(x.numel())
        assert abs((out - x).sum().item()) < 5 * spread


def test_threshold_from_fitted_parameters():
    # The way a hook uses it: fit the data, then threshold from the fit.
    gen = torch.Generator().manual_seed(7)
    x = lognormal_sample(200_000, -11.0, 2.5, gen).float()
    f = fit(x)
    alpha = threshold_for_sparsity(0.85, f.mu, f.sigma)
    out = stochastic_prune(x.double(), alpha, gen)
    assert abs((out == 0).double().mean().item() - 0.85) < 0.005


quant = pytest.importorskip("gradcomp.numerics.quant")

FORMATS = [FPFormat(2, 3), FPFormat(3, 2), FPFormat(4, 3), FPFormat(5, 2), FPFormat(2, 1),
           FPFormat(3, 0)]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_exact_error_matches_quantizer(fmt, sigma, rounding):
    mu = -7.3
    gen = torch.Generator().manual_seed(fmt.exp_bits * 100 + fmt.man_bits * 10 + int(sigma))
    x = lognormal_sample(200_000, mu, sigma, gen).float()  # float32 input, as gradients
    k = scale_exponent(mu, sigma, fmt, rounding)
    scaled = x * 2.0 ** -k  # exact: a power of two, no float32 over/underflow at these mu/sigma
    q = quant.quantize(scaled, fmt, rounding=rounding,
                       generator=gen if rounding == "stochastic" else None)
    xd, qd = x.double(), q.double() * 2.0**k
    nz = xd != 0
    rel = (qd - xd).abs()[nz] / xd.abs()[nz]
    measured = rel.mean().item()
    predicted = exact_relative_error(fmt, sigma, mu, rounding, scale_exp=k)
    # 2% relative, unless the sample mean itself is that noisy: stochastic rounding sends a tiny
    # |x| below the smallest subnormal h to h with probability |x|/h, a relative error of h/|x|,
    # so the per-sample error is heavy-tailed when much mass underflows (e2m1, sigma 3: the
    # standard error is 2% of the mean at 2e5 samples). Then allow 4 standard errors.
    stderr = rel.std().item() / math.sqrt(rel.numel())
    assert abs(measured - predicted) <= max(0.02 * predicted, 4 * stderr), (measured, predicted, stderr)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_exact_error_off_centre_scales(rounding):
    # Scales that push mass into saturation or into the subnormals/underflow.
    fmt = FPFormat(3, 2)
    mu, sigma = 0.0, 1.5
    gen = torch.Generator().manual_seed(11)
    x = lognormal_sample(200_000, mu, sigma, gen).float()
    for k in (-4, -1, 3):
        q = quant.quantize(x * 2.0**-k, fmt, rounding=rounding,
                           generator=gen if rounding == "stochastic" else None)
        rel = (q.double() * 2.0**k - x.double()).abs() / x.double().abs()
        predicted = exact_relative_error(fmt, sigma, mu, rounding, scale_exp=k)
        stderr = rel.std().item() / math.sqrt(rel.numel())
        assert abs(rel.mean().item() - predicted) <= max(0.02 * predicted, 4 * stderr)
