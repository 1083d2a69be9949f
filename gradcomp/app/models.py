"""Small models for the experiments: pre-activation residual CNNs (1-D and 2-D) and an MLP.

:func:`build_model` is the one entry point (names in :data:`MODELS`):

* ``"resnet1d"`` -- input ``(C, L)``, e.g. MNIST-1D ``(1, 40)``; ``"resnet2d"`` -- input
  ``(C, H, W)``, e.g. digits ``(1, 8, 8)``. Both are :class:`ResNet`: a stem convolution, three
  pre-activation residual blocks of ``width``, ``2*width`` and ``4*width`` channels (the last two
  stride 2, with a 1x1 projection shortcut), then BatchNorm-ReLU, global average pooling and a
  linear classifier. Kernel 3 (the 1-D stem: 5). Pre-activation means every convolution except
  the stem reads a post-ReLU activation (BN -> ReLU -> conv), which is where a
  Squeeze-and-Threshold quantizer belongs (SPEC 3): ``act_bits`` converts the model with
  ``gradcomp.nn.convert_st(model, act_bits)``, which skips the stem (its input is the raw data).
  About ``106 * width**2`` parameters for resnet1d (width 32: 111k) and ``298 * width**2`` for
  resnet2d (3x3 kernels; width 32: 308k).
* ``"mlp"`` -- :class:`MLP`: flatten, two hidden ``Linear`` + ReLU layers of ``width`` units,
  linear classifier: ``(in + 1) * width + (width + 1) * width + (width + 1) * classes``
  parameters, so ``width`` scales it to millions (1024 features, width 1536: 3.95M).

Initialization is explicit and seeded: He-normal (fan-in, ReLU) for convolutions and hidden
linear layers, uniform(+-1/sqrt(fan_in)) for the classifier, zero biases, BatchNorm (1, 0), all
drawn from a ``torch.Generator`` seeded from ``seed``. The same ``seed`` therefore gives
bit-identical weights on every rank, and building a model never draws from torch's global RNG.
(The layers are allocated on the meta device first, so their default ``reset_parameters``
never runs; ST blocks initialize themselves without randomness.)

Example:
    >>> m = build_model("resnet1d", input_shape=(1, 40), num_classes=10, width=16)
    >>> m(torch.zeros(4, 1, 40)).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradcomp.numerics.rng import derive_key

__all__ = ["MODELS", "ResNet", "PreActBlock", "MLP", "build_model", "num_parameters"]

MODELS = ("resnet1d", "resnet2d", "mlp")

_MAX_WIDTH = 1 << 16
# derive_key stream tag of the weight initialization (keeps it apart from other uses of seed).
_INIT_STREAM = 0x1417


def _layers(dim: int):
    if dim == 1:
        return nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d
    return nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d


class PreActBlock(nn.Module):
    """Pre-activation residual block: ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``.

    With ``stride > 1`` or a channel change the shortcut is a 1x1 convolution of
    ``relu(bn1(x))`` (He et al. 2016, "Identity mappings"), so every convolution here reads a
    post-ReLU tensor. ReLUs are separate, non-inplace modules so that backward hooks on the
    convolutions see unmodified outputs.
    """

    def __init__(self, dim: int, in_channels: int, out_channels: int, stride: int = 1,
                 kernel_size: int = 3):
        super().__init__()
        conv, bn, _ = _layers(dim)
        pad = kernel_size // 2
        self.bn1 = bn(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = conv(in_channels, out_channels, kernel_size, stride, pad, bias=False)
        self.bn2 = bn(out_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = conv(out_channels, out_channels, kernel_size, 1, pad, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv(in_channels, out_channels, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + skip


class ResNet(nn.Module):
    """Pre-activation ResNet for ``(C, L)`` (``dim=1``) or ``(C, H, W)`` (``dim=2``) inputs.

    stem conv -> blocks of ``width``, ``2*width`` (stride 2), ``4*width`` (stride 2) ->
    BN -> ReLU -> global average pool -> linear. See the module docstring.
    """

    def __init__(self, dim: int, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        if dim not in (1, 2):
            raise ValueError(f"ResNet: dim must be 1 or 2, got {dim!r}")
        conv, bn, pool = _layers(dim)
        stem_k = 5 if dim == 1 else 3
        self.stem = conv(in_channels, width, stem_k, 1, stem_k // 2, bias=False)
        self.layer1 = PreActBlock(dim, width, width, 1)
        self.layer2 = PreActBlock(dim, width, 2 * width, 2)
        self.layer3 = PreActBlock(dim, 2 * width, 4 * width, 2)
        self.bn = bn(4 * width)
        self.relu = nn.ReLU()
        self.pool = pool(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(self.relu(self.bn(x))).flatten(1))


class MLP(nn.Module):
    """Flatten -> Linear(in, width) -> ReLU -> Linear(width, width) -> ReLU -> Linear(width, classes)."""

    def __init__(self, in_features: int, num_classes: int, width: int = 32):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, width)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(width, width)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc3(self.relu2(self.fc2(x)))


def num_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def _init_(model: nn.Module, generator: torch.Generator) -> None:
    """Initialize every parameter and buffer of ``model`` from ``generator``, in module order."""
    convs_and_linears = [m for m in model.modules() if isinstance(m, _WEIGHTED)]
    classifier = convs_and_linears[-1]
    for m in model.modules():
        own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if own and not isinstance(m, _WEIGHTED + _NORMS):
            # The model was allocated uninitialized (meta device): nothing may be left out.
            raise TypeError(f"_init_: no initialization rule for {type(m).__name__}")
        if isinstance(m, _WEIGHTED):
            if m is classifier:
                bound = 1.0 / math.sqrt(m.weight[0].numel())
                nn.init.uniform_(m.weight, -bound, bound, generator=generator)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu",
                                        generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()


def _check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"build_model: {name} must be an int {bound}, got {value!r}")
    return value


def build_model(name: str, *, input_shape: tuple[int, ...], num_classes: int, width: int = 32,
                act_bits: int | None = None, seed: int = 0) -> nn.Module:
    """Build model ``name`` (see :data:`MODELS`) with deterministic weights from ``seed``.

    Args:
        name: ``"resnet1d"`` (``input_shape`` ``(C, L)``), ``"resnet2d"`` (``(C, H, W)``) or
            ``"mlp"`` (any shape; flattened).
        input_shape: per-sample input shape, e.g. ``DatasetBundle.input_shape``.
        num_classes: number of output logits (>= 2).
        width: base channel count (ResNets: ``width, 2*width, 4*width``) or hidden units (MLP).
        act_bits: if set (1..4), quantize activations to this many bits with
            Squeeze-and-Threshold blocks: ``gradcomp.nn.convert_st(model, act_bits)``, one
            before every convolution but the stem (ResNets only; the MLP has no convolution).
        seed: int >= 0; the same seed gives identical weights (on every rank).

    Raises:
        ValueError: unknown ``name`` (the message lists :data:`MODELS`) or invalid arguments.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if (not isinstance(input_shape, (tuple, list)) or not input_shape
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in input_shape)):
        raise ValueError(f"build_model: input_shape must be a non-empty tuple of positive ints, "
                         f"got {input_shape!r}")
    input_shape = tuple(input_shape)
    num_classes = _check_int(num_classes, "num_classes", 2)
    width = _check_int(width, "width", 1, _MAX_WIDTH)
    seed = _check_int(seed, "seed", 0, 2**63 - 1)
    if act_bits is not None:
        _check_int(act_bits, "act_bits", 1, 4)
        if name == "mlp":
            raise ValueError("build_model: act_bits (Squeeze-and-Threshold activation quantization) "
                             "applies to the convolutional models resnet1d/resnet2d, not 'mlp'")

    if name == "resnet1d" and len(input_shape) != 2:
        raise ValueError(f"build_model: resnet1d takes input_shape (C, L), got {input_shape}")
    if name == "resnet2d" and len(input_shape) != 3:
        raise ValueError(f"build_model: resnet2d takes input_shape (C, H, W), got {input_shape}")
    # Allocate on the meta device: the layers' default reset_parameters() would draw from the
    # global RNG. to_empty() gives uninitialized CPU storage that _init_ fills completely.
    with torch.device("meta"):
        if name == "mlp":
            model: nn.Module = MLP(math.prod(input_shape), num_classes, width)
        else:
            model = ResNet(1 if name == "resnet1d" else 2, input_shape[0], num_classes, width)
    model = model.to_empty(device="cpu")
    _init_(model, torch.Generator().manual_seed(derive_key(seed, _INIT_STREAM)))

    if act_bits is not None:
        from gradcomp.nn import convert_st  # imported here: only the ST variant needs it

        # ST's default initialization uses no RNG (DCT attention weights, fixed initial step),
        # so the converted model is as deterministic as the base model.
        model = convert_st(model, act_bits)
    return model
