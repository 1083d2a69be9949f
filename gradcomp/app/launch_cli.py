"""``gradcomp-launch``'s command line: the parser, its value checks, and the preflight.

:func:`build_parser` defines every flag; :func:`config_from_args` maps parsed arguments onto a
:class:`~gradcomp.app.config.TrainConfig`; :func:`preflight` builds what each worker would build
(config, codec, data set, model) and checks that the run fits, before Ray starts. Anything wrong
raises :class:`UsageError` with one line that names the flags (the launcher exits 2 with it).
Nothing here imports Ray.

Example:
    >>> from pathlib import Path
    >>> args = build_parser().parse_args(["--codec", "fp", "--bits", "5"])
    >>> config = config_from_args(args, Path("/tmp/run"))
    >>> config.codec, config.bits, config.checkpoint_dir
    ('fp', 5, '/tmp/run/checkpoints')
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import tempfile
from pathlib import Path

from gradcomp.app.config import CODECS, TRANSPORTS, TrainConfig


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


def _positive_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = None
    if v is None or not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return v


def _fault_spec(text: str) -> tuple[int, int]:
    """``--inject-fault RANK:STEP`` as ``(rank, step)``: rank >= 0, step >= 1."""
    try:
        r, s = (int(t) for t in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RANK:STEP, got {text!r}") from None
    if r < 0 or s < 1:
        raise argparse.ArgumentTypeError(f"expected RANK >= 0 and STEP >= 1, got {text!r}")
    return r, s


def build_parser() -> argparse.ArgumentParser:
    """Return the ``gradcomp-launch`` argument parser."""
    from gradcomp.app import data, models

    p = argparse.ArgumentParser(
        prog="gradcomp-launch",
        description="Ray-launched data-parallel training with gradcomp's compression hooks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("cluster")
    g.add_argument("--workers", type=_positive_int, default=2, help="training workers (ranks)")
    g.add_argument("--address", default=None,
                   help="existing Ray cluster (host:port, 'auto' or ray://...); default: start an embedded local Ray")
    g.add_argument("--transport", "--strategy", dest="transport", choices=TRANSPORTS, default="ddp",
                   help="ddp: DDP hooks; horovod: Horovod alltoall/allgather; fsdp: FSDP2 fully_shard with "
                        "gradcomp's compressed reduce-scatter (gradcomp.comm.fsdp)")
    g.add_argument("--cpus-per-worker", type=_positive_int, default=1)
    g.add_argument("--gpus-per-worker", type=_nonneg_int, default=0, help="0: CPU and gloo; >= 1: CUDA and NCCL")
    g.add_argument("--placement", choices=("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"), default="PACK",
                   help="Ray placement strategy of the workers (STRICT_SPREAD: one per node)")
    g.add_argument("--max-failures", type=_nonneg_int, default=2,
                   help="worker-group restarts from the last checkpoint (also: attempts to place the group)")
    g.add_argument("--timeout", type=_positive_seconds, default=300.0,
                   help="seconds a rank waits for its peers before failing (process group rendezvous and "
                        "collectives, the gradcomp hook's own group)")
    g.add_argument("--startup-timeout", type=_positive_seconds, default=60.0,
                   help="seconds to connect to --address, and per attempt to place the worker group "
                        "(1 + --max-failures attempts)")
    g.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                   help="embedded Ray only: no dashboard (Ray Train then cannot query its state API)")
    g.add_argument("--dashboard-host", default="127.0.0.1",
                   help="embedded Ray only: where the dashboard listens; anything but localhost exposes it")
    c = p.add_argument_group("compression")
    c.add_argument("--codec", choices=CODECS, default="prune-fp")
    c.add_argument("--bits", type=_positive_int, default=6, help="FP bits (fp, prune-fp)")
    c.add_argument("--exp-bits", type=_positive_int, default=None,
                   help="fix the exponent bits (default: lognormal split)")
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
    r.add_argument("--checkpoint-every", type=_nonneg_int, default=50,
                   help="steps between checkpoints (0: epochs only)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    # Testing fault tolerance: worker RANK SIGKILLs itself at STEP on the first attempt.
    r.add_argument("--inject-fault", type=_fault_spec, default=None, metavar="RANK:STEP", help=argparse.SUPPRESS)
    return p


RUN_ARTIFACTS = ("checkpoints", "ray", "results.json", "metrics.jsonl", "ray.log")


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
        device="cuda" if args.gpus_per_worker else "cpu", **_timeout_field(args))


def _timeout_field(args) -> dict:
    # TrainConfig.timeout bounds the process group and the hook's own group (seconds).
    if "timeout" in {f.name for f in dataclasses.fields(TrainConfig)}:
        return {"timeout": float(args.timeout)}
    return {}


class UsageError(ValueError):
    """An argument (or combination) the job cannot run with: exit 2 before Ray starts."""


def _flag_names(message: str) -> str:
    # "TrainConfig.exp_bits must ..." -> "--exp-bits must ..."
    return re.sub(r"TrainConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), message)


def preflight(args: argparse.Namespace, output: Path) -> TrainConfig:
    """Build what every worker would build (config, codec, data set, model) and check the run fits.

    Raises :class:`UsageError` with a one-line message for anything that would otherwise fail
    only after Ray started (and after ``--max-failures`` restarts): codec settings
    (``--exp-bits`` >= ``--bits``, ``--sparsity 0``...), a data set or model that does not fit
    the options, fewer samples than one batch per worker, an ``--output`` that cannot be
    written, a placement the embedded (single-node) Ray cannot satisfy.
    """
    from gradcomp.app import data
    from gradcomp.app.methods import build_codec
    from gradcomp.app.train import build_model

    try:
        config = config_from_args(args, output)
    except ValueError as e:
        raise UsageError(_flag_names(str(e))) from None
    try:
        codec = build_codec(config)
        if codec is not None and config.transport == "ddp":
            from gradcomp.comm.hook import choose_collective

            choose_collective(config.collective, codec, max(args.workers, 2))
    except (ValueError, TypeError) as e:
        raise UsageError(f"--codec {config.codec} with these options: {e}") from None
    try:
        bundle = data.load_dataset(config.dataset, seed=config.seed, num_train=config.num_train)
        build_model(config, bundle)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--dataset {config.dataset} / --model {config.model}: {e}") from None
    per_rank = len(bundle.train) // args.workers
    if per_rank // config.batch_size < 1:
        raise UsageError(
            f"--batch-size {config.batch_size} x --workers {args.workers} needs at least "
            f"{config.batch_size * args.workers} training samples, and {config.dataset} has {len(bundle.train)}"
            f"{' (--num-train)' if config.num_train is not None else ''}: no full batch per worker")
    problem = _output_problem(output)
    if problem:
        raise UsageError(problem)
    if args.address is None and args.placement == "STRICT_SPREAD" and args.workers > 1:
        raise UsageError(
            f"--placement STRICT_SPREAD puts each worker on its own node, and the embedded Ray is one "
            f"node: {args.workers} workers can never be placed (use PACK or SPREAD, or --address a "
            f"cluster with >= {args.workers} nodes)")
    return config


def _output_problem(output: Path) -> str | None:
    """Why ``output`` cannot hold the run (``None``: it can); creates nothing that stays."""
    existing = output
    while not os.path.lexists(existing):
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        if existing == output:
            return f"--output {output} exists and is not a directory"
        return f"--output {output} is under {existing}, which is a file, not a directory"
    try:  # os.access would say yes to root on a read-only file system: try it
        os.rmdir(tempfile.mkdtemp(prefix=".gradcomp-probe-", dir=existing))
    except OSError as e:
        return f"--output {output}: cannot create anything in {existing} ({e.strerror or e})"
    return None

