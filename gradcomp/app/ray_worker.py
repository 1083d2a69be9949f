"""What runs inside each Ray worker of ``gradcomp-launch``.

:func:`train_worker` is the Ray Train (``TorchTrainer``) train function and
:func:`horovod_worker` the ``horovod.ray.RayExecutor`` one; both take the driver's payload, a
dict with ``config`` (:meth:`TrainConfig.to_dict`), ``inject_fault`` (``(rank, step)`` or
``None``) and ``scratch_dir`` (the embedded Ray's temp root, or ``None``). Ray pickles them by
reference, so they stay module-level functions of this module. :func:`train_worker` resumes from
the newest checkpoint every rank can load and reports the run's result to Ray as JSON under
:data:`RESULT_KEY`. A worker's progress bar reaches the driver as stdout lines that start with
:data:`PROGRESS_MARK` (:class:`_ProgressRelay`). Ray, torch.distributed and the training loop
are imported when a worker runs, not when this module is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from gradcomp.app.config import TrainConfig

RESULT_KEY = "gradcomp_result_json"  # the metric of train_worker's last report: the result as JSON
PROGRESS_MARK = "@gradcomp-progress@ "  # a worker's stdout line that carries a redraw of the bar


def _step_of(path) -> int:
    """The step of a ``step-N`` checkpoint directory, -1 for any other name."""
    name = Path(path).name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else -1


def _choose_resume(ray_dir: str | None, checkpoint_dir: str | None, rank: int, world: int) -> str | None:
    """Pick the newest checkpoint every rank can load: Ray's, or ours if all ranks see it.

    Ray registers a reported checkpoint only when its controller next polls the workers, so a
    crash right after a report can leave Ray one checkpoint behind. Our own ``latest`` is
    complete once published; on a shared file system (or one machine) every rank sees it and
    it is used when newer. On separate disks the ranks disagree and Ray's copy is used.
    """
    import torch.distributed as dist

    from gradcomp.app.checkpoint import latest_checkpoint

    ours = None
    if checkpoint_dir is not None:
        try:
            d = latest_checkpoint(checkpoint_dir)
        except ValueError:
            d = None
        if d is not None and (d / f"compression-rank{rank}.pt").is_file():
            ours = str(d.resolve())
    seen = [None] * world
    dist.all_gather_object(seen, ours)
    ray_step = _step_of(ray_dir) if ray_dir is not None else -1
    if ours is not None and all(x == ours for x in seen) and _step_of(ours) > ray_step:
        return ours
    return ray_dir


def _scratch_dir(payload: dict) -> str | None:
    """Where a worker puts its temporary directories: inside the embedded Ray's temp root (the
    launcher deletes it however the run ends), else Ray's session directory on that node."""
    scratch = payload.get("scratch_dir")
    if scratch and os.path.isdir(scratch):
        return scratch
    try:
        import ray

        node = getattr(ray._private.worker, "_global_node", None)
        return None if node is None else node.get_session_dir_path()
    except Exception:  # pragma: no cover - private API moved: the system temp dir
        return None


class _ProgressRelay:
    """The progress bar's file in a Ray worker: each redraw tqdm writes becomes one stdout line
    ``PROGRESS_MARK + json`` (the bar's text, or ``null`` when the bar is closed), which Ray
    forwards to the driver, where :class:`gradcomp.app.launch._RayOutput` draws it as the only
    terminal output."""

    def write(self, s: str) -> int:
        # sys.stdout.write, not print: Ray Train patches print() in its workers to also log
        # through the root logger (each line would arrive twice)
        lines = [PROGRESS_MARK + json.dumps(t) for t in (p.strip("\n") for p in s.split("\r")) if t.strip()]
        if "\n" in s:
            lines.append(PROGRESS_MARK + "null")
        if lines:
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
        return len(s)

    def flush(self) -> None:
        sys.stdout.flush()


def train_worker(payload: dict) -> None:
    """Ray Train worker: resume from the newest checkpoint every rank can load (Ray's or the
    run's own ``checkpoints/latest``), train, report checkpoints to Ray, and finally report the
    result as JSON under :data:`RESULT_KEY` (with a small checkpoint from rank 0)."""
    import ray.train
    from ray.train import Checkpoint

    from gradcomp.app.train import train

    config = TrainConfig.from_dict(payload["config"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    scratch = _scratch_dir(payload)
    tmp = None
    ray_dir = None
    if checkpoint is not None:
        tmp = tempfile.mkdtemp(prefix="gradcomp-restore-", dir=scratch)
        ray_dir = checkpoint.to_directory(tmp)
        if not (Path(ray_dir) / "model.pt").is_file():
            ray_dir = None  # the final "result" report of a finished run (--resume): not a training state
    resume_from = _choose_resume(ray_dir, config.checkpoint_dir, rank, ctx.get_world_size())
    fault = payload.get("inject_fault")
    # Only the first attempt crashes: a restarted group resumes from a checkpoint.
    kill_at = fault[1] if fault is not None and fault[0] == rank and resume_from is None else None

    def reporter(metrics: dict, path) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        if path is not None:
            ray.train.report(clean, checkpoint=Checkpoint.from_directory(str(path)),
                             checkpoint_dir_name=Path(path).name)
        else:
            ray.train.report(clean)

    def on_step(step: int) -> None:
        if kill_at is not None and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash, not an exception: nothing gets to clean up

    try:
        result = train(config, reporter=reporter, resume_from=resume_from, on_step=on_step,
                       progress_stream=_ProgressRelay())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    # Where each rank ran (multi-node placement is part of the result).
    import torch.distributed as dist

    nodes = [None] * ctx.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    result["worker_nodes"] = nodes
    # The driver reads the metrics of the last checkpoint (Result.metrics): rank 0 reports the
    # result with a small checkpoint of its own, so no shared file system is needed for it.
    final = Path(tempfile.mkdtemp(prefix="gradcomp-result-", dir=scratch))
    try:
        (final / "result.json").write_text(json.dumps(result, indent=2))
        ray.train.report({RESULT_KEY: json.dumps(result)},
                         checkpoint=Checkpoint.from_directory(str(final)) if rank == 0 else None,
                         checkpoint_dir_name="result")
    finally:
        shutil.rmtree(final, ignore_errors=True)


def horovod_worker(payload: dict) -> dict:
    """Horovod worker (``horovod.ray.RayExecutor``): train; return the result dict."""
    from gradcomp.app.train import train

    return train(TrainConfig.from_dict(payload["config"]), progress_stream=_ProgressRelay())
