"""Squeeze-and-Threshold activation quantization: levels, STE gradients, running thresholds,
batch-independent eval, conversion, state_dict round trips."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcomp.nn import SqueezeThreshold, convert_st
from gradcomp.nn.st import INIT_STEP

SHAPES = [(6, 5, 12), (4, 3, 5, 6)]  # (B, C, L) and (B, C, H, W)


def _input(shape, gen, scale=2.0, requires_grad=False):
    # Post-ReLU-like activations plus some negatives, wide enough to reach the top level.
    x = torch.randn(shape, generator=gen) * scale + 0.3
    return x.requires_grad_(requires_grad)


def _perturbed(st: SqueezeThreshold, gen) -> SqueezeThreshold:
    """Give ``st`` non-initial parameters so that per-channel steps and attentions differ."""
    with torch.no_grad():
        for p in st.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return st


def _toy_model(seed: int, dim: int = 1, channels=(1, 8, 12, 8)) -> nn.Sequential:
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dim == 1 else (nn.Conv2d, nn.BatchNorm2d)
    pool = nn.AdaptiveAvgPool1d if dim == 1 else nn.AdaptiveAvgPool2d
    c0, c1, c2, c3 = channels
    with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG state alone
        torch.manual_seed(seed)
        return nn.Sequential(
            conv(c0, c1, 3, padding=1), bn(c1), nn.ReLU(),
            conv(c1, c2, 3, padding=1), bn(c2), nn.ReLU(),
            conv(c2, c3, 3, padding=1), nn.ReLU(),
            pool(1), nn.Flatten(), nn.Linear(c3, 2))


# ---------------------------------------------------------------------------- levels


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_at_most_2_pow_bits_values_per_channel_over_the_whole_batch(bits, shape, training, gen):
    st = _perturbed(SqueezeThreshold(shape[1], bits, reduction=2), gen).train(training)
    x = _input((64,) + shape[1:], gen, scale=4.0 * INIT_STEP[bits] * 2**bits)
    y = st(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    levels = st.levels
    assert levels.shape == (shape[1], 2**bits)
    for c in range(shape[1]):
        values = y[:, c].unique()
        assert len(values) <= 2**bits
        assert torch.isin(values, levels[c]).all()  # exactly t[c] * j, bit for bit
    # The input is wide enough that every level is used somewhere.
    assert max(len(y[:, c].unique()) for c in range(shape[1])) == 2**bits


def test_one_bit_is_a_thresholded_binary_activation(gen):
    st = _perturbed(SqueezeThreshold(4, 1), gen).eval()
    x = _input((16, 4, 30), gen)
    y = st(x)
    t = st.step.detach()[None, :, None]
    theta = st.running_threshold[None, :, None]
    assert torch.equal(y, torch.where(x > theta, t, torch.zeros(())))
    assert st.thresholds().shape == (4, 1) and torch.equal(st.thresholds()[:, 0], st.running_threshold)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_eval_codes_count_the_thresholds_crossed(bits, gen):
    st = _perturbed(SqueezeThreshold(3, bits), gen).eval()
    x = _input((8, 3, 50), gen, scale=3.0).double()  # float64: no input lies on a threshold
    y = st(x)
    thr = st.thresholds().double()  # (C, 2**bits - 1), (2j + 1) * running_threshold
    assert torch.all(thr[:, 1:] > thr[:, :-1])
    codes = (x.unsqueeze(-1) > thr[None, :, None, :]).sum(-1)
    assert torch.equal(y, codes * st.step.detach().double()[None, :, None])


def test_negative_inputs_map_to_zero():
    st = SqueezeThreshold(2, 3).eval()
    assert torch.equal(st(-torch.rand(3, 2, 7) - 1e-3), torch.zeros(3, 2, 7))


# ---------------------------------------------------------------------------- STE


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_eval_input_gradient_is_the_documented_ste(bits, gen):
    st = _perturbed(SqueezeThreshold(5, bits), gen).eval()
    x = _input((4, 5, 20), gen, scale=3.0, requires_grad=True)
    w = torch.randn(x.shape, generator=gen)
    (st(x) * w).sum().backward()
    n = 2**bits - 1
    gain = (0.5 / st.running_threshold)[None, :, None]
    u = x.detach() * gain
    inside = (u > 0) & (u < n)  # open clipping range (hard-tanh STE)
    a = st.step.detach()[None, :, None] * gain  # eval's fixed attention t / (2 theta)
    assert torch.allclose(x.grad, torch.where(inside, w * a, torch.zeros(())), rtol=1e-6, atol=0)
    assert (x.grad == 0).any() and (x.grad != 0).any()


@pytest.mark.parametrize("shape", SHAPES)
def test_train_input_gradient_is_ste_plus_the_squeeze_path(shape, gen):
    st = _perturbed(SqueezeThreshold(shape[1], 2, reduction=1), gen).train()
    x = _input(shape, gen, scale=1.5, requires_grad=True)
    w = torch.randn(shape, generator=gen)
    with torch.no_grad():
        a = st.attention(x).view(shape[0], shape[1], *([1] * (len(shape) - 2)))
        u = x * a / st.step.view(1, -1, *([1] * (len(shape) - 2)))
    (st(x) * w).sum().backward()
    direct = torch.where((u > 0) & (u < 3), w * a, torch.zeros(()))
    rest = (x.grad - direct).flatten(2)  # the squeeze's gradient: one value per (b, c)
    assert torch.allclose(rest, rest[..., :1].expand_as(rest), rtol=1e-5, atol=1e-6)
    assert rest.abs().max() > 0  # the squeeze path is differentiated, not detached


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("generator", [False, True])
def test_every_parameter_gets_a_finite_nonzero_gradient_from_the_start(bits, generator, gen):
    st = SqueezeThreshold(8, bits, generator=torch.Generator().manual_seed(5) if generator else None)
    x = torch.relu(_input((6, 8, 10), gen))
    (st(x) * torch.randn(x.shape, generator=gen)).sum().backward()
    for name, p in st.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("grad_scale", [True, False])
def test_step_gradient_is_the_lsq_rule(grad_scale, gen):
    bits, n = 3, 7
    st = _perturbed(SqueezeThreshold(4, bits, grad_scale=grad_scale), gen).train()
    x = _input((5, 4, 9), gen, scale=2.0)
    w = torch.randn(x.shape, generator=gen)
    with torch.no_grad():
        t = st.step[None, :, None]
        u = x * st.attention(x)[..., None] / t
        lsq = (w * (u.clamp(0, n).round() - torch.where((u > 0) & (u < n), u, torch.zeros(())))).sum((0, 2))
    (st(x) * w).sum().backward()
    scale = 1 / math.sqrt(5 * 9 * n) if grad_scale else 1.0
    # log_step's gradient: d t / d log_step = t.
    assert torch.allclose(st.log_step.grad, lsq * st.step.detach() * scale, rtol=1e-5, atol=1e-7)


def _reference(st: SqueezeThreshold, x: torch.Tensor) -> torch.Tensor:
    """ST written with plain autograd ops (STE by the detach trick, LSQ scale by a rescaled copy)."""
    n = 2**st.bits - 1
    spatial = tuple(range(2, x.dim()))
    view = (1, -1) + (1,) * len(spatial)
    scale = 1 / math.sqrt(x.numel() // st.channels * n)
    t = st.log_step.exp()
    t = t * scale + (t - t * scale).detach()  # value t, gradient times scale
    if st.training:
        a = 2 * torch.sigmoid(st.mlp(x.mean(spatial)))
        u = x * (a / t).view(x.shape[0], *view[1:])
    else:
        u = x * (0.5 / st.running_threshold).view(view)
    c = u.clamp(0, n)
    return (c + (c.round() - c).detach()) * t.view(view)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_backward_matches_plain_autograd(training, shape, gen):
    st = _perturbed(SqueezeThreshold(shape[1], 2, reduction=1), gen).double().train(training)
    ref = copy.deepcopy(st)
    x = _input(shape, gen).double()  # no exact zeros: the clamp's endpoint rule does not matter
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = st(xa), _reference(ref, xb)
    assert torch.allclose(ya, yb, rtol=1e-12, atol=0)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)
    for (name, pa), pb in zip(st.named_parameters(), ref.parameters()):
        if pb.grad is None:  # eval: the MLP is not used
            assert not training and pa.grad is None, name
        else:
            assert torch.allclose(pa.grad, pb.grad, rtol=1e-9, atol=1e-12), name


# ---------------------------------------------------------------------------- running estimate


def test_running_threshold_updates_in_training_only(gen):
    st = _perturbed(SqueezeThreshold(6, 2, momentum=0.25), gen)
    x = _input((10, 6, 15), gen)
    before = st.running_threshold.clone()
    assert torch.equal(before, torch.full((6,), INIT_STEP[2] / 2))
    with torch.no_grad():
        batch = st.step / (2 * st.attention(x).mean(0))
    st.train()(x)
    assert torch.allclose(st.running_threshold, 0.75 * before + 0.25 * batch, rtol=1e-6)
    with torch.no_grad():  # like BatchNorm: training mode updates even without grad
        st(x)
    updated = st.running_threshold.clone()
    st.eval()
    st(x)
    with torch.no_grad():
        st(x)
    assert torch.equal(st.running_threshold, updated)


def test_running_threshold_converges_to_the_batch_threshold(gen):
    st = _perturbed(SqueezeThreshold(3, 1, momentum=0.5), gen).train()
    x = _input((8, 3, 11), gen)
    for _ in range(60):
        st(x)
    with torch.no_grad():
        target = st.step / (2 * st.attention(x).mean(0))
    assert torch.allclose(st.running_threshold, target, rtol=1e-5)


def test_eval_is_batch_independent_and_never_runs_the_mlp(gen):
    st = _perturbed(SqueezeThreshold(5, 2), gen)
    calls = []
    st.mlp.register_forward_hook(lambda *_: calls.append(1))
    x = _input((7, 5, 13), gen)
    st.train()(x)
    assert len(calls) == 1
    st.eval()
    batch = st(x)
    for i in range(len(x)):
        assert torch.equal(st(x[i:i + 1]), batch[i:i + 1])
        assert torch.equal(st(torch.cat([x[i:i + 1], -x])[:1]), batch[i:i + 1])
    x.requires_grad_(True)
    st(x).sum().backward()  # the autograd path in eval skips the MLP too
    assert len(calls) == 1


def test_train_output_does_depend_on_the_sample_through_attention(gen):
    st = _perturbed(SqueezeThreshold(5, 2), gen).train()
    a = st.attention(_input((7, 5, 13), gen))
    assert a.shape == (7, 5) and ((a > 0) & (a < 2)).all()
    assert (a.std(0) > 0).all()  # per-sample attention


def test_grad_and_no_grad_paths_agree_bitwise(gen):
    st = _perturbed(SqueezeThreshold(4, 3), gen)
    x = _input((6, 4, 9), gen)
    for training in (True, False):
        st.train(training)
        with torch.no_grad():
            fast = st(x)
        slow = st(x.clone().requires_grad_(True))
        assert torch.equal(fast, slow.detach())


# ---------------------------------------------------------------------------- construction


def test_construction_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = SqueezeThreshold(16, 2), SqueezeThreshold(16, 2)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert set(sa) == {"log_step", "running_threshold", "mlp.weight1", "mlp.bias1", "mlp.weight2",
                       "mlp.bias2"}
    assert a.mlp.weight1.shape == (4, 16) and SqueezeThreshold(3, 1).mlp.weight1.shape == (1, 3)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(SqueezeThreshold(8, 1, generator=g1).mlp.weight1,
                       SqueezeThreshold(8, 1, generator=g2).mlp.weight1)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("kwargs,match", [
    ({"channels": 0, "bits": 2}, "channels"), ({"channels": -3, "bits": 2}, "channels"),
    ({"channels": 2.0, "bits": 2}, "channels"), ({"channels": True, "bits": 2}, "channels"),
    ({"channels": 4, "bits": 0}, "bits"), ({"channels": 4, "bits": 5}, "bits"),
    ({"channels": 4, "bits": 2.0}, "bits"), ({"channels": 4, "bits": True}, "bits"),
    ({"channels": 4, "bits": 2, "reduction": 0}, "reduction"),
    ({"channels": 4, "bits": 2, "reduction": 1.5}, "reduction"),
    ({"channels": 4, "bits": 2, "momentum": 0}, "momentum"),
    ({"channels": 4, "bits": 2, "momentum": 1.5}, "momentum"),
    ({"channels": 4, "bits": 2, "momentum": -0.1}, "momentum"),
    ({"channels": 4, "bits": 2, "momentum": None}, "momentum"),
    ({"channels": 4, "bits": 2, "init_step": 0.0}, "init_step"),
    ({"channels": 4, "bits": 2, "init_step": float("inf")}, "init_step"),
    ({"channels": 4, "bits": 2, "grad_scale": 1}, "grad_scale"),
    ({"channels": 4, "bits": 2, "generator": 3}, "generator"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    channels, bits = kwargs.pop("channels"), kwargs.pop("bits")
    with pytest.raises(ValueError, match=match):
        SqueezeThreshold(channels, bits, **kwargs)


def test_bad_input_shape_raises():
    st = SqueezeThreshold(4, 2)
    for shape in [(3, 4), (3, 5, 8), (3,)]:
        with pytest.raises(ValueError, match="expected input"):
            st(torch.zeros(shape))


# ---------------------------------------------------------------------------- convert_st


def _convs(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]


@pytest.mark.parametrize("skip_first,skip_last,expected", [
    (True, False, [False, True, True]), (True, True, [False, True, False]),
    (False, False, [True, True, True]), (False, True, [True, True, False]),
])
def test_convert_wraps_the_selected_convolutions(skip_first, skip_last, expected, gen):
    model = _toy_model(0)
    plain = copy.deepcopy(model).eval()
    assert convert_st(model, 2, skip_first=skip_first, skip_last=skip_last, momentum=0.2) is model
    convs = _convs(model)
    assert [hasattr(c, "st") for c in convs] == expected
    for c in convs:
        if hasattr(c, "st"):
            assert isinstance(c.st, SqueezeThreshold)
            assert (c.st.channels, c.st.bits, c.st.momentum) == (c.in_channels, 2, 0.2)
    # The forward is conv(st(x)) for the converted convolutions, the plain model otherwise.
    model.eval()
    x = _input((5, 1, 16), gen)
    ref = x
    for layer, plain_layer in zip(model, plain):
        ref = plain_layer(layer.st(ref) if hasattr(layer, "st") else ref)
    assert torch.equal(model(x), ref)
    assert not torch.equal(model(x), plain(x))


def test_convert_2d_and_layer_types(gen):
    model = convert_st(_toy_model(1, dim=2), 3)
    assert [hasattr(c, "st") for c in _convs(model)] == [False, True, True]
    assert [c.st.channels for c in _convs(model)[1:]] == [8, 12]
    assert model(_input((2, 1, 6, 6), gen)).shape == (2, 2)
    # Only Conv2d selected: a Conv1d model is left alone.
    untouched = convert_st(_toy_model(2), 3, layer_types=(nn.Conv2d,))
    assert not any(hasattr(c, "st") for c in _convs(untouched))
    single = convert_st(_toy_model(2), 1, skip_first=False, layer_types=nn.Conv1d)
    assert all(hasattr(c, "st") for c in _convs(single))


def test_convert_with_a_generator_is_reproducible():
    a, b, c = (convert_st(_toy_model(0), 2, generator=torch.Generator().manual_seed(s))
               for s in (7, 7, 8))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["3.st.mlp.weight1"], sc["3.st.mlp.weight1"])
    assert not torch.equal(sa["3.st.mlp.weight1"], sa["6.st.mlp.weight1"][:, :8])


def test_convert_validates_and_refuses_to_convert_twice():
    for bits in (0, 5, 2.5, None):
        with pytest.raises(ValueError, match="bits"):
            convert_st(nn.Linear(3, 3), bits)  # validated even when nothing is selected
    with pytest.raises(ValueError, match="momentum"):
        convert_st(_toy_model(0), 2, momentum=2.0)
    with pytest.raises(ValueError, match="reduction"):
        convert_st(_toy_model(0), 2, reduction=0)
    with pytest.raises(ValueError, match="layer_types"):
        convert_st(_toy_model(0), 2, layer_types=("conv",))
    with pytest.raises(ValueError, match="in_channels"):
        convert_st(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), 2, layer_types=(nn.Linear,))
    with pytest.raises(ValueError, match="generator"):
        convert_st(nn.Linear(3, 3), 2, generator=3)
    model = convert_st(_toy_model(0), 2)
    with pytest.raises(ValueError, match="converted twice"):
        convert_st(model, 2)


def _toy_batch(gen, n=48, length=16):
    # Two classes: a slow or a fast sine wave, random phase, plus noise (global pooling keeps
    # what a convolution sees of the frequency).
    y = torch.randint(0, 2, (n,), generator=gen)
    freq = torch.where(y == 0, 1.0, 4.0)[:, None]
    phase = torch.rand(n, 1, generator=gen) * 2 * math.pi
    pos = torch.arange(length)[None, :] / length
    x = torch.sin(2 * math.pi * freq * pos + phase) + 0.3 * torch.randn(n, length, generator=gen)
    return x[:, None, :], y


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_converted_model_trains(bits, gen):
    model = convert_st(_toy_model(3), bits)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = _toy_batch(gen)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.8  # the running thresholds work


def test_state_dict_round_trip_through_torch_save_weights_only(gen):
    model = convert_st(_toy_model(4), 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _toy_batch(gen)
    for _ in range(5):  # move parameters and running thresholds away from their init
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    state = model.state_dict()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    for name in names[1:]:
        for key in ("log_step", "running_threshold", "mlp.weight1", "mlp.bias1", "mlp.weight2",
                    "mlp.bias2"):
            assert f"{name}.st.{key}" in state
    assert f"{names[0]}.weight" in state and f"{names[0]}.st.log_step" not in state
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = convert_st(_toy_model(5), 2, generator=torch.Generator().manual_seed(9))
    fresh.load_state_dict(loaded)  # strict
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_full_precision_checkpoint_loads_non_strict_and_models_copy(gen):
    plain = _toy_model(6)
    model = convert_st(copy.deepcopy(plain), 3)
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(k for k in model.state_dict() if ".st." in k)
    model.eval()
    x = _input((3, 1, 16), gen)
    twin = copy.deepcopy(model)  # hooks survive deepcopy and pickling (module-level hook)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    pickled = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x)) and torch.equal(pickled(x), model(x))
