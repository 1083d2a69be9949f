"""Per-rank bodies of the training-loop tests (importable by spawned processes)."""

from __future__ import annotations

import torch

from gradcomp.train import TrainConfig, train


class Crash(RuntimeError):
    pass


def run_config(rank: int, world: int, config: dict, crash_at: int | None = None) -> dict:
    """Train with ``config`` on the existing process group; optionally raise at ``crash_at``."""
    def on_step(step: int) -> None:
        if crash_at is not None and step == crash_at:
            raise Crash(f"injected at step {step}")

    try:
        result = train(TrainConfig(**config), on_step=on_step)
    except Crash:
        return {"crashed": True}
    return result


def final_checkpoint_params(path: str) -> dict:
    from gradcomp.train import latest_checkpoint

    d = latest_checkpoint(path)
    return torch.load(d / "model.pt", weights_only=True)["model"]


def run_many(rank: int, world: int, runs: list) -> dict:
    """Run ``(name, config, crash_at)`` cases in order on one spawn; results by name."""
    return {name: run_config(rank, world, cfg, crash) for name, cfg, crash in runs}
