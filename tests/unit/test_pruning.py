import math

import pytest
import torch

from gradcomp import stochastic_prune


def test_prune_rules(gen):
    x = torch.tensor([3.0, -2.0, 0.5, -0.25, 0.0, 1.0, -1.0])
    out = stochastic_prune(x, 1.0, gen)
    assert out[:2].tolist() == [3.0, -2.0]  # above alpha: kept exactly
    assert out[4].item() == 0.0
    assert out[5].item() == 1.0 and out[6].item() == -1.0  # |x| == alpha: kept as alpha
    for v, o in zip(x[2:4].tolist(), out[2:4].tolist()):
        assert o in (0.0, math.copysign(1.0, v))


@pytest.mark.parametrize("v", [0.9, 0.37, -0.01, 1e-3, 2.5])
def test_unbiased(v):
    n = 200_000
    out = stochastic_prune(torch.full((n,), v), 1.0, key=77).double()
    se = out.std().item() / math.sqrt(n)
    assert abs(out.mean().item() - v) <= 4 * se + 1e-7


def test_nonfinite_pass_through_and_dtypes(gen):
    out = stochastic_prune(torch.tensor([float("nan"), math.inf, -math.inf]), 1.0, gen)
    assert torch.isnan(out[0]) and out[1] == math.inf and out[2] == -math.inf
    assert stochastic_prune(torch.ones(3, dtype=torch.float16), 2.0, gen).dtype == torch.float32
    assert stochastic_prune(torch.ones(3, dtype=torch.float64), 2.0, gen).dtype == torch.float64


@pytest.mark.parametrize("alpha", [0.0, -1.0, math.inf, math.nan, "x"])
def test_bad_alpha(alpha, gen):
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        stochastic_prune(torch.ones(3), alpha, gen)


@pytest.mark.parametrize("sparsity", [0.5, 0.85, 0.95])
def test_prune_to_sparsity_reaches_the_target(sparsity):
    from gradcomp import prune_to_sparsity

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500_000, generator=g).mul(2.0).sub(6.0).exp()
    x *= torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)
    out, alpha = prune_to_sparsity(x, sparsity, key=5)
    assert abs((out == 0).double().mean().item() - sparsity) < 0.005
    kept = out[(out != 0) & (out.abs() != alpha)]
    assert (kept.abs() > alpha).all()
