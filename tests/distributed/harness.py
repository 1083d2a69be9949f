"""Spawn gloo ranks for a test: FileStore in a temp dir, no fixed ports, results via files."""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, workdir: str, fn, args) -> None:
    torch.set_num_threads(1)
    out = Path(workdir) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(workdir, "store"), world),
                                rank=rank, world_size=world)
        result = fn(rank, world, *args)
        torch.save({"ok": result}, out)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, out)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def progress(rank: int, text: str) -> None:
    """Record what rank ``rank`` is doing now (a timed-out :func:`spawn` reports it)."""
    workdir = os.environ.get("GRADCOMP_TEST_WORKDIR")
    if workdir:
        Path(workdir, f"progress{rank}.txt").write_text(text)


def spawn(world: int, fn, tmp_path: Path, *args, timeout: float | None = None) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return each rank's result.

    With ``timeout`` (seconds) the ranks are killed once it passes and the test fails with what
    each rank was doing (:func:`progress`): a hang fails the test instead of blocking CI.
    """
    workdir = Path(tmp_path) / f"spawn-{fn.__name__}-{world}"
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["GRADCOMP_TEST_WORKDIR"] = str(workdir)  # inherited by the spawned ranks
    try:
        ctx = mp.start_processes(_entry, args=(world, str(workdir), fn, args), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not ctx.join(timeout=None if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))):
                if deadline is not None and time.monotonic() >= deadline:
                    doing = {r: (workdir / f"progress{r}.txt").read_text()
                             if (workdir / f"progress{r}.txt").exists() else "?" for r in range(world)}
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    for p in ctx.processes:
                        p.join(5)
                    raise AssertionError(f"{fn.__name__} on {world} ranks did not finish within "
                                         f"{timeout:g} s (a hang); ranks were at: {doing}")
        except mp.ProcessRaisedException:
            pass  # the rank's traceback is in its result file; report it below
        except mp.ProcessExitedException as exc:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"{fn.__name__}: a rank died: {exc}") from None
    finally:
        os.environ.pop("GRADCOMP_TEST_WORKDIR", None)
    files = [workdir / f"rank{r}.pt" for r in range(world)]
    data = [torch.load(f, weights_only=False) if f.exists() else None for f in files]
    for r, d in enumerate(data):
        if d is not None and "error" in d:
            raise AssertionError(f"rank {r} failed:\n{d['error']}")
    missing = [r for r, d in enumerate(data) if d is None]
    if missing:
        raise AssertionError(f"{fn.__name__}: ranks {missing} ended without a result")
    return [d["ok"] for d in data]


class FakeBucket:
    """The part of ``dist.GradBucket`` the hook uses (it has no Python constructor)."""

    def __init__(self, buffer: torch.Tensor, index: int = 0, last: bool = True, params=None):
        self._buffer, self._index, self._last = buffer, index, last
        self._params = params if params is not None else [torch.nn.Parameter(torch.empty(buffer.numel()))]

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last

    def parameters(self):
        return self._params
