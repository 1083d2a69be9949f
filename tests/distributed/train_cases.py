"""Per-rank bodies of the training-loop tests (importable by spawned processes)."""

from __future__ import annotations

import torch

from gradcomp.app.train import TrainConfig, train


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
    from gradcomp.app.train import latest_checkpoint

    d = latest_checkpoint(path)
    return torch.load(d / "model.pt", weights_only=True)["model"]


def run_many(rank: int, world: int, runs: list) -> dict:
    """Run ``(name, config, crash_at)`` cases in order on one spawn; results by name."""
    return {name: run_config(rank, world, cfg, crash) for name, cfg, crash in runs}


# ------------------------------------------------------------------ faults (test_train_faults)
def _snapshot(root) -> dict:
    import hashlib
    from pathlib import Path

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(root).rglob("*"))}


def resume_disagreement(rank: int, world: int, config: dict, crash_at: int) -> dict:
    """Crash a run, then resume it with rank 1's compression state deleted, then truncated, then
    intact. Each rank returns, per attempt, the error it raised (type and message) or its result."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    from gradcomp.app.train import latest_checkpoint

    out = {"crash": run_config(rank, world, config, crash_at)}
    step_dir = latest_checkpoint(config["checkpoint_dir"])
    victim = step_dir / "compression-rank1.pt"
    backup = Path(config["checkpoint_dir"]).parent / "backup-rank1.pt"
    resume = dict(config, resume=True)

    def attempt(name: str) -> None:
        before = _snapshot(config["checkpoint_dir"])
        try:
            res = train(TrainConfig(**resume))
            out[name] = {"ok": True, "resumed_from_step": res["resumed_from_step"], "steps": res["steps"]}
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out[name] = {"ok": False, "type": type(exc).__name__, "message": str(exc),
                         "is_value_error": isinstance(exc, ValueError),
                         "unchanged": _snapshot(config["checkpoint_dir"]) == before}
        dist.barrier()

    if rank == 0:
        shutil.copy2(victim, backup)
        victim.unlink()
    dist.barrier()
    attempt("missing")
    if rank == 0:
        data = backup.read_bytes()
        victim.write_bytes(data[:len(data) // 3])
    dist.barrier()
    attempt("truncated")
    if rank == 0:
        shutil.copy2(backup, victim)
    dist.barrier()
    attempt("intact")
    out["victim"] = str(victim)
    return out


def stall_rank(rank: int, world: int, workdir: str, mode: str, config: dict, port: int, stop_at: int) -> None:
    """Train; rank 1 stops itself (SIGSTOP) after step ``stop_at``. The other rank records how
    long after its own step ``stop_at`` train() raised, and what it said.

    ``mode``: ``"owned"`` (train() creates the group from the env:// contract, so
    ``config['timeout']`` is the group's timeout) or ``"external"`` (the group exists, created
    here on a FileStore with torch's default timeout; only the hook's group gets the timeout).
    """
    import math
    import os
    import signal
    import time
    from pathlib import Path

    import torch.distributed as dist

    torch.set_num_threads(1)
    if mode == "owned":
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    else:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(workdir, "store"), world),
                                rank=rank, world_size=world)
    marks = {"t": math.nan, "step": None}

    def on_step(step: int) -> None:
        marks["t"], marks["step"] = time.monotonic(), step
        if rank == 1 and step == stop_at:
            os.kill(os.getpid(), signal.SIGSTOP)

    try:
        train(TrainConfig(**config), on_step=on_step)
        result = {"error": None}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result = {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - marks["t"],
                  "last_step": marks["step"]}
    torch.save(result, Path(workdir) / f"stall{rank}.pt")
