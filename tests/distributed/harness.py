"""Spawn gloo ranks for a test: FileStore in a temp dir, no fixed ports, results via files."""

from __future__ import annotations

import os
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


def spawn(world: int, fn, tmp_path: Path, *args) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return each rank's result."""
    workdir = Path(tmp_path) / f"spawn-{fn.__name__}-{world}"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        mp.spawn(_entry, args=(world, str(workdir), fn, args), nprocs=world, join=True)
    except mp.ProcessRaisedException:
        pass  # the rank's traceback is in its result file; report it below
    results = []
    for r in range(world):
        data = torch.load(workdir / f"rank{r}.pt", weights_only=False)
        if "error" in data:
            raise AssertionError(f"rank {r} failed:\n{data['error']}")
        results.append(data["ok"])
    return results


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
