"""Train a model with compressed gradients: one loop for every launcher.

:func:`train` runs single-process, under ``torchrun``, under ``torch.multiprocessing``, inside
Ray Train workers and inside Horovod workers. It reads the standard environment contract
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) unless a process
group already exists (Ray Train creates one before calling the train function; tests create
one on a ``FileStore``). With one process it trains without DDP and without a hook (the codec
has nothing to cross).

What it does, all from one validated :class:`~gradcomp.app.config.TrainConfig`:

* data from :mod:`gradcomp.app.data` (no download), sharded by rank; model from
  :mod:`gradcomp.app.models`, optionally with Squeeze-and-Threshold activations (``act_bits``) and
  neural-gradient quantization (``gradquant_bits`` / ``gradquant_sparsity``);
* the gradient hook chosen by ``codec``: ``"none"`` (fp32 DDP), ``"fp16"`` and ``"powersgd"``
  (torch's own hooks, the baselines users would pick), or one of ours (``"fp"``, ``"prune"``,
  ``"prune-fp"``, ``"budget"``, ``"topk"``) through :func:`gradcomp.register`
  (:mod:`gradcomp.app.methods`);
* checkpoints every ``checkpoint_every`` steps and at every epoch end: model, optimizer, LR
  schedule, progress and each rank's compression state (residuals differ per rank), written
  to a fresh ``step-XXXXXXXX`` directory and published by an atomic rename of the ``latest``
  pointer, loaded back with ``torch.load(weights_only=True)`` and validated before anything
  is applied (a damaged or tampered file raises
  :class:`~gradcomp.app.checkpoint.CheckpointError` naming it; every rank
  checks that all ranks resume from the same point, see :func:`train`). A resumed run continues at the
  exact batch where the checkpoint was taken (the data order is a function of seed and epoch),
  with the LR schedule, hook step, fits, residuals and random keys where they were. Without a
  hook it reproduces the uninterrupted run bit for bit; with one, its first step runs on DDP's
  initial bucket layout (DDP reorders buckets after its first step), so that step's stochastic
  draws differ: same distribution, different bits (:mod:`gradcomp.app.checkpoint`);
* metrics as JSON lines (rank 0), a progress bar on rank 0, and a result dict.

Process groups are set up by :mod:`gradcomp.app.distributed`; the config and its validators
live in :mod:`gradcomp.app.config`. This module re-exports their public names, so
``from gradcomp.app.train import TrainConfig, CheckpointError, latest_checkpoint`` keeps working.

Example:
    >>> from gradcomp.app.train import TrainConfig, train
    >>> result = train(TrainConfig(model="resnet1d", dataset="mnist1d", epochs=1))  # doctest: +SKIP
    >>> result["final_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from gradcomp.app.checkpoint import (
    CHECKPOINT_FORMAT,
    RESUME_MUST_MATCH,
    CheckpointError,
    agree_on_resume,
    apply_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from gradcomp.app.config import (
    CODECS,
    DEVICES,
    ERROR_FEEDBACK,
    OPTIMIZERS,
    OUR_CODECS,
    SCHEDULES,
    TRANSPORTS,
    TrainConfig,
)
from gradcomp.app.distributed import (
    fully_shard_model,
    select_device,
    setup_distributed,
    sync_buffers,
    teardown_distributed,
)
from gradcomp.app.methods import CommHook, build_codec, error_feedback, horovod_dense_codec

__all__ = ["CHECKPOINT_FORMAT", "CODECS", "DEVICES", "ERROR_FEEDBACK", "OPTIMIZERS", "OUR_CODECS",
           "RESUME_MUST_MATCH", "SCHEDULES", "TRANSPORTS", "CheckpointError", "TrainConfig", "apply_checkpoint",
           "build_codec", "build_model", "evaluate", "latest_checkpoint", "load_checkpoint", "main",
           "read_checkpoint", "save_checkpoint", "train"]


def build_model(config: TrainConfig, bundle) -> tuple[nn.Module, list]:
    """Build the configured model (ST and GradQuant applied); return it and its GradQuant modules."""
    from gradcomp.app import models
    from gradcomp.nn import convert_gradquant

    model = models.build_model(config.model, input_shape=bundle.input_shape, num_classes=bundle.num_classes,
                               width=config.width, act_bits=config.act_bits, seed=config.seed)
    gq = []
    if config.gradquant_bits is not None or config.gradquant_sparsity > 0:
        gq = convert_gradquant(model, bits=config.gradquant_bits, sparsity=config.gradquant_sparsity,
                               exp_offset=config.gradquant_exp_offset, seed=config.seed)
    return model, gq


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on Squeeze-and-Threshold parameters: decay would pull the learned step
    # towards 1 and flatten the attention (the same reason BN's affine terms often skip it).
    decay = [p for n, p in model.named_parameters() if ".st." not in f".{n}"]
    keep = [p for n, p in model.named_parameters() if ".st." in f".{n}"]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def _lr_factor(config: TrainConfig, step: int, total: int) -> float:
    if config.schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


@torch.no_grad()
def evaluate(model: nn.Module, dataset, device: torch.device, batch_size: int = 512) -> tuple[float, float]:
    """Return (accuracy, mean loss) of ``model`` in eval mode over the whole ``dataset``."""
    was = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    x_all, y_all = dataset.tensors
    for i in range(0, len(y_all), batch_size):
        x, y = x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    model.train(was)
    return correct / max(n, 1), loss / max(n, 1)


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


class _Writable(Protocol):
    """What a progress bar writes to (a text stream, or the Ray launcher's relay)."""

    def write(self, s: str, /) -> int: ...

    def flush(self) -> None: ...


def train(config: TrainConfig, *, reporter: Callable[[dict, Path | None], None] | None = None,
          resume_from: str | os.PathLike | None = None, on_step: Callable[[int], None] | None = None,
          progress_stream: _Writable | None = None) -> dict:
    """Train per ``config``; return the run's results (same dict on every rank).

    ``reporter(metrics, checkpoint_dir_or_None)`` is called on every rank at each checkpoint and
    epoch end (Ray Train passes them to ``ray.train.report``). ``resume_from`` names a
    checkpoint directory (a ``step-*`` directory or a ``checkpoint_dir``) to start from;
    ``config.resume`` resumes from ``config.checkpoint_dir/latest`` when it exists.
    ``on_step(step)`` runs after every optimizer step (fault injection in tests, custom logging).
    ``progress_stream`` is where rank 0 draws the progress bar (default ``sys.stderr``; the Ray
    launcher passes a relay that the driver redraws).

    Resuming is all or nothing, and every rank resumes from the same point. Each rank reads and
    validates its files first (:func:`read_checkpoint`: ``model.pt`` and its own
    ``compression-rankN.pt``, loaded with ``weights_only=True``; structure, types, ranges, finite
    weights, shapes against this model, the saved config); any problem is a
    :class:`CheckpointError` (a ``ValueError``) that names the file, raised before anything is
    changed or written. With several ranks, one small all-gather then compares (checkpoint
    directory and step, compression state loaded/missing/afresh, hook step, error) across
    ranks, and if any rank cannot resume or the ranks disagree, **every rank raises**
    :class:`CheckpointError` naming the file at fault; a missing ``compression-rankN.pt`` (whose
    rank would restart its error feedback at hook step 0 while the others continue) is such an
    error, not a warning. Restore the file or resume from an older checkpoint. The one case where
    compression state starts afresh is a deliberate one that every rank sees alike: the
    checkpoint was written by another number of ranks, or by a run without compression state.

    A rank that stalls makes its peers fail after about ``config.timeout`` seconds with a
    ``RuntimeError`` naming the step, the rank and the timeout (see :class:`TrainConfig`).

    Results: ``final_accuracy`` (test set, eval mode), ``final_loss``, ``steps``, ``epochs``,
    ``wall_seconds``, ``step_time_p50``/``p90`` (seconds; forward+backward+communication+update),
    ``bytes_sent_per_step`` (per rank), ``bits_per_element``, ``bytes_source``, ``world_size``,
    ``parameters``, ``resumed_from_step`` (``None`` if started fresh), ``restarts``,
    ``history`` (per-epoch metrics).
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"train() needs a TrainConfig, got {type(config).__name__}")
    from gradcomp.app import data

    t_start = time.perf_counter()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = select_device(config, local)
    d = setup_distributed(config, device)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    hook: CommHook | None = None
    try:
        bundle = data.load_dataset(config.dataset, seed=config.seed, num_train=config.num_train)
        model, gradquant = build_model(config, bundle)
        model.to(device)
        fsdp = config.transport == "fsdp" and d.world_size > 1
        if fsdp:  # before the optimizer: fully_shard replaces the parameters by sharded DTensors
            fully_shard_model(model, d, device)
        optimizer = _optimizer(config, model)
        ddp = None
        net = model
        if d.horovod is not None:
            from gradcomp.comm.horovod import DistributedOptimizer

            optimizer = DistributedOptimizer(
                optimizer, list(model.named_parameters()), codec=build_codec(config) or horovod_dense_codec(config),
                error_feedback=error_feedback(config), seed=config.seed, collective=config.collective,
                warmup_steps=config.warmup_steps, refit_every=config.refit_every)
            d.horovod.broadcast_parameters(model.state_dict(), root_rank=0)
        elif d.world_size > 1 and not fsdp:
            ddp_kw: dict[str, Any] = {}
            if config.codec == "powersgd":
                # torch's PowerSGD hook blocks gloo's worker threads in nested all_reduce().wait()
                # when two buckets are in flight (found by benchmarks/bandwidth_accuracy.py): give
                # it one bucket. An explicit cap also replaces DDP's 1 MiB first bucket.
                size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
                ddp_kw["bucket_cap_mb"] = max(25.0, size_mb + 1.0)
            ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, process_group=d.group, **ddp_kw)
            net = ddp
        hook = comm = CommHook(config, ddp, model, d.world_size, optimizer if d.horovod is not None else None,
                               fsdp=fsdp)
        loader = data.make_loader(bundle.train, config.batch_size, rank=d.rank, world_size=d.world_size,
                                  seed=config.seed, shuffle=True, drop_last=True)
        per_epoch = len(loader)
        if per_epoch == 0:
            raise ValueError(f"batch_size {config.batch_size} x {d.world_size} workers exceeds the "
                             f"{len(bundle.train)} training samples: no full batch per epoch")
        total = per_epoch * config.epochs
        if config.max_steps is not None:
            total = min(total, config.max_steps)

        progress: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "restarts": 0, "history": []}
        resumed_from = None
        ckpt_root = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
        src, loaded, load_error = None, None, None
        try:
            if resume_from is not None:
                src = Path(resume_from)
                if not (src / "model.pt").is_file():
                    src = latest_checkpoint(src)
                    if src is None:
                        raise CheckpointError(resume_from, "holds no checkpoint (no model.pt, no latest pointer)")
            elif config.resume and ckpt_root is not None:
                src = latest_checkpoint(ckpt_root)
            if src is not None:
                loaded = read_checkpoint(src, d, model, optimizer, comm, gradquant, config)
        except CheckpointError as exc:
            load_error = exc
        if d.world_size > 1 and (resume_from is not None or config.resume):
            agree_on_resume(d, src, loaded, load_error)  # raises on every rank, or on none
        elif load_error is not None:
            raise load_error
        if loaded is not None:
            progress = apply_checkpoint(loaded, model, optimizer, comm, gradquant)
            progress["restarts"] = int(progress.get("restarts", 0)) + 1
            resumed_from = int(progress["step"])
            if d.horovod is not None:
                d.horovod.broadcast_parameters(model.state_dict(), root_rank=0)

        metrics_file = None
        if config.metrics_path is not None and d.rank == 0:
            Path(config.metrics_path).parent.mkdir(parents=True, exist_ok=True)
            metrics_file = open(config.metrics_path, "a", buffering=1)

        def log(record: dict) -> None:
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")

        bar = None
        if config.progress and d.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=progress["step"], desc=f"{config.model}/{config.codec}",
                       unit="step", mininterval=1.0, file=progress_stream or sys.stderr, dynamic_ncols=True)

        def checkpoint() -> Path | None:
            if ckpt_root is None:
                return None
            comm.wait_idle()
            return save_checkpoint(ckpt_root, d, model, optimizer, hook, progress, gradquant,
                                   config.keep_checkpoints, config)

        step_times: list[float] = []
        loss_sum, loss_n = 0.0, 0
        step = progress["step"]
        model.train()
        log({"event": "start", "step": step, "world_size": d.world_size, "resumed_from_step": resumed_from,
             "restarts": progress["restarts"], "time": time.time()})
        while step < total:
            epoch = progress["epoch"]
            cast(DistributedSampler, loader.sampler).set_epoch(epoch)  # make_loader's sampler
            skip = progress["batch"]
            for i, (x, y) in enumerate(loader):
                if i < skip:
                    continue  # resumed mid-epoch: the order is a function of (seed, epoch)
                if step >= total:
                    break
                t0 = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * _lr_factor(config, step, total)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                try:
                    loss = F.cross_entropy(net(x), y)
                    loss.backward()
                    optimizer.step()
                except RuntimeError as exc:
                    if d.world_size <= 1:
                        raise
                    raise RuntimeError(
                        f"gradcomp.app.train: step {step + 1} failed on rank {d.rank} of {d.world_size} after "
                        f"{time.perf_counter() - t0:.1f} s; a peer may have stalled, been stopped or died "
                        f"(TrainConfig.timeout={config.timeout:g} s bounds the wait). Cause: {exc}") from exc
                lv = loss.item()  # syncs the device, so the step time is honest
                step_times.append(time.perf_counter() - t0)
                if not math.isfinite(lv):
                    raise FloatingPointError(f"loss became {lv} at step {step}; lower lr or check the codec")
                loss_sum, loss_n = loss_sum + lv, loss_n + 1
                step += 1
                progress["step"], progress["batch"] = step, i + 1
                if on_step is not None:
                    on_step(step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{lv:.3f}", refresh=False)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                    path = checkpoint()
                    if reporter is not None:
                        reporter({"step": step, "epoch": epoch, "loss": lv, **comm.wire(model, step)}, path)
            else:
                progress["epoch"], progress["batch"] = epoch + 1, 0
            sync_buffers(model, d)
            acc, test_loss = evaluate(model, bundle.test, device)
            record = {"event": "epoch", "epoch": epoch + 1,
                      "step": step, "train_loss": loss_sum / max(loss_n, 1), "test_accuracy": acc,
                      "test_loss": test_loss, "step_time_p50": _percentile(step_times, 0.5),
                      "elapsed": time.perf_counter() - t_start, **comm.wire(model, step)}
            progress["history"] = list(progress["history"]) + [
                {k: record[k] for k in ("epoch", "step", "train_loss", "test_accuracy", "test_loss")}]
            loss_sum, loss_n = 0.0, 0
            log(record)
            path = checkpoint()
            if reporter is not None:
                reporter({k: v for k, v in record.items() if k != "event"}, path)
        if bar is not None:
            bar.close()
        comm.wait_idle()
        sync_buffers(model, d)
        acc, test_loss = evaluate(model, bundle.test, device)
        # Drop the first steps from the timing percentiles: DDP rebuilds buckets and kernels warm up.
        timed = step_times[min(3, len(step_times) // 4):]
        result = {
            "final_accuracy": acc,
            "final_loss": test_loss,
            "steps": step,
            "epochs": progress["epoch"],
            "wall_seconds": time.perf_counter() - t_start,
            "step_time_p50": _percentile(timed, 0.5),
            "step_time_p90": _percentile(timed, 0.9),
            **comm.wire(model, step),
            "world_size": d.world_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "resumed_from_step": resumed_from,
            "restarts": int(progress["restarts"]),
            "history": progress["history"],
        }
        log({"event": "end", **{k: v for k, v in result.items() if k != "history"}})
        if metrics_file is not None:
            metrics_file.close()
        return result
    finally:
        if hook is not None:
            hook.close()
        teardown_distributed(d)


def main(argv: list[str] | None = None) -> int:
    """Run :func:`train` from a JSON config file (``python -m gradcomp.app.train CONFIG.json``; torchrun-able)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gradcomp.app.train", description=main.__doc__)
    parser.add_argument("config", help="JSON file with TrainConfig fields")
    parser.add_argument("--output", help="write the result JSON here (rank 0)")
    args = parser.parse_args(argv)
    try:
        cfg = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
    except (OSError, ValueError, TypeError) as e:
        parser.error(str(e))
    result = train(cfg)
    rank = os.environ.get("HOROVOD_RANK", os.environ.get("RANK", "0"))  # horovodrun or torchrun
    if args.output and int(rank) == 0:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
