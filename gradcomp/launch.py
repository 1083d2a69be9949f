"""Launch compressed training on a Ray cluster: ``gradcomp-launch``.

Starts an embedded local Ray (the default) or connects to an existing cluster (``--address``),
runs :func:`gradcomp.train.train` in ``--workers`` Ray Train workers (``TorchTrainer``: gloo on
CPU, NCCL on GPU; the hook is registered inside the train function, and not at all with one
worker) or, with ``--transport horovod``, in Horovod workers (``horovod.ray.RayExecutor``),
prints a results table and writes ``OUTPUT/results.json``.

Fault tolerance: checkpoints every ``--checkpoint-every`` steps and at each epoch end (model,
optimizer and every rank's compression state) go through Ray Train checkpoints;
``--max-failures`` restarts the worker group from the last one, and the results record the
restart (``restarts``, ``resumed_from_step``).

Security: an embedded Ray binds its dashboard to 127.0.0.1 unless ``--dashboard-host`` says
otherwise (``--no-dashboard`` turns it off); Ray's token authentication settings from the environment
(``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``...) are passed through untouched; checkpoints load with
``weights_only=True``; the embedded Ray's processes and its temporary directory are removed at
exit.

Example:
    gradcomp-launch --workers 2 --codec prune-fp --act-bits 2 --dataset mnist1d --epochs 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .train import CODECS, TRANSPORTS, TrainConfig

EXIT_USAGE = 2
RESULT_KEY = "gradcomp_result_json"


class TrainingFailed(RuntimeError):
    """The workers failed (after ``--max-failures`` restarts); the message holds their errors."""


def _int_at_least(lo: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """Return the ``gradcomp-launch`` argument parser."""
    from . import data, models

    p = argparse.ArgumentParser(
        prog="gradcomp-launch",
        description="Ray-launched data-parallel training with gradcomp's compression hooks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("cluster")
    g.add_argument("--workers", type=_positive_int, default=2, help="training workers (ranks)")
    g.add_argument("--address", default=None,
                   help="existing Ray cluster (host:port, 'auto' or ray://...); default: start an embedded local Ray")
    g.add_argument("--transport", choices=TRANSPORTS, default="ddp", help="DDP hooks or Horovod alltoall/allgather")
    g.add_argument("--cpus-per-worker", type=_positive_int, default=1)
    g.add_argument("--gpus-per-worker", type=_nonneg_int, default=0, help="0: CPU and gloo; >= 1: CUDA and NCCL")
    g.add_argument("--placement", choices=("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"), default="PACK",
                   help="Ray placement strategy of the workers (STRICT_SPREAD: one per node)")
    g.add_argument("--max-failures", type=_nonneg_int, default=2, help="worker-group restarts from the last checkpoint")
    g.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                   help="embedded Ray only: no dashboard (Ray Train then cannot query its state API)")
    g.add_argument("--dashboard-host", default="127.0.0.1",
                   help="embedded Ray only: where the dashboard listens; anything but localhost exposes it")
    c = p.add_argument_group("compression")
    c.add_argument("--codec", choices=CODECS, default="prune-fp")
    c.add_argument("--bits", type=_positive_int, default=6, help="FP bits (fp, prune-fp)")
    c.add_argument("--exp-bits", type=_positive_int, default=None, help="fix the exponent bits (default: lognormal split)")
    c.add_argument("--sparsity", type=_finite_float, default=0.85, help="pruning sparsity (prune, prune-fp)")
    c.add_argument("--budget-bits", type=_finite_float, default=1.5, help="bits per element (budget)")
    c.add_argument("--topk-ratio", type=_finite_float, default=0.01, help="fraction kept (topk)")
    c.add_argument("--powersgd-rank", type=_positive_int, default=2)
    c.add_argument("--error-feedback", choices=("auto", "none", "worker", "reduce", "both"), default="auto")
    m = p.add_argument_group("model and data")
    m.add_argument("--model", choices=models.MODELS, default="resnet1d")
    m.add_argument("--width", type=_positive_int, default=32)
    m.add_argument("--act-bits", type=_nonneg_int, default=None,
                   help="Squeeze-and-Threshold activation bits (1..4; 0: full precision)")
    m.add_argument("--gradquant-bits", type=_positive_int, default=None, help="neural-gradient FP bits")
    m.add_argument("--gradquant-sparsity", type=_finite_float, default=0.0)
    m.add_argument("--dataset", choices=data.DATASETS, default="mnist1d")
    m.add_argument("--num-train", type=_positive_int, default=None)
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=_positive_int, default=5)
    o.add_argument("--max-steps", type=_positive_int, default=None)
    o.add_argument("--batch-size", type=_positive_int, default=64, help="per worker")
    o.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    o.add_argument("--lr", type=_finite_float, default=0.05)
    o.add_argument("--seed", type=_nonneg_int, default=0)
    r = p.add_argument_group("output")
    r.add_argument("--output", default=None, help="results directory (default: runs/<time>-<codec>)")
    r.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/latest")
    r.add_argument("--overwrite", action="store_true",
                   help="start over in an OUTPUT that holds a previous run (deletes its checkpoints, "
                        "Ray state, results.json and metrics.jsonl)")
    r.add_argument("--checkpoint-every", type=_nonneg_int, default=50, help="steps between checkpoints (0: epochs only)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    # Testing fault tolerance: worker RANK SIGKILLs itself at STEP on the first attempt.
    r.add_argument("--inject-fault", type=_fault_spec, default=None, metavar="RANK:STEP", help=argparse.SUPPRESS)
    return p


RUN_ARTIFACTS = ("checkpoints", "ray", "results.json", "metrics.jsonl")


def previous_run_artifacts(output: Path) -> list[Path]:
    """What a previous launch left in ``output`` (the only paths ``--overwrite`` deletes)."""
    return [output / name for name in RUN_ARTIFACTS if (output / name).exists()]


def config_from_args(args: argparse.Namespace, output: Path) -> TrainConfig:
    """Map parsed arguments onto a :class:`TrainConfig` (``ValueError`` on invalid combinations)."""
    return TrainConfig(
        model=args.model, dataset=args.dataset, width=args.width, num_train=args.num_train,
        act_bits=args.act_bits or None, gradquant_bits=args.gradquant_bits, gradquant_sparsity=args.gradquant_sparsity,
        codec=args.codec, bits=args.bits, exp_bits=args.exp_bits, sparsity=args.sparsity,
        budget_bits=args.budget_bits, topk_ratio=args.topk_ratio, powersgd_rank=args.powersgd_rank,
        error_feedback=args.error_feedback, transport=args.transport, optimizer=args.optimizer, lr=args.lr,
        batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps, seed=args.seed,
        checkpoint_dir=str(output / "checkpoints"), checkpoint_every=args.checkpoint_every,
        resume=args.resume, metrics_path=str(output / "metrics.jsonl"), progress=not args.quiet,
        device="cuda" if args.gpus_per_worker else "cpu")


# ------------------------------------------------------------------------- worker side
def _fault_spec(text: str) -> tuple[int, int]:
    try:
        r, s = (int(t) for t in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RANK:STEP, got {text!r}") from None
    if r < 0 or s < 1:
        raise argparse.ArgumentTypeError(f"expected RANK >= 0 and STEP >= 1, got {text!r}")
    return r, s


def _step_of(path) -> int:
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

    from .train import latest_checkpoint

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


def _ray_worker(payload: dict) -> None:
    """Ray Train worker: resume from Ray's checkpoint if any, train, report to Ray."""
    import ray.train
    from ray.train import Checkpoint

    from .train import train

    config = TrainConfig.from_dict(payload["config"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    tmp = None
    ray_dir = None
    if checkpoint is not None:
        tmp = tempfile.mkdtemp(prefix="gradcomp-restore-")
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
        result = train(config, reporter=reporter, resume_from=resume_from, on_step=on_step)
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
    final = Path(tempfile.mkdtemp(prefix="gradcomp-result-"))
    try:
        (final / "result.json").write_text(json.dumps(result, indent=2))
        ray.train.report({RESULT_KEY: json.dumps(result)},
                         checkpoint=Checkpoint.from_directory(str(final)) if rank == 0 else None,
                         checkpoint_dir_name="result")
    finally:
        shutil.rmtree(final, ignore_errors=True)


def _horovod_worker(payload: dict) -> dict:
    from .train import train

    return train(TrainConfig.from_dict(payload["config"]))


# ------------------------------------------------------------------------- driver side
def _start_ray(args, temp_root: str | None):
    import ray

    if args.address:
        ray.init(address=args.address, log_to_driver=True)
    else:
        kw = {"include_dashboard": bool(args.dashboard), "dashboard_host": args.dashboard_host, "_temp_dir": temp_root}
        need = args.workers * args.cpus_per_worker
        ray.init(num_cpus=max(need + 1, os.cpu_count() or 1), num_gpus=args.workers * args.gpus_per_worker or None,
                 log_to_driver=True, **kw)
    return ray


def run(args: argparse.Namespace, output: Path) -> dict:
    """Run the job described by ``args``; return the results (also written to ``output/results.json``)."""
    from .env import environment

    config = config_from_args(args, output)
    output.mkdir(parents=True, exist_ok=True)
    temp_root = None if args.address else tempfile.mkdtemp(prefix="gcray-")  # short: Ray's socket paths
    t0 = time.perf_counter()
    ray = _start_ray(args, temp_root)
    try:
        payload = {"config": config.to_dict(), "inject_fault": args.inject_fault}
        if args.transport == "horovod":
            from .horovod import run_on_ray

            results = run_on_ray(_horovod_worker, num_workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                                 use_gpu=bool(args.gpus_per_worker), args=(payload,))
            result = results[0]
            ray_info = {"transport": "horovod.ray.RayExecutor", "ray_temp_dir": temp_root}
        else:
            from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
            from ray.train.torch import TorchTrainer

            scaling = ScalingConfig(
                num_workers=args.workers, use_gpu=bool(args.gpus_per_worker), placement_strategy=args.placement,
                resources_per_worker={"CPU": args.cpus_per_worker, **({"GPU": args.gpus_per_worker} if args.gpus_per_worker else {})})
            run_config = RunConfig(
                name="train", storage_path=str((output / "ray").resolve()),
                failure_config=FailureConfig(max_failures=args.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2))
            trainer = TorchTrainer(_ray_worker, train_loop_config=payload, scaling_config=scaling, run_config=run_config)
            try:
                fit = trainer.fit()
            except Exception as e:  # Ray wraps worker tracebacks; they are in the message
                raise TrainingFailed(str(e)) from e
            if fit.error is not None:
                raise TrainingFailed(str(fit.error))
            if not fit.metrics or RESULT_KEY not in fit.metrics:
                raise RuntimeError(f"training ended without a result (last metrics: {fit.metrics})")
            result = json.loads(fit.metrics[RESULT_KEY])
            ray_info = {"transport": "ray.train.torch.TorchTrainer", "ray_storage": str(output / "ray"),
                        "ray_temp_dir": temp_root,
                        "last_ray_checkpoint": fit.checkpoint.path if fit.checkpoint is not None else None}
    finally:
        ray.shutdown()
        if temp_root is not None:
            shutil.rmtree(temp_root, ignore_errors=True)
    result = dict(result)
    result.update({"config": config.to_dict(), "launcher": {"workers": args.workers, "address": args.address or "embedded",
                                                            "job_wall_seconds": time.perf_counter() - t0, **ray_info},
                   "environment": environment()})
    tmp = output / ".results.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, output / "results.json")
    return result


def format_table(result: dict) -> str:
    """Return the end-of-run table (Markdown)."""
    cfg = result["config"]
    bpe = result.get("bits_per_element")
    rows = [
        ("codec", f"{cfg['codec']}" + (f" ({result.get('collective')})" if result.get("collective") else "")),
        ("model", f"{cfg['model']}" + (f", ST {cfg['act_bits']}-bit activations" if cfg.get("act_bits") else "")),
        ("workers", str(result["world_size"])),
        ("final accuracy", f"{100 * result['final_accuracy']:.2f} %"),
        ("steps", str(result["steps"])),
        ("bytes sent per step (per rank)", f"{result['bytes_sent_per_step']:,.0f} ({result.get('bytes_source')})"),
        ("bits per element", "-" if bpe is None else f"{bpe:.3f}"),
        ("step time p50 / p90", f"{1e3 * (result['step_time_p50'] or 0):.1f} / {1e3 * (result['step_time_p90'] or 0):.1f} ms"),
        ("training wall time", f"{result['wall_seconds']:.1f} s"),
        ("restarts", f"{result['restarts']}" + (f" (resumed from step {result['resumed_from_step']})"
                                                  if result.get("resumed_from_step") is not None else "")),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(w)} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {k.ljust(w)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gradcomp-launch``: exit 0 on success, 2 on bad arguments, 1 on failure."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a message on bad arguments
    if args.output is None:
        args.output = str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.codec}")
    # Absolute: Ray workers run in their own working directory, where a relative path would
    # put checkpoints and metrics.jsonl in Ray's temp dir (deleted after the run).
    output = Path(args.output).absolute()
    try:
        config_from_args(args, output)
    except ValueError as e:
        parser.error(re.sub(r"TrainConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e)))
    if output.exists() and not output.is_dir():
        parser.error(f"--output {output} exists and is not a directory")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output and --overwrite deletes it: pass one")
    if args.resume and not (output / "checkpoints" / "latest").is_file():
        parser.error(f"--resume: no checkpoint under {output / 'checkpoints'}")
    previous = previous_run_artifacts(output)
    if previous and not (args.resume or args.overwrite):
        # Starting fresh on top of an old run would mix its checkpoints and Ray state with the
        # new one (Ray would even restore the old run's last checkpoint): never silently.
        parser.error(f"--output {output} holds a previous run ({', '.join(p.name for p in previous)}); "
                     "pass --resume to continue it or --overwrite to start over")
    if args.overwrite:
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if args.gpus_per_worker:
        import torch

        if not torch.cuda.is_available() and not args.address:
            parser.error("--gpus-per-worker needs CUDA, and torch sees no GPU here")
    if args.transport == "horovod":
        try:
            from .horovod import _import_hvd

            _import_hvd()
        except ImportError as e:
            parser.error(f"--transport horovod: {e}")
    if args.address is not None and not args.address.strip():
        parser.error("--address is empty")
    if args.inject_fault is not None and args.inject_fault[0] >= args.workers:
        parser.error(f"--inject-fault rank {args.inject_fault[0]} >= --workers {args.workers}")
    try:
        result = run(args, output)
    except KeyboardInterrupt:
        print("gradcomp-launch: interrupted", file=sys.stderr)
        return 130
    except TrainingFailed as e:
        print(f"gradcomp-launch: training failed:\n{e}", file=sys.stderr)
        return 1
    print()
    print(format_table(result))
    print(f"\nresults: {output / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
