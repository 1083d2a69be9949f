"""Train a model with compressed gradients: one loop for every launcher.

:func:`train` runs single-process, under ``torchrun``, under ``torch.multiprocessing``, inside
Ray Train workers and inside Horovod workers. It reads the standard environment contract
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) unless a process
group already exists (Ray Train creates one before calling the train function; tests create
one on a ``FileStore``). With one process it trains without DDP and without a hook (the codec
has nothing to cross).

What it does, all from one validated :class:`TrainConfig`:

* data from :mod:`gradcomp.data` (no download), sharded by rank; model from
  :mod:`gradcomp.models`, optionally with Squeeze-and-Threshold activations (``act_bits``) and
  neural-gradient quantization (``gradquant_bits`` / ``gradquant_sparsity``);
* the gradient hook chosen by ``codec``: ``"none"`` (fp32 DDP), ``"fp16"`` and ``"powersgd"``
  (torch's own hooks, the baselines users would pick), or one of ours (``"fp"``, ``"prune"``,
  ``"prune-fp"``, ``"budget"``, ``"topk"``) through :func:`gradcomp.register`;
* checkpoints every ``checkpoint_every`` steps and at every epoch end: model, optimizer, LR
  schedule, progress and each rank's compression state (residuals differ per rank), written
  to a fresh ``step-XXXXXXXX`` directory and published by an atomic rename of the ``latest``
  pointer, loaded back with ``torch.load(weights_only=True)``. A resumed run continues at the
  exact batch where the checkpoint was taken (the data order is a function of seed and epoch),
  with the LR schedule, hook step, fits, residuals and random keys where they were. Without a
  hook it reproduces the uninterrupted run bit for bit; with one, its first step runs on DDP's
  initial bucket layout (DDP reorders buckets after its first step), so that step's stochastic
  draws differ: same distribution, different bits;
* metrics as JSON lines (rank 0), a progress bar on rank 0, and a result dict.

Example:
    >>> from gradcomp.train import TrainConfig, train
    >>> result = train(TrainConfig(model="resnet1d", dataset="mnist1d", epochs=1))  # doctest: +SKIP
    >>> result["final_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

CODECS = ("none", "fp16", "fp", "prune", "prune-fp", "budget", "topk", "powersgd")
OUR_CODECS = ("fp", "prune", "prune-fp", "budget", "topk")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")
ERROR_FEEDBACK = ("auto", "none", "worker", "reduce", "both")
DEVICES = ("auto", "cpu", "cuda")
TRANSPORTS = ("ddp", "horovod")
CHECKPOINT_FORMAT = 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on (validated on construction; ``ValueError``).

    Model and data: ``model`` (see :data:`gradcomp.models.MODELS`), ``dataset`` (see
    :data:`gradcomp.data.DATASETS`), ``width`` (channels/hidden units), ``num_train``
    (``None``: the data set's default), ``act_bits`` (1..4: ST activations; ``None``: full
    precision), ``gradquant_bits`` / ``gradquant_sparsity`` (neural-gradient FP bits and
    stochastic-pruning sparsity; off by default), ``gradquant_exp_offset`` (added to the fitted
    exponent split ``E*`` of ``gradquant_bits``: the seed's ``E*+1``/``E*-1``/``E*-2`` columns).

    Communication: ``codec`` (:data:`CODECS`), ``bits`` and ``exp_bits`` (FP codecs; ``None``
    exp_bits: lognormal split), ``sparsity`` (prune codecs), ``budget_bits`` (budget codec),
    ``topk_ratio`` (topk), ``powersgd_rank``, ``error_feedback`` (``"auto"``: on for topk only,
    the one biased codec), ``warmup_steps`` / ``refit_every`` / ``collective`` (see
    :class:`gradcomp.CompressionState`), ``transport`` (``"ddp"`` or ``"horovod"``).

    Optimisation: ``optimizer``, ``lr`` (for the global batch; not rescaled), ``momentum``,
    ``weight_decay``, ``schedule`` (cosine decay to 0 over the run, or constant),
    ``batch_size`` (per worker), ``epochs``, ``max_steps`` (stop early), ``seed``.

    Output: ``checkpoint_dir`` (``None``: no checkpoints), ``checkpoint_every`` (steps; 0: epoch
    ends only), ``keep_checkpoints``, ``resume`` (continue from ``checkpoint_dir/latest`` if it
    exists), ``metrics_path`` (JSON lines, rank 0), ``progress`` (bar on rank 0), ``device``.
    """

    model: str = "resnet1d"
    dataset: str = "mnist1d"
    width: int = 32
    num_train: int | None = None
    act_bits: int | None = None
    gradquant_bits: int | None = None
    gradquant_sparsity: float = 0.0
    gradquant_exp_offset: int = 0
    codec: str = "none"
    bits: int = 6
    exp_bits: int | None = None
    sparsity: float = 0.85
    budget_bits: float = 1.5
    topk_ratio: float = 0.01
    powersgd_rank: int = 2
    error_feedback: str = "auto"
    warmup_steps: int = 1
    refit_every: int = 10
    collective: str = "auto"
    transport: str = "ddp"
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    batch_size: int = 64
    epochs: int = 5
    max_steps: int | None = None
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    metrics_path: str | None = None
    progress: bool = True
    device: str = "auto"

    def __post_init__(self):
        from . import data, models  # local: keep `import gradcomp.train` light

        def choice(name, options):
            v = getattr(self, name)
            if v not in options:
                raise ValueError(f"TrainConfig.{name} must be one of {', '.join(map(str, options))}; got {v!r}")

        def integer(name, lo, hi=None, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if not _is_int(v) or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
                raise ValueError(f"TrainConfig.{name} must be an int {rng}{' or None' if optional else ''}; got {v!r}")

        def real(name, lo, hi, lo_open=False, hi_open=False):
            v = getattr(self, name)
            ok = _is_real(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be a number in {'(' if lo_open else '['}{lo}, "
                                 f"{hi}{')' if hi_open else ']'}; got {v!r}")

        choice("model", models.MODELS)
        choice("dataset", data.DATASETS)
        choice("codec", CODECS)
        choice("error_feedback", ERROR_FEEDBACK)
        choice("collective", ("auto", "two_phase", "allgather", "allreduce"))
        choice("transport", TRANSPORTS)
        choice("optimizer", OPTIMIZERS)
        choice("schedule", SCHEDULES)
        choice("device", DEVICES)
        integer("width", 1)
        integer("num_train", 1, optional=True)
        integer("act_bits", 1, 4, optional=True)
        integer("gradquant_bits", 2, 16, optional=True)
        real("gradquant_sparsity", 0.0, 0.9999)
        integer("gradquant_exp_offset", -8, 8)
        if self.gradquant_exp_offset and self.gradquant_bits is None:
            raise ValueError("TrainConfig.gradquant_exp_offset needs gradquant_bits (it shifts their exponent split)")
        integer("bits", 2, 16)
        integer("exp_bits", 1, 8, optional=True)
        real("sparsity", 0.0, 1.0, hi_open=True)
        real("budget_bits", 0.0, 32.0, lo_open=True)
        real("topk_ratio", 0.0, 1.0, lo_open=True)
        integer("powersgd_rank", 1)
        integer("warmup_steps", 0)
        integer("refit_every", 1)
        real("lr", 0.0, math.inf, lo_open=True, hi_open=True)
        real("momentum", 0.0, 1.0, hi_open=True)
        real("weight_decay", 0.0, math.inf, hi_open=True)
        integer("batch_size", 1)
        integer("epochs", 1)
        integer("max_steps", 1, optional=True)
        integer("seed", 0)
        integer("checkpoint_every", 0)
        integer("keep_checkpoints", 1)
        for name in ("resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be a bool; got {getattr(self, name)!r}")
        for name in ("checkpoint_dir", "metrics_path"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (str, os.PathLike)) or not str(v)):
                raise ValueError(f"TrainConfig.{name} must be a non-empty path or None; got {v!r}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("TrainConfig.resume needs checkpoint_dir (where to resume from)")
        if self.collective == "allreduce" and self.codec in OUR_CODECS:
            # Only payloads that can be summed go through all-reduce; CompressionState checks it
            # too, but saying it here fails before any worker starts.
            raise ValueError(f"TrainConfig.collective='allreduce' needs a summable payload; codec "
                             f"{self.codec!r} is not (use 'auto', 'two_phase' or 'allgather')")
        if self.transport == "horovod" and self.codec == "powersgd":
            raise ValueError("TrainConfig: codec 'powersgd' is torch's DDP hook; it has no Horovod transport")

    def to_dict(self) -> dict:
        """Return the config as plain JSON-compatible values."""
        return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build a config from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)


# ---------------------------------------------------------------------------------- pieces
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False  # we created the process group, so we destroy it
    horovod: Any = None  # the horovod.torch module when transport == "horovod"


def _setup_distributed(config: TrainConfig, device: torch.device) -> _Dist:
    if config.transport == "horovod":
        from .horovod import _import_hvd

        hvd = _import_hvd()
        hvd.init()
        return _Dist(hvd.rank(), hvd.size(), hvd.local_rank(), False, hvd)
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun, "
                           "gradcomp-launch, or set the env:// contract (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("TrainConfig.device='cuda' but torch sees no CUDA device")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def build_codec(config: TrainConfig):
    """Return the :class:`gradcomp.codecs.Codec` for ``config.codec`` (``None`` for torch's hooks)."""
    from . import codecs

    c = config.codec
    if c == "fp":
        return codecs.FPCodec(config.bits, exp_bits=config.exp_bits)
    if c == "prune":
        return codecs.PruneCodec(config.sparsity)
    if c == "prune-fp":
        return codecs.PruneFPCodec(config.sparsity, config.bits, exp_bits=config.exp_bits)
    if c == "budget":
        return codecs.BudgetCodec(config.budget_bits)
    if c == "topk":
        return codecs.TopKCodec(config.topk_ratio)
    return None


def _error_feedback(config: TrainConfig):
    ef = config.error_feedback
    if ef == "auto":
        return config.codec == "topk"
    return {"none": False, "worker": "worker", "reduce": "reduce", "both": True}[ef]


def build_model(config: TrainConfig, bundle) -> tuple[nn.Module, list]:
    """Build the configured model (ST and GradQuant applied); return it and its GradQuant modules."""
    from . import models
    from .nn import convert_gradquant

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


def _dense_ring_bytes(numel: int, world: int, elem_bytes: int) -> float:
    return 2.0 * (world - 1) / world * numel * elem_bytes


def _powersgd_bytes(model: nn.Module, rank: int, world: int) -> tuple[float, float]:
    """Return (bytes per rank per step, bits per element) of torch's PowerSGD hook (its rules).

    Matrices (tensors with ndim > 1 viewed as ``shape[0] x rest``) are compressed when
    ``n*m > (n+m)*rank*2`` (the hook's ``min_compression_rate`` 2); P and Q are all-reduced in
    fp32; everything else is all-reduced uncompressed.
    """
    sent = 0
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        total += p.numel()
        if p.dim() > 1:
            n, m = p.shape[0], p.numel() // p.shape[0]
            r = min(n, m, rank)
            if n * m > (n + m) * r * 2:
                sent += (n + m) * r
                continue
        sent += p.numel()
    return _dense_ring_bytes(sent, world, 4), 32.0 * sent / max(total, 1)


class _Hook:
    """The communication hook of one run and how to account for its bytes."""

    def __init__(self, config: TrainConfig, ddp: nn.Module | None, model: nn.Module, world: int,
                 horovod_optimizer=None):
        self.kind = config.codec
        self.state = None
        self.world = world
        self.numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.horovod_optimizer = horovod_optimizer  # carries its own compression state
        if ddp is None:
            return
        if config.codec == "fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif config.codec == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

            # start_powerSGD_iter 2: PowerSGD needs DDP's rebuilt buckets, and torch refuses 1
            # with error feedback on.
            self.state = powerSGD_hook.PowerSGDState(
                process_group=None, matrix_approximation_rank=config.powersgd_rank,
                start_powerSGD_iter=2, random_seed=config.seed)
            ddp.register_comm_hook(self.state, powerSGD_hook.powerSGD_hook)
        elif config.codec != "none":
            from .hook import register

            self.state = register(ddp, build_codec(config), error_feedback=_error_feedback(config),
                                  warmup_steps=config.warmup_steps, refit_every=config.refit_every,
                                  seed=config.seed, collective=config.collective)

    def wire(self, model: nn.Module, steps: int) -> dict:
        """Bytes this rank sent per step and bits per gradient element (``estimated`` says how)."""
        if self.world <= 1:
            return {"bytes_sent_per_step": 0.0, "bits_per_element": None, "bytes_source": "single process"}
        if self.horovod_optimizer is not None:
            s = self.horovod_optimizer.stats()
            return {"bytes_sent_per_step": s["bytes_sent"] / max(s["steps"], 1),
                    "bits_per_element": s["bits_per_element"] or (16.0 if self.kind == "fp16" else 32.0),
                    "bytes_source": "measured (Horovod alltoall/allgather)",
                    "compression_ratio": s["compression_ratio"], "collective": s["collective"]}
        if self.kind in ("none", "fp16"):
            b = 4 if self.kind == "none" else 2
            return {"bytes_sent_per_step": _dense_ring_bytes(self.numel, self.world, b),
                    "bits_per_element": 8.0 * b, "bytes_source": "ring all-reduce model"}
        if self.kind == "powersgd":
            per_step, bpe = _powersgd_bytes(model, self.powersgd_rank, self.world)
            return {"bytes_sent_per_step": per_step, "bits_per_element": bpe,
                    "bytes_source": "PowerSGD P/Q sizes, ring all-reduce model"}
        s = self.state.stats()
        return {"bytes_sent_per_step": s["bytes_sent"] / max(s["steps"], 1),
                "bits_per_element": s["bits_per_element"], "bytes_source": "measured by the hook",
                "compression_ratio": s["compression_ratio"], "collective": s["collective"]}

    @property
    def powersgd_rank(self) -> int:
        return self.state.matrix_approximation_rank

    def state_dict(self):
        if self.horovod_optimizer is not None:
            return self.horovod_optimizer.compression_state_dict()
        if self.kind in OUR_CODECS and self.state is not None:
            return self.state.state_dict()
        return None

    def load_state_dict(self, sd) -> None:
        if sd is not None and self.horovod_optimizer is not None:
            self.horovod_optimizer.load_compression_state_dict(sd)
        elif sd is not None and self.state is not None and hasattr(self.state, "load_state_dict"):
            self.state.load_state_dict(sd)

    def close(self) -> None:
        if self.horovod_optimizer is not None:
            self.horovod_optimizer.close()
        if self.state is not None and hasattr(self.state, "close"):
            self.state.close()


# ----------------------------------------------------------------------------- checkpoints
def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _barrier(d: _Dist) -> None:
    if d.horovod is not None:
        d.horovod.join()
    elif d.world_size > 1:
        dist.barrier()


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """Return the directory ``checkpoint_dir/latest`` points to, or ``None`` if there is none."""
    pointer = Path(checkpoint_dir) / "latest"
    if not pointer.is_file():
        return None
    target = Path(checkpoint_dir) / pointer.read_text().strip()
    if not (target / "model.pt").is_file():
        raise ValueError(f"checkpoint pointer {pointer} names {target}, which has no model.pt")
    return target


def save_checkpoint(checkpoint_dir: Path, d: _Dist, model: nn.Module, optimizer, hook: _Hook,
                    progress: dict, gradquant: list, keep: int) -> Path:
    """Write one checkpoint (every rank writes its compression state) and publish it atomically."""
    step_dir = checkpoint_dir / f"step-{progress['step']:08d}"
    if d.rank == 0:
        step_dir.mkdir(parents=True, exist_ok=True)
    _barrier(d)
    step_dir.mkdir(parents=True, exist_ok=True)  # a non-shared file system: each node has its own
    _atomic_save({"format": CHECKPOINT_FORMAT, "world_size": d.world_size, "hook": hook.state_dict()},
                 step_dir / f"compression-rank{d.rank}.pt")
    if d.rank == 0:
        _atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "progress": dict(progress), "gradquant_steps": [g.step for g in gradquant]},
                     step_dir / "model.pt")
    _barrier(d)
    if d.rank == 0:
        tmp = checkpoint_dir / f".latest.tmp-{os.getpid()}"
        tmp.write_text(step_dir.name + "\n")
        os.replace(tmp, checkpoint_dir / "latest")
        old = sorted(p for p in checkpoint_dir.glob("step-*") if p.is_dir() and p != step_dir)
        for p in old[:max(len(old) - (keep - 1), 0)]:
            shutil.rmtree(p, ignore_errors=True)
    return step_dir


def load_checkpoint(step_dir: Path, d: _Dist, model: nn.Module, optimizer, hook: _Hook, gradquant: list) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``); return progress."""
    main = torch.load(step_dir / "model.pt", map_location="cpu", weights_only=True)
    if main.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{step_dir}/model.pt: unknown checkpoint format {main.get('format')!r}")
    model.load_state_dict(main["model"])
    optimizer.load_state_dict(main["optimizer"])
    for g, s in zip(gradquant, main.get("gradquant_steps", [])):
        g.step = int(s)
    comp = step_dir / f"compression-rank{d.rank}.pt"
    if comp.is_file():
        c = torch.load(comp, map_location="cpu", weights_only=True)
        if c["world_size"] == d.world_size:
            hook.load_state_dict(c["hook"])
        else:
            warnings.warn(f"gradcomp: checkpoint has compression state for {c['world_size']} ranks, this run has "
                          f"{d.world_size}; error-feedback residuals and fits start afresh")
    elif hook.state_dict() is not None:
        warnings.warn(f"gradcomp: {comp} missing; compression state starts afresh")
    return dict(main["progress"])


# ------------------------------------------------------------------------------- the loop
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


@torch.no_grad()
def _sync_buffers(model: nn.Module, d: _Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm/ST running statistics) before evaluating.

    Each rank updates its running statistics from its own batches; DDP only overwrites them
    with rank 0's at the next forward. Evaluating with rank 0's makes every rank report the
    same accuracy as the checkpoint (saved by rank 0) would give, and changes nothing in
    training, since DDP would broadcast the same values next.
    """
    if d.world_size <= 1:
        return
    if d.horovod is not None:
        d.horovod.broadcast_parameters(dict(model.named_buffers()), root_rank=0)
        return
    for b in model.buffers():
        dist.broadcast(b, src=0)


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def train(config: TrainConfig, *, reporter: Callable[[dict, Path | None], None] | None = None,
          resume_from: str | os.PathLike | None = None, on_step: Callable[[int], None] | None = None) -> dict:
    """Train per ``config``; return the run's results (same dict on every rank).

    ``reporter(metrics, checkpoint_dir_or_None)`` is called on every rank at each checkpoint and
    epoch end (Ray Train passes them to ``ray.train.report``). ``resume_from`` names a
    checkpoint directory (a ``step-*`` directory or a ``checkpoint_dir``) to start from;
    ``config.resume`` resumes from ``config.checkpoint_dir/latest`` when it exists.
    ``on_step(step)`` runs after every optimizer step (fault injection in tests, custom logging).

    Results: ``final_accuracy`` (test set, eval mode), ``final_loss``, ``steps``, ``epochs``,
    ``wall_seconds``, ``step_time_p50``/``p90`` (seconds; forward+backward+communication+update),
    ``bytes_sent_per_step`` (per rank), ``bits_per_element``, ``bytes_source``, ``world_size``,
    ``parameters``, ``resumed_from_step`` (``None`` if started fresh), ``restarts``,
    ``history`` (per-epoch metrics).
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"train() needs a TrainConfig, got {type(config).__name__}")
    from . import data

    t_start = time.perf_counter()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = _device(config, local)
    d = _setup_distributed(config, device)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    hook = None
    try:
        bundle = data.load_dataset(config.dataset, seed=config.seed, num_train=config.num_train)
        model, gradquant = build_model(config, bundle)
        model.to(device)
        optimizer = _optimizer(config, model)
        ddp = None
        net = model
        if d.horovod is not None:
            from .horovod import DistributedOptimizer

            optimizer = DistributedOptimizer(
                optimizer, list(model.named_parameters()), codec=build_codec(config) or _horovod_dense(config),
                error_feedback=_error_feedback(config), seed=config.seed, collective=config.collective,
                warmup_steps=config.warmup_steps, refit_every=config.refit_every)
            d.horovod.broadcast_parameters(model.state_dict(), root_rank=0)
        elif d.world_size > 1:
            ddp_kw = {}
            if config.codec == "powersgd":
                # torch's PowerSGD hook blocks gloo's worker threads in nested all_reduce().wait()
                # when two buckets are in flight (found by benchmarks/bandwidth_accuracy.py): give
                # it one bucket. An explicit cap also replaces DDP's 1 MiB first bucket.
                size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
                ddp_kw["bucket_cap_mb"] = max(25.0, size_mb + 1.0)
            ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, **ddp_kw)
            net = ddp
        hook = _Hook(config, ddp, model, d.world_size, optimizer if d.horovod is not None else None)
        loader = data.make_loader(bundle.train, config.batch_size, rank=d.rank, world_size=d.world_size,
                                  seed=config.seed, shuffle=True, drop_last=True)
        per_epoch = len(loader)
        if per_epoch == 0:
            raise ValueError(f"batch_size {config.batch_size} x {d.world_size} workers exceeds the "
                             f"{len(bundle.train)} training samples: no full batch per epoch")
        total = per_epoch * config.epochs
        if config.max_steps is not None:
            total = min(total, config.max_steps)

        progress = {"step": 0, "epoch": 0, "batch": 0, "restarts": 0, "history": []}
        resumed_from = None
        ckpt_root = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
        src = None
        if resume_from is not None:
            src = Path(resume_from)
            if not (src / "model.pt").is_file():
                src = latest_checkpoint(src)
                if src is None:
                    raise ValueError(f"resume_from={resume_from}: no checkpoint there")
        elif config.resume and ckpt_root is not None:
            src = latest_checkpoint(ckpt_root)
        if src is not None:
            progress = load_checkpoint(src, d, model, optimizer, hook, gradquant)
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
                       unit="step", mininterval=1.0, file=sys.stderr, dynamic_ncols=True)

        def checkpoint() -> Path | None:
            if ckpt_root is None:
                return None
            if hook.state is not None and hasattr(hook.state, "wait_idle"):
                hook.state.wait_idle()
            return save_checkpoint(ckpt_root, d, model, optimizer, hook, progress, gradquant,
                                   config.keep_checkpoints)

        step_times: list[float] = []
        loss_sum, loss_n = 0.0, 0
        step = progress["step"]
        model.train()
        log({"event": "start", "step": step, "world_size": d.world_size, "resumed_from_step": resumed_from,
             "restarts": progress["restarts"], "time": time.time()})
        while step < total:
            epoch = progress["epoch"]
            loader.sampler.set_epoch(epoch)
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
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                optimizer.step()
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
                        reporter({"step": step, "epoch": epoch, "loss": lv, **hook.wire(model, step)}, path)
            else:
                progress["epoch"], progress["batch"] = epoch + 1, 0
            _sync_buffers(model, d)
            acc, test_loss = evaluate(model, bundle.test, device)
            record = {"event": "epoch", "epoch": epoch + 1,
                      "step": step, "train_loss": loss_sum / max(loss_n, 1), "test_accuracy": acc,
                      "test_loss": test_loss, "step_time_p50": _percentile(step_times, 0.5),
                      "elapsed": time.perf_counter() - t_start, **hook.wire(model, step)}
            progress["history"] = list(progress["history"]) + [
                {k: record[k] for k in ("epoch", "step", "train_loss", "test_accuracy", "test_loss")}]
            loss_sum, loss_n = 0.0, 0
            log(record)
            path = checkpoint()
            if reporter is not None:
                reporter({k: v for k, v in record.items() if k != "event"}, path)
        if bar is not None:
            bar.close()
        if hook.state is not None and hasattr(hook.state, "wait_idle"):
            hook.state.wait_idle()
        _sync_buffers(model, d)
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
            **hook.wire(model, step),
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
        if d.owned and dist.is_initialized():
            dist.destroy_process_group()


def _horovod_dense(config: TrainConfig):
    from . import codecs

    # Horovod has no DDP hooks: "none" and "fp16" go through the same optimizer with a dense codec.
    return codecs.HalfCodec() if config.codec == "fp16" else codecs.IdentityCodec()


def main(argv: list[str] | None = None) -> int:
    """Run :func:`train` from a JSON config file (``python -m gradcomp.train CONFIG.json``; torchrun-able)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gradcomp.train", description=main.__doc__)
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
