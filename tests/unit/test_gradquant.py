import math

import pytest
import torch

from gradcomp.nn import GradQuant, convert_gradquant


def _grad_through(gq: GradQuant, g: torch.Tensor) -> torch.Tensor:
    x = torch.zeros_like(g, requires_grad=True)
    y = gq(x)
    y.backward(g)
    return x.grad


def _lognormal(n, sigma=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen).mul(sigma).sub(8).exp() * torch.where(
        torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)


def test_identity_forward_and_passthrough_modes():
    x = torch.randn(3, 4, requires_grad=True)
    gq = GradQuant(bits=6)
    assert torch.equal(gq(x), x)
    assert GradQuant()(x) is x  # nothing to do: not even a graph node
    with torch.no_grad():
        assert gq(x) is x


def test_backward_rounds_onto_the_chosen_format():
    g = _lognormal(50_000)
    gq = GradQuant(bits=6, rounding="nearest")
    out = _grad_through(gq, g)
    fmt, k = gq.plan.fmt, gq.plan.scale_exp
    assert fmt.bits == 6
    grid = torch.tensor(fmt.code_values(), dtype=torch.float64) * 2.0**k
    assert torch.isin(out.abs().double(), grid).all()
    assert out.abs().max() >= g.abs().max() * 0.5  # the largest gradient is not clipped


def test_stochastic_rounding_and_pruning_are_unbiased():
    g = _lognormal(2000, sigma=1.0)
    for gq in (GradQuant(bits=5, refit_every=10_000), GradQuant(sparsity=0.8, refit_every=10_000),
               GradQuant(bits=6, sparsity=0.5, refit_every=10_000)):
        outs = torch.stack([_grad_through(gq, g) for _ in range(400)]).double()
        single = (outs - g.double()).norm(dim=1).pow(2).mean().sqrt()
        assert (outs.mean(0) - g.double()).norm() <= 1.3 * single / 400**0.5
        assert single > 0.01 * g.norm()  # lossy: the test can fail


def test_pruning_reaches_the_target_sparsity():
    out = _grad_through(GradQuant(sparsity=0.9), _lognormal(200_000))
    assert abs((out == 0).double().mean().item() - 0.9) < 0.01


def test_exp_offset_shifts_the_split():
    g = _lognormal(20_000, sigma=3.0)
    e = {}
    for off in (0, -1, -2, 1):
        gq = GradQuant(bits=6, exp_offset=off)
        _grad_through(gq, g)
        e[off] = gq.plan.fmt.exp_bits
    assert e[-1] == e[0] - 1 and e[-2] == e[0] - 2 and e[1] == min(e[0] + 1, 5)


def test_nonfinite_and_zero_gradients_pass_through():
    gq = GradQuant(bits=4, sparsity=0.5)
    g = torch.tensor([1.0, math.inf, -2.0])
    assert torch.equal(_grad_through(gq, g), g)
    z = torch.zeros(5)
    assert torch.equal(_grad_through(gq, z), z)


def test_convert_gradquant_wraps_layers_and_keeps_training():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 14, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    keys = set(model.state_dict())
    inserted = convert_gradquant(model, bits=6, sparsity=0.5)
    assert len(inserted) == 2 and [m.index for m in inserted] == [0, 1]
    assert hasattr(model[0], "grad_quant") and hasattr(model[3], "grad_quant")
    assert not hasattr(model[5], "grad_quant")  # the last layer is left alone
    assert set(model.state_dict()) == keys
    x = torch.randn(64, 1, 16)
    y = (x.mean(dim=(1, 2)) > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first
    assert inserted[0].step == 60
    with pytest.raises(ValueError, match="already has a grad_quant"):
        convert_gradquant(model, bits=6)


@pytest.mark.parametrize("kwargs,msg", [
    ({"bits": 1}, "bits must be None or an int in 2..16"),
    ({"sparsity": 1.0}, "sparsity must be in"),
    ({"bits": 6, "exp_bits": 6}, "exp_bits for 6 bits"),
    ({"exp_offset": 1}, "need bits"),
    ({"bits": 6, "rounding": "up"}, "rounding must be one of"),
    ({"bits": 6, "refit_every": 0}, "refit_every must be an int >= 1"),
])
def test_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        GradQuant(**kwargs)


def test_pruned_alpha_entries_do_not_saturate():
    # Equal magnitudes (a point mass): at 90% sparsity alpha = 10x the largest |g|, about 10%
    # of the entries come back as +-alpha, and they must not be clipped to the scale of |g|.
    g = torch.full((10_000,), 1e-3) * torch.where(torch.arange(10_000) % 2 == 0, 1.0, -1.0)
    gq = GradQuant(bits=4, sparsity=0.9, rounding="nearest")
    out = _grad_through(gq, g)
    nz = out[out != 0].abs()
    assert gq.alpha > 5 * g.abs().max()
    assert 500 < nz.numel() < 1500
    assert torch.allclose(nz, torch.full_like(nz, gq.alpha), rtol=0.13)  # e.g. 4-bit rounding of alpha
