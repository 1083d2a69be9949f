"""Neural-gradient quantization: quantize/prune the gradient flowing back through a layer.

The method of the lognormal seed paper (Chmiel et al., ICLR 2021). :class:`GradQuant` is the
identity in the forward pass. In the backward pass it takes the gradient w.r.t. its input (the
"neural gradient" of the layer it follows) and

1. stochastically prunes it at the threshold that gives ``sparsity`` under the layer's
   lognormal fit (:func:`gradcomp.numerics.lognormal.threshold_for_sparsity`; unbiased), if ``sparsity > 0``;
2. rounds it onto a ``bits``-bit float (sign included), if ``bits`` is set, with the
   exponent/mantissa split ``E*`` chosen from the fit (``criterion="relative"``: the seed's
   exact mean relative error, the setting of its table; ``"mse"`` also available), shifted by
   ``exp_offset`` (the seed's ``E*+1``, ``E*-1``, ``E*-2`` columns), and a power-of-two scale that
   never saturates the gradient's largest value. Stochastic rounding (default) is unbiased.

The lognormal fit of each layer's gradient is refreshed every ``refit_every`` backward passes
(the first backward always fits). Random keys: ``derive_key(seed, step, index, phase)`` with
the module's ``index`` (set by :func:`convert_gradquant`) and ``phase`` 1 for pruning, 2 for
rounding; never the global RNG. Non-finite gradients pass through untouched (AMP's loss
scaler must see them).

Example:
    >>> layer = torch.nn.Sequential(torch.nn.Linear(8, 8), GradQuant(bits=6))
    >>> layer(torch.randn(4, 8)).sum().backward()  # the gradient into Linear was FP6
"""

from __future__ import annotations

import torch
from torch import nn

from gradcomp.codecs.base import fit_or_none
from gradcomp.codecs.dense import CRITERIA, FPPlan, abs_max_and_nonfinite, cover_max, fp_plan
from gradcomp.numerics import lognormal
from gradcomp.numerics.pruning import stochastic_prune
from gradcomp.numerics.quant import ROUNDING_MODES, quantize
from gradcomp.numerics.rng import derive_key


class _GradQuantFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.module.transform(grad), None


class GradQuant(nn.Module):
    """Identity forward; in backward, prune and/or FP-quantize the gradient (see module doc).

    Args:
        bits: total FP bits of the gradient (2..16, sign included); ``None``: no rounding.
        sparsity: target fraction of zeros from stochastic pruning, in [0, 0.9999]; 0: none.
        exp_bits: fix the split instead of choosing ``E*`` from the fit.
        exp_offset: add to the chosen ``E*`` (clamped to the valid splits).
        rounding: ``"stochastic"`` (unbiased) or ``"nearest"``.
        criterion: how ``E*`` is chosen: ``"relative"`` (the seed's) or ``"mse"``.
        refit_every: backward passes between lognormal refits (>= 1).
        seed, index: key of the random draws (``index`` tells layers apart).
    """

    def __init__(self, bits: int | None = None, sparsity: float = 0.0, *, exp_bits: int | None = None,
                 exp_offset: int = 0, rounding: str = "stochastic", criterion: str = "relative",
                 refit_every: int = 100, seed: int = 0, index: int = 0):
        super().__init__()
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16):
            raise ValueError(f"GradQuant: bits must be None or an int in 2..16, got {bits!r}")
        if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 <= sparsity <= 0.9999:
            raise ValueError(f"GradQuant: sparsity must be in [0, 0.9999], got {sparsity!r}")
        if rounding not in ROUNDING_MODES:
            raise ValueError(f"GradQuant: rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"GradQuant: criterion must be one of {CRITERIA}, got {criterion!r}")
        for name, v, lo in (("refit_every", refit_every, 1), ("seed", seed, 0), ("index", index, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"GradQuant: {name} must be an int >= {lo}, got {v!r}")
        if isinstance(exp_offset, bool) or not isinstance(exp_offset, int):
            raise ValueError(f"GradQuant: exp_offset must be an int, got {exp_offset!r}")
        if bits is not None:
            allowed = [f.exp_bits for f in lognormal.candidate_formats(bits)]
            if exp_bits is not None and exp_bits not in allowed:
                raise ValueError(f"GradQuant: exp_bits for {bits} bits must be None or one of {allowed}")
        elif exp_bits is not None or exp_offset:
            raise ValueError("GradQuant: exp_bits/exp_offset need bits")
        self.bits, self.sparsity, self.exp_bits, self.exp_offset = bits, float(sparsity), exp_bits, exp_offset
        self.rounding, self.criterion = rounding, criterion
        self.refit_every, self.seed, self.index = refit_every, seed, index
        self.step = 0
        self.fit: lognormal.LognormalFit | None = None
        self.plan: FPPlan | None = None
        self.alpha: float | None = None

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, sparsity={self.sparsity}, exp_offset={self.exp_offset}, "
                f"rounding={self.rounding!r}, refit_every={self.refit_every}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad or (self.bits is None and not self.sparsity):
            return x
        return _GradQuantFn.apply(x, self)

    def _refit(self, g: torch.Tensor) -> None:
        self.fit = fit_or_none(g)
        if self.fit is None:
            self.plan, self.alpha = None, None
            return
        if self.sparsity:
            self.alpha = lognormal.threshold_for_sparsity(self.sparsity, self.fit.mu, self.fit.sigma)
        if self.bits is not None:
            formats = {f.exp_bits: f for f in lognormal.candidate_formats(self.bits)}
            e = self.exp_bits
            if e is None:
                e = fp_plan(self.bits, None, self.rounding, self.fit, self.criterion).fmt.exp_bits
                e = min(max(e + self.exp_offset, min(formats)), max(formats))
            self.plan = fp_plan(self.bits, e, self.rounding, self.fit, self.criterion)

    @torch.no_grad()
    def transform(self, grad: torch.Tensor) -> torch.Tensor:
        """Return the pruned/quantized ``grad`` (same dtype); advances the step counter."""
        g = grad.to(torch.float32)
        amax, nonfinite = abs_max_and_nonfinite(g.reshape(-1))
        step, self.step = self.step, self.step + 1
        if nonfinite:
            return grad
        if step % self.refit_every == 0 or self.fit is None:
            self._refit(g)
        if self.fit is None:  # an all-zero gradient
            return grad
        out = g
        if self.sparsity and self.alpha is not None:
            out = stochastic_prune(out, self.alpha, key=derive_key(self.seed, step, self.index, 1))
        if self.plan is not None:
            # Pruned entries are +-alpha, which can exceed the gradient's own max.
            top = max(amax, self.alpha) if self.sparsity and self.alpha is not None else amax
            plan = cover_max(self.plan, out, top)
            key = derive_key(self.seed, step, self.index, 2) if self.rounding == "stochastic" else None
            out = quantize(out, plan.fmt, self.rounding, key=key, scale_exp=plan.scale_exp)
        return out.to(grad.dtype)


def convert_gradquant(model: nn.Module, layer_types=(nn.Conv1d, nn.Conv2d, nn.Linear),
                      skip_last: bool = True, **options) -> list[GradQuant]:
    """Attach a :class:`GradQuant` after every layer of ``layer_types`` in ``model`` (in place).

    Each layer gets a ``grad_quant`` submodule (no parameters, so ``state_dict`` keys do not
    change) applied to its output by a forward hook; indices follow the layers' order.
    ``skip_last`` leaves the last such layer alone (its output gradient is the loss gradient,
    which the seed keeps in full precision). Returns the inserted modules.
    """
    layers = [m for m in model.modules() if isinstance(m, tuple(layer_types))]
    if skip_last and layers:
        layers = layers[:-1]
    inserted = []
    for i, layer in enumerate(layers):
        if hasattr(layer, "grad_quant"):
            raise ValueError(f"convert_gradquant: {type(layer).__name__} already has a grad_quant")
        gq = GradQuant(index=i, **options)
        layer.grad_quant = gq
        layer.register_forward_hook(lambda mod, inp, out: mod.grad_quant(out))
        inserted.append(gq)
    return inserted
