"""Model zoo: shapes, seeded init, width scaling, pre-activation layout, ST variant, training."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcomp.app.models import MODELS, build_model, num_parameters

SHAPES = {"resnet1d": (1, 40), "resnet2d": (1, 8, 8), "mlp": (3, 7)}


def _model(name, **kw):
    return build_model(name, input_shape=kw.pop("input_shape", SHAPES[name]),
                       num_classes=kw.pop("num_classes", 10), **kw)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        build_model("vgg", input_shape=(1, 40), num_classes=10)
    for name in MODELS:
        assert name in str(exc.value)


@pytest.mark.parametrize("name,kwargs", [
    ("resnet1d", {"input_shape": (1, 8, 8)}), ("resnet2d", {"input_shape": (1, 40)}),
    ("mlp", {"input_shape": ()}), ("mlp", {"input_shape": (0, 3)}), ("mlp", {"input_shape": [2.0]}),
    ("mlp", {"num_classes": 1}), ("mlp", {"width": 0}), ("mlp", {"width": True}),
    ("mlp", {"seed": -1}), ("mlp", {"act_bits": 2}), ("resnet1d", {"act_bits": 0}),
    ("resnet2d", {"act_bits": 5}),
])
def test_bad_arguments(name, kwargs):
    with pytest.raises(ValueError):
        _model(name, **kwargs)


@pytest.mark.parametrize("name", MODELS)
def test_output_shape(name):
    m = _model(name, width=8, num_classes=7)
    assert m(torch.zeros(3, *SHAPES[name])).shape == (3, 7)


@pytest.mark.parametrize("name", MODELS)
def test_seeded_init_is_reproducible_and_leaves_global_rng_alone(name):
    state = torch.get_rng_state()
    a, b, c = _model(name, width=8, seed=5), _model(name, width=8, seed=5), _model(name, width=8, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    weights = [k for k in sa if k.endswith("weight") and sa[k].dim() > 1]
    assert weights and all(not torch.equal(sa[k], sc[k]) for k in weights)


def test_param_count_scales_with_width():
    for width in (4, 64, 1536):
        m = build_model("mlp", input_shape=(1, 32, 32), num_classes=10, width=width)
        assert num_parameters(m) == 1025 * width + (width + 1) * width + (width + 1) * 10
    assert num_parameters(build_model("mlp", input_shape=(1, 32, 32), num_classes=10, width=1536)) > 3_000_000
    for name in ("resnet1d", "resnet2d"):
        small, big = num_parameters(_model(name, width=8)), num_parameters(_model(name, width=32))
        assert 14 < big / small < 16  # ~quadratic in width


@pytest.mark.parametrize("name", ["resnet1d", "resnet2d"])
def test_every_conv_but_the_stem_reads_post_relu(name):
    """Where ST blocks go: each conv input except the stem's is a ReLU output (>= 0)."""
    m = _model(name, width=4)
    convs = [mod for mod in m.modules() if isinstance(mod, (nn.Conv1d, nn.Conv2d))]
    mins = {}
    for i, conv in enumerate(convs):
        conv.register_forward_pre_hook(
            lambda mod, inp, i=i: mins.__setitem__(i, float(inp[0].detach().min())))
    m(torch.randn(4, *SHAPES[name], generator=torch.Generator().manual_seed(0)))
    assert len(mins) == len(convs) == 9
    assert mins[0] < 0 and all(mins[i] >= 0 for i in range(1, len(convs)))


@pytest.mark.parametrize("name", MODELS)
def test_model_trains(name, gen):
    """A few SGD steps on one fixed batch of random labels drive the loss down."""
    m = _model(name, width=16, seed=1)
    x = torch.randn(32, *SHAPES[name], generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_resnet2d_learns_digits():
    from gradcomp.app.data import load_dataset, make_loader

    b = load_dataset("digits")
    m = build_model("resnet2d", input_shape=b.input_shape, num_classes=b.num_classes, width=8)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    loader = make_loader(b.train, 32)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    m.eval()
    with torch.no_grad():
        acc = (m(b.test.tensors[0]).argmax(1) == b.test.tensors[1]).float().mean().item()
    assert acc > 0.85


@pytest.mark.parametrize("name", ["resnet1d", "resnet2d"])
def test_act_bits_inserts_st_before_every_conv_but_the_stem(name):
    from gradcomp.nn import SqueezeThreshold

    state = torch.get_rng_state()
    m = _model(name, width=8, act_bits=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    sts = [mod for mod in m.modules() if isinstance(mod, SqueezeThreshold)]
    assert len(sts) == 8  # 9 convolutions, the stem skipped
    again = _model(name, width=8, act_bits=2, seed=3)
    sa, sb = m.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(4, *SHAPES[name], generator=torch.Generator().manual_seed(0))
    out = m(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.sum().backward()
