"""Error-feedback memory: what each rank's payloads failed to carry, added to its next step.

Worker side (``worker``): per bucket, the residual ``x - decode(encode(x))`` of this rank's
input ``x`` (the gradient plus the previous residual), flat in the bucket's layout; when the
layout changes (DDP rebuilds its buckets after the first step, or a restored checkpoint) the
stored residuals are spilled into per-parameter pieces and reassembled for the new buckets.
Reduce side (``reduce``, two-phase only): per bucket, the residual of the re-encoded mean of
this rank's own shard.

Overflow safety: residuals are staged per step and committed when the step ends
(:meth:`ErrorFeedbackMemory.finish_step`), unless a bucket of that step had a non-finite result
(:meth:`mark_nonfinite`): then the whole step's residuals are dropped and the previous step's
kept, so one inf (an AMP overflow step that GradScaler skips) does not poison the memory.

Invariant: ``input == decoded + residual`` up to the rounding of the one float32 subtraction
(``tests/unit/test_codec_contract.py``).

Example:
    >>> import torch
    >>> memory = ErrorFeedbackMemory()
    >>> memory.start_step(0)
    >>> layout = ((0, 3),)
    >>> memory.stage(0, layout, torch.tensor([0.5, 0.0, -0.25]))
    >>> memory.finish_step()
    False
    >>> memory.residual_for(0, layout, torch.zeros(3)).tolist()
    [0.5, 0.0, -0.25]
"""

from __future__ import annotations

import torch


class ErrorFeedbackMemory:
    """Staged and committed residuals of the worker and reduce sides (see the module docstring)."""

    def __init__(self) -> None:
        self.residuals: dict[int, tuple[tuple, torch.Tensor]] = {}  # bucket -> (layout, flat)
        self.reduce_residuals: dict[int, tuple[tuple, torch.Tensor]] = {}  # bucket -> ((N, numel), shard)
        self.pending: dict[int, torch.Tensor] = {}  # parameter key -> residual (after a rebuild/load)
        self._staged: dict[int, tuple[tuple, torch.Tensor]] = {}
        self._staged_reduce: dict[int, tuple[tuple, torch.Tensor]] = {}
        self._step = -1
        self._nonfinite = False

    # ---- a step
    def start_step(self, step: int) -> None:
        """Begin staging for ``step``; a step whose end never came keeps what it staged."""
        if step != self._step:
            self._commit(keep=True)
            self._step, self._nonfinite = step, False

    def mark_nonfinite(self) -> None:
        """A bucket of the current step had a non-finite result: drop the step's residuals at its end."""
        self._nonfinite = True

    def finish_step(self) -> bool:
        """Commit (or, after :meth:`mark_nonfinite`, drop) the step's residuals; return whether it was non-finite."""
        nonfinite = self._nonfinite
        self._commit(keep=not nonfinite)
        self._step, self._nonfinite = -1, False
        return nonfinite

    def _commit(self, keep: bool) -> None:
        if keep:
            self.residuals.update(self._staged)
            self.reduce_residuals.update(self._staged_reduce)
        self._staged.clear()
        self._staged_reduce.clear()

    def stage(self, index: int, layout: tuple, residual: torch.Tensor) -> None:
        self._staged[index] = (layout, residual)

    def stage_reduce(self, index: int, shape: tuple, residual: torch.Tensor) -> None:
        self._staged_reduce[index] = (shape, residual)

    # ---- reading
    def residual_for(self, index: int, layout: tuple, x: torch.Tensor) -> torch.Tensor:
        """Residual of bucket ``index`` for ``x``'s device and dtype; re-keyed by parameter when the
        buckets changed (zeros for parameters without one)."""
        stored = self.residuals.get(index)
        if stored is not None and stored[0] == layout:
            return stored[1]
        for old_layout, flat in self.residuals.values():
            offset = 0
            for key, numel in old_layout:
                self.pending[key] = flat[offset:offset + numel]
                offset += numel
        self.residuals.clear()
        pieces = [self.pending.pop(key, None) for key, _ in layout]
        return torch.cat([p.to(x.device, x.dtype) if p is not None and p.numel() == numel
                          else torch.zeros(numel, dtype=x.dtype, device=x.device)
                          for p, (_, numel) in zip(pieces, layout)]) if layout else torch.zeros_like(x)

    def reduce_residual_for(self, index: int, mean: torch.Tensor) -> torch.Tensor:
        stored = self.reduce_residuals.get(index)
        if stored is not None and stored[1].numel() == mean.numel():
            return stored[1]
        return torch.zeros_like(mean)

    # ---- checkpoints
    def by_parameter(self, keys) -> dict[int, torch.Tensor]:
        """Worker-side residuals by parameter key (copies), for the keys in ``keys``."""
        out = {}
        for layout, flat in self.residuals.values():
            offset = 0
            for key, numel in layout:
                if key in keys:
                    out[int(key)] = flat[offset:offset + numel].clone()
                offset += numel
        for key, piece in self.pending.items():
            if key in keys:
                out[int(key)] = piece.clone()
        return out

    def load(self, residuals: dict, reduce_residuals: dict, reduce_layouts: dict) -> None:
        """Restore residuals saved by parameter key and reduce-side residuals by bucket."""
        self.residuals.clear()
        self._staged.clear()
        self._staged_reduce.clear()
        self._step, self._nonfinite = -1, False
        self.pending = {int(k): v for k, v in residuals.items()}
        self.reduce_residuals = {int(b): (tuple(reduce_layouts[b]), t) for b, t in reduce_residuals.items()}
