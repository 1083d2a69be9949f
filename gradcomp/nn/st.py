"""Squeeze-and-Threshold (ST) activation quantization, 1 to 4 bits.

:class:`SqueezeThreshold` sits in front of a convolution and quantizes its input ``x`` of shape
``(B, C, *spatial)`` to ``k = bits`` bits per element. No public code exists; this is our
reading of the paper (Wu, Waschneck, Mayr 2021) and its slides, with our choices marked *guess*.

Forward, training mode (``n = 2**k - 1``):

1. **Squeeze**: ``s[b, c] = mean(x[b, c])`` over the spatial positions (global average pool).
2. **Attention**: ``a = 2 * sigmoid(W2 @ relu(W1 @ s + b1) + b2)``, a bottleneck MLP with
   ``max(1, C // reduction)`` hidden units, as in squeeze-and-excitation; ``a[b, c]`` is in
   ``(0, 2)`` and is 1 when the MLP outputs 0. (*guess*: the factor 2 makes the initial block a
   plain uniform quantizer that keeps the input's scale; it equals the paper's ``sigmoid``
   with a constant output gain of 2 folded into the learned step.)
3. **Threshold**: a learned per-channel step ``t[c] = exp(log_step[c]) > 0``; the attention
   scales channel ``c``'s range, ``u = x * (a / t)``, and
   ``out = t * round(clamp(u, 0, n))`` (round half to even).

So each sample sees ``n`` evenly spaced input thresholds ``(2j + 1) * theta[b, c]``,
``j = 0..n-1``, with ``theta = t / (2 * a)`` (the attention moves them), while the output
levels ``t[c] * j``, ``j = 0..n``, are fixed per channel. Hence, exactly and in both modes,
**every output of channel c is one of its 2**k levels ``t[c] * {0, 1, ..., n}``, over the whole
batch** (not just per sample); ``levels`` returns them. The next convolution can fold ``t``
into its weights and run on integer codes. *Guess*: the paper's "adjust each channel's range,
then learn the threshold" read as "per-sample attention moves the thresholds, the learned step
sets the levels" (the alternative, per-sample levels ``a * alpha * j / n``, breaks the
2**k-values-per-channel property in training).

* **1 bit**: ``out = t`` where ``x > theta`` (exactly: where ``x * a / t > 1/2``; a tie rounds to
  0) and 0 elsewhere: a binary activation with a learned, attention-modulated threshold (the
  "black-and-white photo" of the slides).
* **Signs**: values below the first threshold, negatives included, map to 0: ST absorbs the
  ReLU in front of the convolution. In the intended layout (BN -> ReLU -> ST -> conv; every
  conv but the stem of ``gradcomp.app.models``' pre-activation ResNets) the input is already
  non-negative and ST only quantizes.
* **Initial step** (*guess*; the paper initializes from a full-precision model): the
  MSE-optimal uniform step for ``relu(N(0, 1))`` input (BN -> ReLU output) with ``2**k`` levels
  including 0: 1.223, 0.651, 0.354, 0.194 for 1..4 bits (clip at 1.22, 1.95, 2.48, 2.92);
  ``init_step`` overrides it. The MLP starts deterministic (no RNG): ``W1`` is the first
  ``hidden`` rows of the orthonormal DCT-II matrix over channels, ``W2 = 0.5 * W1.T``, zero
  biases, so the attention starts near 1 and every parameter gets a gradient from the first
  step; pass ``generator=`` for a uniform(+-1/sqrt(fan_in)) draw instead.

Backward (straight-through estimator): ``round`` passes its gradient unchanged and the clamp
passes it strictly inside its range, so with ``g = dL/d out`` and the mask ``m = (0 < u < n)``
(open range, the hard-tanh STE of binary networks; on post-ReLU input the endpoint ``x = 0``
gets no gradient from the ReLU anyway):

* ``dL/dx = g * a * m``: the gradient passes where ``x`` lies strictly inside the clipping
  range ``(0, 2 * n * theta)``, scaled by the attention; in training mode plus the exact
  gradient of the squeeze path (one value per ``(b, c)``, the same at every position). In eval
  mode ``a`` is the constant ``t / (2 * running_threshold)`` and there is no squeeze path.
  For 1 bit the window ``(0, 2 * theta)`` is centred on the threshold.
* ``dL/da[b, c] = sum_spatial(g * m * x)``, which trains the MLP;
* ``dL/dt[c] = sum(g * (round(clamp(u, 0, n)) - m * u))``: the learned-step-size (LSQ)
  gradient (``round(u) - u`` inside, ``n`` above the range, 0 below), which the slides cite.
  Like LSQ it is multiplied by ``1 / sqrt(N * n)`` (``N = numel / C``) so the step learns at
  the pace of the weights (``grad_scale=False``: plain gradient). In eval mode ``dL/dt`` is
  ``sum(g * round(clamp(u, 0, n)))`` (the thresholds are buffers there).

Running estimate (BatchNorm-style, ``momentum``): each training forward sets, per channel,
``running_threshold = (1 - momentum) * running_threshold + momentum * t / (2 * mean_b a)``,
the 1-bit threshold at the batch-mean attention, i.e. the harmonic mean of the per-sample
``theta`` (*guess*: the paper says only "momentum"; this mean stays finite when some sample's
attention saturates at 0). It
starts at ``init_step / 2`` (attention 1). Eval mode uses it and never runs the MLP:
``out = t * round(clamp(x * (0.5 / running_threshold), 0, n))``, an elementwise map, so a
sample's output does not depend on the rest of the batch; thresholds are
``(2j + 1) * running_threshold`` (``thresholds()``). Under DDP the buffer follows rank 0
(``broadcast_buffers``); without DDP (e.g. Horovod) each rank keeps its own, so checkpoint
rank 0's.

Cost: training forward is the squeeze (one reduction), the two (B, C) matmuls and four
elementwise passes over ``x`` (scale, clamp, round, rescale); backward is one fused autograd
node (six passes, no bool masks) plus the MLP's and the squeeze's gradients. Eval is the four
passes only. Measured timings and accuracies: ``benchmarks/results/st_bits.md``.

Training: keep weight decay off ``log_step`` (it would pull ``t`` towards 1) and the MLP; 1 bit
wants a larger learning rate or more epochs.

Example:
    >>> st = SqueezeThreshold(16, bits=2)
    >>> y = st(torch.relu(torch.randn(8, 16, 40)))
    >>> bool((y.unsqueeze(-1) == st.levels[:, None, :]).any(-1).all())  # 4 levels per channel
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SqueezeThreshold", "convert_st", "INIT_STEP"]

# MSE-optimal uniform step for relu(N(0, 1)) input, levels {0, step, ..., (2**k - 1) * step};
# found by grid search over 2e6 samples (see the module docstring).
INIT_STEP = {1: 1.223, 2: 0.651, 3: 0.354, 4: 0.194}
_W2_GAIN = 0.5


def _check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"SqueezeThreshold: {name} must be an int {rng}, got {value!r}")
    return value


class _Quantize(torch.autograd.Function):
    """The quantizer and its STE backward as one autograd node (few ops: they dominate on CPU).

    ``forward(x, logits, log_step, gain, n, step_scale) -> (out, a)``. Training: ``logits`` are the
    MLP's (B, C) outputs, ``a = 2 * sigmoid(logits)``, ``gain = a / t``; eval: ``logits`` is None
    and ``gain`` is the fixed (C,) ``0.5 / running_threshold``. Then
    ``out = t * round(clamp(x * gain, 0, n))``. ``a`` (not differentiable) feeds the running
    estimate. Backward, with ``gm`` the output gradient where ``0 < u < n``: ``dx = gm * gain * t``,
    ``da = sum_spatial(gm * x)``, ``dt = sum(g * code) - sum_b(gain * da)`` (training; the second
    term is the path through ``gain = a / t``, using ``sum_spatial(gm * u) = gain * da``), times
    ``step_scale``. Forward is 4 passes over ``x``, backward 6; no bool masks (bool tensors and
    mixed-dtype multiplies are 2-4x slower than float passes on CPU).
    """

    @staticmethod
    def forward(ctx, x, logits, log_step, gain, n: int, step_scale: float):
        bcast = (1, -1) + (1,) * (x.dim() - 2)
        t = log_step.exp()
        a = None
        if logits is not None:
            a = torch.sigmoid(logits).mul_(2.0)
            gain = a / t
        gain = gain.to(x.dtype).view(gain.shape[0] if gain.dim() == 2 else 1, *bcast[1:])
        tb = t.to(x.dtype).view(bcast)
        u = x * gain
        code = u.clamp(0, n).round_()
        ctx.save_for_backward(x, u, code, gain, tb, a)
        ctx.n, ctx.step_scale, ctx.step_dtype = n, step_scale, log_step.dtype
        if a is None:
            return code * tb, None
        ctx.mark_non_differentiable(a)
        return code * tb, a

    @staticmethod
    def backward(ctx, grad, *_):
        x, u, code, gain, tb, a = ctx.saved_tensors
        spatial = tuple(range(2, x.dim()))
        gx = glogits = glog_step = None
        gm = torch.ops.aten.hardtanh_backward(grad, u, 0.0, float(ctx.n))
        if ctx.needs_input_grad[0]:
            gx = gm * (gain * tb)
        gt = (grad * code).sum(dim=(0,) + spatial)
        if a is not None:
            da = (gm * x).sum(dim=spatial)  # (B, C)
            gt = gt - (gain.flatten(1) * da).sum(0)
            if ctx.needs_input_grad[1]:
                glogits = (da * a * (1.0 - 0.5 * a)).to(a.dtype)  # d(2 sigmoid)/dz = a (1 - a/2)
        if ctx.needs_input_grad[2]:
            glog_step = (gt * tb.flatten() * ctx.step_scale).to(ctx.step_dtype)
        return gx, glogits, glog_step, None, None, None


def _dct_rows(rows: int, cols: int) -> torch.Tensor:
    """The first ``rows`` rows of the orthonormal DCT-II matrix of size ``cols`` (rows <= cols)."""
    j = torch.arange(rows, dtype=torch.float64)[:, None]
    c = torch.arange(cols, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * j * (c + 0.5) / cols) * math.sqrt(2.0 / cols)
    m[0] = math.sqrt(1.0 / cols)
    return m.float()


class _SqueezeMLP(nn.Module):
    """``(B, C) -> (B, C)`` logits ``W2 @ relu(W1 @ s + b1) + b2``; the attention is ``2 * sigmoid``.

    Raw parameters (not ``nn.Linear``) so that generic Linear re-initialization loops leave
    ST's deliberate init alone.
    """

    def __init__(self, channels: int, hidden: int, generator: torch.Generator | None):
        super().__init__()
        self.weight1 = nn.Parameter(torch.empty(hidden, channels))
        self.bias1 = nn.Parameter(torch.zeros(hidden))
        self.weight2 = nn.Parameter(torch.empty(channels, hidden))
        self.bias2 = nn.Parameter(torch.zeros(channels))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        hidden, channels = self.weight1.shape
        if generator is None:
            w1 = _dct_rows(hidden, channels)
            self.weight1.copy_(w1)
            self.weight2.copy_(_W2_GAIN * w1.T)
        else:
            for w in (self.weight1, self.weight2):
                bound = 1.0 / math.sqrt(w.shape[1])
                w.uniform_(-bound, bound, generator=generator)
        self.bias1.zero_()
        self.bias2.zero_()

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(s, self.weight1, self.bias1)), self.weight2, self.bias2)


class SqueezeThreshold(nn.Module):
    """Quantize ``(B, C, *spatial)`` activations to ``bits`` bits per channel (see module doc).

    Args:
        channels: number of channels ``C`` (>= 1).
        bits: 1..4; every output of channel ``c`` is one of ``levels[c]`` (``2**bits`` values).
        reduction: the attention MLP has ``max(1, channels // reduction)`` hidden units (int >= 1).
        momentum: weight of the new batch in the running threshold, in (0, 1].
        init_step: initial output step ``t`` (> 0); default ``INIT_STEP[bits]``.
        grad_scale: scale the step's gradient by ``1 / sqrt(N * (2**bits - 1))`` as in LSQ.
        generator: draw the MLP weights from it instead of the deterministic DCT init.

    Parameters: ``log_step`` (C,) and ``mlp.{weight1, bias1, weight2, bias2}``.
    Buffer: ``running_threshold`` (C,), float32, the eval-mode first threshold.
    """

    running_threshold: torch.Tensor  # a buffer (register_buffer): typed for the checker

    def __init__(self, channels: int, bits: int, *, reduction: int = 4, momentum: float = 0.1,
                 init_step: float | None = None, grad_scale: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__()
        _check_int(channels, "channels", 1)
        _check_int(bits, "bits", 1, 4)
        _check_int(reduction, "reduction", 1)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum <= 1:
            raise ValueError(f"SqueezeThreshold: momentum must be a number in (0, 1], got {momentum!r}")
        if init_step is None:
            init_step = INIT_STEP[bits]
        if (isinstance(init_step, bool) or not isinstance(init_step, (int, float))
                or not math.isfinite(init_step) or init_step <= 0):
            raise ValueError(f"SqueezeThreshold: init_step must be a finite number > 0, got {init_step!r}")
        if not isinstance(grad_scale, bool):
            raise ValueError(f"SqueezeThreshold: grad_scale must be a bool, got {grad_scale!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"SqueezeThreshold: generator must be a torch.Generator, got {generator!r}")
        self.channels, self.bits, self.reduction = channels, bits, reduction
        self.momentum, self.grad_scale = float(momentum), grad_scale
        self.max_code = 2**bits - 1
        self.mlp = _SqueezeMLP(channels, max(1, channels // reduction), generator)
        self.log_step = nn.Parameter(torch.full((channels,), math.log(init_step)))
        self.register_buffer("running_threshold", torch.full((channels,), init_step / 2.0))

    def extra_repr(self) -> str:
        return (f"{self.channels}, bits={self.bits}, reduction={self.reduction}, "
                f"momentum={self.momentum}")

    @property
    def step(self) -> torch.Tensor:
        """The per-channel output step ``t = exp(log_step)``, shape (C,)."""
        return self.log_step.exp()

    @property
    def levels(self) -> torch.Tensor:
        """The ``2**bits`` output values of each channel, ``t[c] * j``, shape (C, 2**bits)."""
        codes = torch.arange(self.max_code + 1, dtype=self.log_step.dtype, device=self.log_step.device)
        return codes * self.step.detach()[:, None]

    def thresholds(self) -> torch.Tensor:
        """Eval-mode input thresholds ``(2j + 1) * running_threshold``, shape (C, 2**bits - 1)."""
        odd = torch.arange(1, 2 * self.max_code, 2, dtype=self.running_threshold.dtype,
                           device=self.running_threshold.device)
        return odd * self.running_threshold[:, None]

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample, per-channel attention ``a`` in (0, 2), shape (B, C) (training path)."""
        s = x.mean(dim=tuple(range(2, x.dim())))
        return torch.sigmoid(self.mlp(s.to(self.mlp.weight1.dtype))).mul_(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(f"SqueezeThreshold: expected input (B, {self.channels}, *spatial), "
                             f"got {tuple(x.shape)}")
        n = self.max_code
        scale = 1.0 / math.sqrt(max(1, x.numel() // self.channels) * n) if self.grad_scale else 1.0
        if self.training:
            logits = self.mlp(x.mean(dim=tuple(range(2, x.dim()))).to(self.mlp.weight1.dtype))
            out, a = _Quantize.apply(x, logits, self.log_step, None, n, scale)
            with torch.no_grad():
                batch = (0.5 * self.log_step.exp()) / a.mean(0).clamp_min(torch.finfo(a.dtype).tiny)
                self.running_threshold.lerp_(batch.to(self.running_threshold.dtype), self.momentum)
            return out
        gain = 0.5 / self.running_threshold
        if torch.is_grad_enabled() and (x.requires_grad or self.log_step.requires_grad):
            return _Quantize.apply(x, None, self.log_step, gain, n, scale)[0]
        bcast = (1, -1) + (1,) * (x.dim() - 2)
        t = self.log_step.exp().to(x.dtype).view(bcast)
        return (x * gain.to(x.dtype).view(bcast)).clamp_(0, n).round_().mul_(t)


def _st_pre_hook(module: nn.Module, args: tuple):
    # A module-level function (not a lambda) so that converted models pickle and deepcopy.
    st: SqueezeThreshold = module.st  # type: ignore[assignment]  # set by the conversion
    return (st(args[0]),) + tuple(args[1:])


def convert_st(model: nn.Module, bits: int, *, skip_first: bool = True, skip_last: bool = False,
               layer_types=(nn.Conv1d, nn.Conv2d), **st_options) -> nn.Module:
    """Insert a :class:`SqueezeThreshold` before every selected convolution of ``model`` (in place).

    The selected layers are the instances of ``layer_types`` in ``model.modules()`` order
    (registration order; for ``gradcomp.app.models``' ResNets that is the stem first, and a block's
    1x1 shortcut after its two 3x3 convolutions), without the first if ``skip_first`` (its input
    is the raw data, which the paper leaves in full precision) and without the last if
    ``skip_last``. Each gets ``SqueezeThreshold(layer.in_channels, bits, **st_options)`` as a
    child named ``st`` and a forward pre-hook that quantizes its input. The layers stay what
    they were (type, attributes, ``weight``), so the model trains as before and its existing
    ``state_dict`` keys are unchanged; the new keys are, per converted layer ``<name>``:
    ``<name>.st.log_step``, ``<name>.st.running_threshold``, ``<name>.st.mlp.weight1``,
    ``<name>.st.mlp.bias1``, ``<name>.st.mlp.weight2``, ``<name>.st.mlp.bias2``. A
    full-precision checkpoint therefore loads with ``strict=False`` (only those keys missing),
    and a converted checkpoint loads strictly into a freshly converted model. Hooks are not in
    the ``state_dict``: convert before loading. Converting a layer twice raises ``ValueError``.

    Returns ``model``.
    """
    # Validate bits and the options even when no layer is selected (without drawing from a
    # caller's generator, which the real modules consume in layer order).
    generator = st_options.get("generator")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"convert_st: generator must be a torch.Generator, got {generator!r}")
    SqueezeThreshold(1, bits, **{**st_options, "generator": None})
    for name, flag in (("skip_first", skip_first), ("skip_last", skip_last)):
        if not isinstance(flag, bool):
            raise ValueError(f"convert_st: {name} must be a bool, got {flag!r}")
    types = tuple(layer_types) if isinstance(layer_types, (tuple, list)) else (layer_types,)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ValueError(f"convert_st: layer_types must be nn.Module subclasses, got {layer_types!r}")
    layers = [m for m in model.modules() if isinstance(m, types)]
    if skip_first:
        layers = layers[1:]
    if skip_last:
        layers = layers[:-1]
    for layer in layers:
        if hasattr(layer, "st"):
            raise ValueError(f"convert_st: {type(layer).__name__} already has an 'st' submodule "
                             f"(converted twice?)")
        channels = getattr(layer, "in_channels", None)
        if not isinstance(channels, int):
            raise ValueError(f"convert_st: {type(layer).__name__} has no int in_channels")
    for layer in layers:
        st = SqueezeThreshold(layer.in_channels, bits, **st_options)
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            st = st.to(device=weight.device, dtype=weight.dtype)  # a model already moved/cast
        layer.st = st
        layer.register_forward_pre_hook(_st_pre_hook)
    return model
