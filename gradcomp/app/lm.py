"""A GPT-style byte-level decoder: the language model of the transformer benchmark.

:class:`GPT` is token embedding + learned position embedding, ``n_layer`` pre-LayerNorm blocks
(``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``; causal multi-head self-attention through
``torch.nn.functional.scaled_dot_product_attention``; MLP ``d -> 4d -> d`` with GELU), a final
LayerNorm and an output projection whose weight *is* the token embedding (tied: one
``Parameter``, so DDP and optimizers see it once). Every linear layer has a bias, as in GPT-2.
The forward pass returns logits ``(batch, time, vocab)``; :func:`lm_loss` is the mean
next-token cross-entropy in nats.

Parameters: ``vocab*d + context*d + n_layer*(12*d*d + 13*d) + 2*d`` (:func:`lm_num_parameters`);
the default :func:`build_lm` (d 256, 7 layers, context 128, vocab 256) has 5,627,136.

Initialization is explicit and seeded, as in :mod:`gradcomp.app.models`: normal(0, 0.02) for
embeddings and linear weights, the two residual output projections of each block
normal(0, 0.02 / sqrt(2 * n_layer)) (GPT-2), zero biases, LayerNorm (1, 0), all drawn from a
``torch.Generator`` seeded from ``seed`` on a model allocated on the meta device: the same seed
gives bit-identical weights on every rank, and building never draws from torch's global RNG.

Example:
    >>> m = build_lm(d_model=64, n_layer=2, n_head=4, context=32, seed=0)
    >>> m(torch.zeros(3, 32, dtype=torch.long)).shape
    torch.Size([3, 32, 256])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gradcomp.numerics.rng import derive_key

__all__ = ["GPT", "Block", "build_lm", "lm_loss", "lm_num_parameters"]

_INIT_STREAM = 0x6E7


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP, each residual."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.gelu = nn.GELU()
        self.fc_out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(self.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Decoder-only byte-level language model with tied input/output embeddings (module docstring)."""

    def __init__(self, vocab_size: int, context: int, d_model: int, n_layer: int, n_head: int):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"GPT: sequence of {t} tokens exceeds the context of {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``logits`` ``(B, T, V)`` against ``targets`` ``(B, T)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lm_num_parameters(vocab_size: int, context: int, d_model: int, n_layer: int) -> int:
    """Return :class:`GPT`'s parameter count (tied embedding counted once)."""
    return vocab_size * d_model + context * d_model + n_layer * (12 * d_model * d_model + 13 * d_model) + 2 * d_model


def _check(value, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"build_lm: {name} must be an int >= {lo}, got {value!r}")
    return value


@torch.no_grad()
def _init_(model: GPT, n_layer: int, generator: torch.Generator) -> None:
    resid_std = 0.02 / math.sqrt(2 * n_layer)
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02, generator=generator)
        elif isinstance(m, nn.Linear):
            if m is model.head:
                continue  # tied to the token embedding
            std = resid_std if name.endswith((".proj", ".fc_out")) else 0.02
            nn.init.normal_(m.weight, 0.0, std, generator=generator)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_lm(*, vocab_size: int = 256, context: int = 128, d_model: int = 256, n_layer: int = 7,
             n_head: int = 4, seed: int = 0) -> GPT:
    """Build a :class:`GPT` with deterministic weights from ``seed`` (see the module docstring).

    Raises:
        ValueError: a size below 1 (``vocab_size`` below 2), ``d_model`` not divisible by
            ``n_head``, or a negative ``seed``.
    """
    _check(vocab_size, "vocab_size", 2)
    for name, v in (("context", context), ("d_model", d_model), ("n_layer", n_layer), ("n_head", n_head)):
        _check(v, name, 1)
    _check(seed, "seed", 0)
    if d_model % n_head:
        raise ValueError(f"build_lm: d_model {d_model} must be divisible by n_head {n_head}")
    with torch.device("meta"):
        model = GPT(vocab_size, context, d_model, n_layer, n_head)
    model = model.to_empty(device="cpu")
    model.head.weight = model.tok.weight  # to_empty re-creates parameters: tie again
    _init_(model, n_layer, torch.Generator().manual_seed(derive_key(seed, _INIT_STREAM)))
    return model
