"""Stochastic pruning: unbiased sparsification of small magnitudes (the seed paper's operator).

With threshold ``alpha`` and ``eps ~ U(0, 1)`` drawn per element::

    T(x) = x                 if |x| > alpha
         = sign(x) * alpha   if alpha * eps <= |x| <= alpha
         = 0                 otherwise

so ``E[T(x)] = x``. The uniforms come from :mod:`gradcomp.numerics.rng` (24-bit, centred), so the keep
probability ``|x| / alpha`` is exact to within ``2**-24``.
"""

from __future__ import annotations

import math

import torch

from gradcomp.numerics import lognormal
from gradcomp.numerics.rng import resolve_key, uniform


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}") from None
    if not (math.isfinite(a) and a > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    return a


def stochastic_prune(
    x: torch.Tensor,
    alpha: float,
    generator: torch.Generator | None = None,
    *,
    key: int | None = None,
) -> torch.Tensor:
    """Return ``T(x)``: entries above ``alpha`` kept, the rest set to ``+-alpha`` or 0, unbiased.

    Computed and returned in float32 (float64 for float64 input), same shape. NaN and inf
    entries pass through unchanged (``|inf| > alpha``; NaN is never turned into a number).
    Draws from ``generator`` (one draw) or uses ``key``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> stochastic_prune(torch.tensor([3.0, -0.5, 0.0]), 1.0, g).abs().tolist() in (
        ...     [3.0, 1.0, 0.0], [3.0, 0.0, 0.0])
        True
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("stochastic_prune: expected a floating-point torch.Tensor")
    a = _check_alpha(alpha)
    k = resolve_key(generator, key, "stochastic_prune")
    xs = x if x.dtype == torch.float64 else x.to(torch.float32)
    ax = xs.abs()
    eps = uniform(xs.numel(), k, xs.device).view(xs.shape).to(xs.dtype)
    # eps * alpha <= |x| has probability |x| / alpha for |x| <= alpha; NaN compares False
    # everywhere, so it is restored explicitly below.
    small = torch.where(eps * a <= ax, torch.copysign(torch.full_like(xs, a), xs), torch.zeros_like(xs))
    out = torch.where(ax > a, xs, small)
    return torch.where(torch.isnan(xs), xs, out)


def prune_to_sparsity(
    x: torch.Tensor,
    sparsity: float,
    generator: torch.Generator | None = None,
    *,
    key: int | None = None,
    fit: lognormal.LognormalFit | None = None,
) -> tuple[torch.Tensor, float]:
    """Stochastically prune ``x`` at the threshold that gives ``sparsity`` under a lognormal fit.

    ``fit`` defaults to ``lognormal.fit(x)``; the threshold is
    ``lognormal.threshold_for_sparsity(sparsity, fit.mu, fit.sigma)``. Returns ``(pruned, alpha)``.
    The achieved sparsity matches the target to the extent |x| is lognormal.
    """
    f = lognormal.fit(x) if fit is None else fit
    alpha = lognormal.threshold_for_sparsity(sparsity, f.mu, f.sigma)
    return stochastic_prune(x, alpha, generator, key=key), alpha
