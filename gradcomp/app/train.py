"""Train a model with compressed gradients: one loop for every launcher.

:func:`train` runs single-process, under ``torchrun``, under ``torch.multiprocessing``, inside
Ray Train workers and inside Horovod workers. It reads the standard environment contract
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) unless a process
group already exists (Ray Train creates one before calling the train function; tests create
one on a ``FileStore``). With one process it trains without DDP and without a hook (the codec
has nothing to cross).

What it does, all from one validated :class:`TrainConfig`:

* data from :mod:`gradcomp.app.data` (no download), sharded by rank; model from
  :mod:`gradcomp.app.models`, optionally with Squeeze-and-Threshold activations (``act_bits``) and
  neural-gradient quantization (``gradquant_bits`` / ``gradquant_sparsity``);
* the gradient hook chosen by ``codec``: ``"none"`` (fp32 DDP), ``"fp16"`` and ``"powersgd"``
  (torch's own hooks, the baselines users would pick), or one of ours (``"fp"``, ``"prune"``,
  ``"prune-fp"``, ``"budget"``, ``"topk"``) through :func:`gradcomp.register`;
* checkpoints every ``checkpoint_every`` steps and at every epoch end: model, optimizer, LR
  schedule, progress and each rank's compression state (residuals differ per rank), written
  to a fresh ``step-XXXXXXXX`` directory and published by an atomic rename of the ``latest``
  pointer, loaded back with ``torch.load(weights_only=True)`` and validated before anything
  is applied (a damaged or tampered file raises :class:`CheckpointError` naming it; every rank
  checks that all ranks resume from the same point, see :func:`train`). A resumed run continues at the
  exact batch where the checkpoint was taken (the data order is a function of seed and epoch),
  with the LR schedule, hook step, fits, residuals and random keys where they were. Without a
  hook it reproduces the uninterrupted run bit for bit; with one, its first step runs on DDP's
  initial bucket layout (DDP reorders buckets after its first step), so that step's stochastic
  draws differ: same distribution, different bits;
* metrics as JSON lines (rank 0), a progress bar on rank 0, and a result dict.

Example:
    >>> from gradcomp.app.train import TrainConfig, train
    >>> result = train(TrainConfig(model="resnet1d", dataset="mnist1d", epochs=1))  # doctest: +SKIP
    >>> result["final_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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
TRANSPORTS = ("ddp", "horovod", "fsdp")
CHECKPOINT_FORMAT = 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on (validated on construction; ``ValueError``).

    Model and data: ``model`` (see :data:`gradcomp.app.models.MODELS`), ``dataset`` (see
    :data:`gradcomp.app.data.DATASETS`), ``width`` (channels/hidden units), ``num_train``
    (``None``: the data set's default), ``act_bits`` (1..4: ST activations; ``None``: full
    precision), ``gradquant_bits`` / ``gradquant_sparsity`` (neural-gradient FP bits and
    stochastic-pruning sparsity; off by default), ``gradquant_exp_offset`` (added to the fitted
    exponent split ``E*`` of ``gradquant_bits``: the seed's ``E*+1``/``E*-1``/``E*-2`` columns).

    Communication: ``codec`` (:data:`CODECS`), ``bits`` and ``exp_bits`` (FP codecs; ``None``
    exp_bits: lognormal split), ``sparsity`` (prune codecs), ``budget_bits`` (budget codec),
    ``topk_ratio`` (topk), ``powersgd_rank``, ``error_feedback`` (``"auto"``: on for topk only,
    the one biased codec), ``warmup_steps`` / ``refit_every`` / ``collective`` (see
    :class:`gradcomp.CompressionState`), ``transport`` (``"ddp"``, ``"horovod"``, or ``"fsdp"``:
    FSDP2 ``fully_shard`` on each top-level child with parameters and the root, gradients
    reduce-scattered by :func:`gradcomp.comm.fsdp.register`; ``codec="none"`` keeps FSDP2's own
    reduce-scatter).

    Optimisation: ``optimizer``, ``lr`` (for the global batch; not rescaled), ``momentum``,
    ``weight_decay``, ``schedule`` (cosine decay to 0 over the run, or constant),
    ``batch_size`` (per worker), ``epochs``, ``max_steps`` (stop early), ``seed``.

    Output: ``checkpoint_dir`` (``None``: no checkpoints), ``checkpoint_every`` (steps; 0: epoch
    ends only), ``keep_checkpoints``, ``resume`` (continue from ``checkpoint_dir/latest`` if it
    exists), ``metrics_path`` (JSON lines, rank 0), ``progress`` (bar on rank 0), ``device``.

    Failure: ``timeout`` (seconds, finite and > 0) bounds how long a rank waits for its peers: it
    is the ``init_process_group(timeout=...)`` of a group :func:`train` creates itself (so it
    bounds the rendezvous too) and the timeout of the gradcomp hook's own group
    (``CompressionState(timeout=...)``). When someone else created the default group (Ray
    Train, a test's ``FileStore`` group), :func:`train` runs DDP and its own collectives on a
    new group of the same ranks with this timeout, so theirs does not apply. A stalled or
    stopped peer makes the other ranks fail with an error after about ``timeout`` seconds
    instead of hanging. (Horovod: its own timeouts apply.)
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
    timeout: float = 300.0

    def __post_init__(self):
        from gradcomp.app import data, models  # local: keep `import gradcomp.app.train` light

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
        real("timeout", 0.0, math.inf, lo_open=True, hi_open=True)
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
        if self.transport == "fsdp" and self.codec == "powersgd":
            raise ValueError("TrainConfig: codec 'powersgd' is torch's DDP hook; FSDP2 has no place for it "
                             "(its gradients are reduce-scattered, not all-reduced)")
        if self.transport == "horovod" and self.codec == "powersgd":
            raise ValueError("TrainConfig: codec 'powersgd' is torch's DDP hook; it has no Horovod transport")

    def to_dict(self) -> dict:
        """Return the config as plain JSON-compatible values."""
        return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
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
    group: Any = None  # the group train() communicates on (None: the default group)
    horovod: Any = None  # the horovod.torch module when transport == "horovod"


def _setup_distributed(config: TrainConfig, device: torch.device) -> _Dist:
    if config.transport == "horovod":
        from gradcomp.comm.horovod import _import_hvd

        hvd = _import_hvd()
        hvd.init()
        return _Dist(hvd.rank(), hvd.size(), hvd.local_rank(), owned=False, horovod=hvd)
    if dist.is_available() and dist.is_initialized():
        # Someone else made the default group (Ray Train, a test), with their timeout: DDP, the
        # hook and train()'s own collectives run on a group of the same ranks with ours, so a
        # stalled peer fails this run after config.timeout (DDP's buffer broadcast and
        # all-reduce would otherwise wait out the default group's timeout, 30 min in torch).
        group = None
        if dist.get_world_size() > 1:
            group = dist.new_group(timeout=datetime.timedelta(seconds=config.timeout), group_desc="gradcomp_train")
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), group=group)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun, "
                           "gradcomp-launch, or set the env:// contract (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=config.timeout))
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("TrainConfig.device='cuda' but torch sees no CUDA device")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def build_codec(config: TrainConfig):
    """Return the :class:`gradcomp.codecs.Codec` for ``config.codec`` (``None`` for torch's hooks)."""
    from gradcomp import codecs

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
                 horovod_optimizer=None, fsdp: bool = False):
        self.kind = config.codec
        self.state = None
        self.world = world
        self.numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.horovod_optimizer = horovod_optimizer  # carries its own compression state
        self.fsdp = fsdp
        if fsdp:
            from gradcomp import codecs
            from gradcomp.comm.fsdp import register as register_fsdp

            codec = codecs.HalfCodec() if config.codec == "fp16" else build_codec(config)
            if codec is not None:
                self.state = register_fsdp(model, codec, error_feedback=_error_feedback(config),
                                           warmup_steps=config.warmup_steps, refit_every=config.refit_every,
                                           seed=config.seed, timeout=config.timeout)
            return
        if ddp is None:
            return
        if config.codec == "fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(ddp.process_group, default_hooks.fp16_compress_hook)
        elif config.codec == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

            # start_powerSGD_iter 2: PowerSGD needs DDP's rebuilt buckets, and torch refuses 1
            # with error feedback on.
            self.state = powerSGD_hook.PowerSGDState(
                process_group=ddp.process_group, matrix_approximation_rank=config.powersgd_rank,
                start_powerSGD_iter=2, random_seed=config.seed)
            ddp.register_comm_hook(self.state, powerSGD_hook.powerSGD_hook)
        elif config.codec != "none":
            from gradcomp.comm.hook import register

            self.state = register(ddp, build_codec(config), error_feedback=_error_feedback(config),
                                  warmup_steps=config.warmup_steps, refit_every=config.refit_every,
                                  seed=config.seed, collective=config.collective, timeout=config.timeout)

    def wire(self, model: nn.Module, steps: int) -> dict:
        """Bytes this rank sent per step and bits per gradient element (``estimated`` says how)."""
        if self.world <= 1:
            return {"bytes_sent_per_step": 0.0, "bits_per_element": None, "bytes_source": "single process"}
        if self.fsdp and self.state is None:  # FSDP2's own fp32 reduce-scatter
            return {"bytes_sent_per_step": (self.world - 1) / self.world * 4 * self.numel,
                    "bits_per_element": 32.0,
                    "bytes_source": "FSDP reduce-scatter model (parameter all-gathers not counted)"}
        if self.fsdp:
            s = self.state.stats()
            return {"bytes_sent_per_step": s["bytes_sent"] / max(s["steps"], 1),
                    "bits_per_element": s["bits_per_element"] or (16.0 if self.kind == "fp16" else 32.0),
                    "bytes_source":
                        "measured by gradcomp.comm.fsdp (reduce-scatter; parameter all-gathers not counted)",
                    "compression_ratio": s["compression_ratio"], "collective": s["collective"]}
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
    def has_state(self) -> bool:
        """Whether this run's hook keeps per-rank state a checkpoint must restore."""
        return self.horovod_optimizer is not None or (self.kind in OUR_CODECS and self.state is not None) \
            or (self.fsdp and self.state is not None)

    @property
    def powersgd_rank(self) -> int:
        return self.state.matrix_approximation_rank

    def state_dict(self):
        if self.horovod_optimizer is not None:
            return self.horovod_optimizer.compression_state_dict()
        if (self.kind in OUR_CODECS or self.fsdp) and self.state is not None:
            return self.state.state_dict()
        return None

    def compression_config(self) -> dict | None:
        """The settings a saved compression state must have been written with (``None``: unknown)."""
        state = getattr(self.horovod_optimizer, "_state", None) if self.horovod_optimizer is not None else self.state
        config = getattr(state, "_config", None)
        return config() if callable(config) else None

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
        dist.barrier(group=d.group)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: damaged, tampered with, or from another run.

    ``path`` is the file (or ``latest`` pointer) at fault; the message starts with it. A
    ``ValueError``, so callers that catch those keep working.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        super().__init__(f"checkpoint file {self.path}: {reason}")


# Fields a resumed run must share with the run that wrote the checkpoint (they fix the model's
# tensors or what its optimizer state means); the rest (epochs, lr, codec, ...) may change.
RESUME_MUST_MATCH = ("model", "dataset", "width", "num_train", "act_bits", "gradquant_bits",
                     "gradquant_sparsity", "gradquant_exp_offset", "optimizer")
_POINTER_MAX_BYTES = 4096


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies in ``root`` (symlinks resolved)."""
    try:
        path.resolve(strict=False).relative_to(root.resolve(strict=False))
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """Return the directory ``checkpoint_dir/latest`` points to, or ``None`` if there is none.

    The pointer must be a small text file naming one directory directly inside
    ``checkpoint_dir`` (no absolute path, no ``..``, no separator, no symlink leading out);
    anything else raises :class:`CheckpointError` naming the pointer.
    """
    root = Path(checkpoint_dir)
    pointer = root / "latest"
    if pointer.is_symlink():
        raise CheckpointError(pointer, "is a symlink; the pointer is a plain file written by save_checkpoint")
    if not pointer.exists():
        return None
    if not pointer.is_file():
        raise CheckpointError(pointer, "is not a regular file")
    try:
        with open(pointer, "rb") as f:
            raw = f.read(_POINTER_MAX_BYTES + 1)
        if len(raw) > _POINTER_MAX_BYTES:
            raise CheckpointError(pointer, f"is over {_POINTER_MAX_BYTES} bytes; not a checkpoint pointer")
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(pointer, "is not UTF-8 text; not a checkpoint pointer") from None
    except OSError as exc:
        raise CheckpointError(pointer, f"cannot be read ({exc})") from exc
    if not name:
        raise CheckpointError(pointer, "is empty; it should name a step-XXXXXXXX directory")
    bad = (name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or os.sep in name
           or (os.altsep is not None and os.altsep in name) or Path(name).is_absolute()
           or any(c in name for c in "\r\n") or name.startswith("."))
    if bad:
        raise CheckpointError(pointer, f"names {name!r}; it must name a directory directly inside {root} "
                                       "(no absolute path, '..' or separator)")
    target = root / name
    if not _inside(target, root) or target.resolve().parent != root.resolve():
        raise CheckpointError(pointer, f"names {target}, which leads outside {root} (a symlink)")
    if not (target / "model.pt").is_file():
        raise CheckpointError(pointer, f"names {target}, which has no model.pt")
    return target


def save_checkpoint(checkpoint_dir: Path, d: _Dist, model: nn.Module, optimizer, hook: _Hook,
                    progress: dict, gradquant: list, keep: int, config: TrainConfig | None = None) -> Path:
    """Write one checkpoint (every rank writes its compression state) and publish it atomically."""
    step_dir = checkpoint_dir / f"step-{progress['step']:08d}"
    if d.rank == 0:
        step_dir.mkdir(parents=True, exist_ok=True)
    _barrier(d)
    step_dir.mkdir(parents=True, exist_ok=True)  # a non-shared file system: each node has its own
    _atomic_save({"format": CHECKPOINT_FORMAT, "world_size": d.world_size, "hook": hook.state_dict()},
                 step_dir / f"compression-rank{d.rank}.pt")
    model_sd, optim_sd = _full_state(model, optimizer)  # FSDP: every rank all-gathers the shards
    if d.rank == 0:
        main = {"format": CHECKPOINT_FORMAT, "model": model_sd, "optimizer": optim_sd,
                "progress": dict(progress), "gradquant_steps": [g.step for g in gradquant],
                "world_size": d.world_size}
        if config is not None:
            main["config"] = config.to_dict()
        _atomic_save(main, step_dir / "model.pt")
    _barrier(d)
    if d.rank == 0:
        tmp = checkpoint_dir / f".latest.tmp-{os.getpid()}"
        tmp.write_text(step_dir.name + "\n")
        os.replace(tmp, checkpoint_dir / "latest")
        old = sorted(p for p in checkpoint_dir.glob("step-*") if p.is_dir() and p != step_dir)
        for p in old[:max(len(old) - (keep - 1), 0)]:
            shutil.rmtree(p, ignore_errors=True)
    return step_dir


# ---- reading and validating (nothing is applied until every file of this rank checked out)
def _read(path: Path, step_dir: Path):
    """``torch.load(weights_only=True)`` of a checkpoint file; every failure names the file."""
    if path.is_symlink() and not _inside(path, step_dir):
        raise CheckpointError(path, f"is a symlink leading outside {step_dir}")
    if not path.is_file():
        raise CheckpointError(path, "is missing" if not path.exists() else "is not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes): an interrupted or damaged write")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, OSError, UnpicklingError, ...
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(path, f"cannot be loaded ({type(exc).__name__}: {detail}); the file is damaged "
                                    "or not a gradcomp checkpoint") from exc


def _check_fit_entry(k, v, path: str) -> None:
    """A saved fit: key ``bucket/phase/shard/segment``; value ``[]`` or ``[mu, sigma >= 0, count >= 0,
    max_abs >= 0, *sample]`` with the sample ascending, positive and finite (at most SAMPLE_SIZE)."""
    from gradcomp.codecs.base import SAMPLE_SIZE

    parts = k.split("/") if isinstance(k, str) else []
    _need(len(parts) == 4 and all(x.isdigit() for x in parts), path, f"'hook'['fits'] has key {k!r}")
    sample = v[4:] if isinstance(v, list) else []
    ok = isinstance(v, list) and (not v or (
        4 <= len(v) <= 4 + SAMPLE_SIZE
        and all((_is_int(x) or isinstance(x, float)) and not math.isnan(x) for x in v)
        and math.isfinite(v[0]) and math.isfinite(v[1]) and v[1] >= 0 and v[2] >= 0 and v[3] >= 0
        and all(0 < a < math.inf for a in sample) and all(a <= b for a, b in zip(sample, sample[1:]))))
    _need(ok, path, f"'hook'['fits'][{k!r}] is {v!r:.200}; a fit is [mu, sigma >= 0, count, max_abs, "
          "*ascending positive sample] or []")


def _check_payload_sizes(sd: dict, path: Path) -> None:
    """Drift baselines (optional): ``"bucket/phase/shard" -> payload bytes >= 1``."""
    for k, v in _need_dict(sd.get("payload_sizes", {}), path, "'hook'['payload_sizes']").items():
        parts = k.split("/") if isinstance(k, str) else []
        _need(len(parts) == 3 and all(x.isdigit() for x in parts) and _is_int(v) and v >= 1, path,
              f"'hook'['payload_sizes'] has {k!r}: {v!r}; an entry is 'bucket/phase/shard': bytes >= 1")


def _need(cond: bool, path: Path, reason: str) -> None:
    if not cond:
        raise CheckpointError(path, reason)


def _need_dict(obj, path: Path, what: str, keys=()) -> dict:
    _need(isinstance(obj, dict), path, f"{what} is a {type(obj).__name__}, not a dict")
    missing = [k for k in keys if k not in obj]
    _need(not missing, path, f"{what} lacks {', '.join(map(repr, missing))}")
    return obj


def _need_count(v, path: Path, what: str, lo: int = 0) -> int:
    _need(_is_int(v) and lo <= v < 2**53, path, f"{what} must be an int >= {lo}; got {v!r}")
    return v


def _need_finite_tensor(t, path: Path, what: str) -> torch.Tensor:
    _need(isinstance(t, torch.Tensor), path, f"{what} is a {type(t).__name__}, not a tensor")
    if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(path, f"{what} holds {bad} non-finite value(s) (NaN/inf)")
    return t


def _check_model_state(sd, path: Path, model: nn.Module) -> None:
    _need_dict(sd, path, "'model'")
    want = model.state_dict()
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    _need(not missing and not extra, path, f"'model' does not fit this model: missing {missing[:5]}, "
                                           f"unexpected {extra[:5]} (another model or config?)")
    for k, ref in want.items():
        t = _need_finite_tensor(sd[k], path, f"'model'[{k!r}]")
        _need(t.shape == ref.shape, path, f"'model'[{k!r}] has shape {tuple(t.shape)}, this model's is "
                                          f"{tuple(ref.shape)}")
        _need(t.dtype == ref.dtype, path, f"'model'[{k!r}] has dtype {t.dtype}, this model's is {ref.dtype}")


def _check_optimizer_state(sd, path: Path, optimizer) -> None:
    _need_dict(sd, path, "'optimizer'", ("state", "param_groups"))
    mine = optimizer.state_dict()["param_groups"]
    groups = sd["param_groups"]
    _need(isinstance(groups, list) and len(groups) == len(mine), path,
          f"'optimizer' has {len(groups) if isinstance(groups, list) else groups!r} parameter groups, this "
          f"optimizer {len(mine)}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, (g, m) in enumerate(zip(groups, mine)):
        _need_dict(g, path, f"'optimizer' param group {i}", ("params",))
        _need(isinstance(g["params"], list) and len(g["params"]) == len(m["params"])
              and all(_is_int(x) and 0 <= x < len(params) for x in g["params"]), path,
              f"'optimizer' param group {i} lists other parameters than this optimizer's")
        for k, v in g.items():
            if k != "params" and isinstance(v, (int, float)) and not isinstance(v, bool):
                _need(math.isfinite(v), path, f"'optimizer' param group {i} has {k}={v!r}")
    state = sd["state"]
    _need_dict(state, path, "'optimizer' state")
    for idx, st in state.items():
        _need(_is_int(idx) and 0 <= idx < len(params), path, f"'optimizer' state has parameter index {idx!r}")
        _need_dict(st, path, f"'optimizer' state[{idx}]")
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                _need_finite_tensor(v, path, f"'optimizer' state[{idx}][{k!r}]")
                _need(v.numel() == 1 or v.shape == params[idx].shape, path,
                      f"'optimizer' state[{idx}][{k!r}] has shape {tuple(v.shape)}, the parameter's is "
                      f"{tuple(params[idx].shape)}")
            else:
                _need(_is_real(v) or v is None, path, f"'optimizer' state[{idx}][{k!r}] is {v!r}")


def _check_progress(p, path: Path) -> dict:
    _need_dict(p, path, "'progress'", ("step", "epoch", "batch"))
    for k in ("step", "epoch", "batch"):
        _need_count(p[k], path, f"'progress'['{k}']")
    _need_count(p.get("restarts", 0), path, "'progress'['restarts']")
    hist = p.get("history", [])
    _need(isinstance(hist, list) and all(isinstance(h, dict) for h in hist), path,
          "'progress'['history'] must be a list of dicts")
    return dict(p, restarts=p.get("restarts", 0), history=list(hist))


def _check_compression_state(sd, path: Path, model: nn.Module) -> int:
    """Validate a :meth:`CompressionState.state_dict` against ``model``; return its step."""
    from gradcomp.comm.hook import STATE_VERSION

    _need_dict(sd, path, "'hook'", ("version", "config", "step", "fits", "residuals", "reduce_residuals",
                                    "reduce_residual_layouts", "stats"))
    _need(sd["version"] == STATE_VERSION, path, f"'hook' is version {sd['version']!r}, not {STATE_VERSION}")
    _need_dict(sd["config"], path, "'hook'['config']")
    step = _need_count(sd["step"], path, "'hook'['step']")
    params = list(model.parameters())
    _need_dict(sd["residuals"], path, "'hook'['residuals']")
    for k, t in sd["residuals"].items():
        _need(_is_int(k) and 0 <= k < len(params), path, f"'hook'['residuals'] has parameter index {k!r}; the "
                                                          f"model has {len(params)} parameters")
        _need_finite_tensor(t, path, f"'hook'['residuals'][{k}]")
        _need(t.dim() == 1 and t.numel() == params[k].numel() and t.is_floating_point(), path,
              f"'hook'['residuals'][{k}] has shape {tuple(t.shape)}; parameter {k} has {params[k].numel()} "
              "elements (a residual of another model)")
    total = sum(p.numel() for p in params)
    _need_dict(sd["reduce_residuals"], path, "'hook'['reduce_residuals']")
    layouts = _need_dict(sd["reduce_residual_layouts"], path, "'hook'['reduce_residual_layouts']")
    for b, t in sd["reduce_residuals"].items():
        _need(_is_int(b) and b >= 0 and b in layouts, path, f"'hook'['reduce_residuals'] has bucket {b!r} "
                                                            "without a layout")
        lay = layouts[b]
        _need(isinstance(lay, (list, tuple)) and len(lay) == 2 and all(_is_int(x) and x >= 1 for x in lay)
              and lay[1] <= total, path, f"'hook'['reduce_residual_layouts'][{b}] is {lay!r}")
        _need_finite_tensor(t, path, f"'hook'['reduce_residuals'][{b}]")
        _need(t.dim() == 1 and t.numel() <= lay[1] and t.is_floating_point(), path,
              f"'hook'['reduce_residuals'][{b}] has shape {tuple(t.shape)} for a bucket of {lay[1]} elements")
    _need_dict(sd["fits"], path, "'hook'['fits']")
    for k, v in sd["fits"].items():
        _check_fit_entry(k, v, path)
    _check_payload_sizes(sd, path)
    st = _need_dict(sd["stats"], path, "'hook'['stats']", ("bytes_sent", "dense_bytes", "payload_bytes",
                                                            "payload_elements"))
    for k, v in st.items():
        _need(_is_real(v) and v >= 0, path, f"'hook'['stats'][{k!r}] is {v!r}")
    return step


def _check_fsdp_compression_state(sd, path: Path, model: nn.Module) -> int:
    """Validate a :meth:`gradcomp.comm.fsdp.FSDPCompressionState.state_dict`; return its step."""
    from gradcomp.comm.fsdp import STATE_VERSION

    _need_dict(sd, path, "'hook'", ("version", "config", "step", "fits", "residuals", "stats", "rank", "world_size"))
    _need(sd["version"] == STATE_VERSION, path, f"'hook' is version {sd['version']!r}, not {STATE_VERSION}")
    _need_dict(sd["config"], path, "'hook'['config']")
    step = _need_count(sd["step"], path, "'hook'['step']")
    total = sum(p.numel() for p in model.parameters())
    for k, t in _need_dict(sd["residuals"], path, "'hook'['residuals']").items():
        parts = k.split("/") if isinstance(k, str) else []
        _need(len(parts) == 2 and all(x.isdigit() for x in parts), path, f"'hook'['residuals'] has key {k!r}")
        _need_finite_tensor(t, path, f"'hook'['residuals'][{k!r}]")
        _need(t.dim() == 1 and t.is_floating_point() and t.numel() <= 2 * total + 64, path,
              f"'hook'['residuals'][{k!r}] has shape {tuple(t.shape)} (a residual of another model)")
    for k, v in _need_dict(sd["fits"], path, "'hook'['fits']").items():
        _check_fit_entry(k, v, path)
    _check_payload_sizes(sd, path)
    for k, v in _need_dict(sd["stats"], path, "'hook'['stats']").items():
        _need(_is_real(v) and v >= 0, path, f"'hook'['stats'][{k!r}] is {v!r}")
    return step


@dataclass
class _Loaded:
    """One rank's validated checkpoint, not yet applied."""
    step_dir: Path
    main: dict
    progress: dict
    comp_path: Path
    comp_status: str  # "loaded", "afresh" (all ranks alike), "missing", "none" (this run keeps no state)
    hook_sd: Any = None
    hook_step: int = 0
    note: str = ""


def read_checkpoint(step_dir: str | os.PathLike, d: _Dist, model: nn.Module, optimizer, hook: _Hook,
                    gradquant: list, config: TrainConfig | None = None) -> _Loaded:
    """Read and validate this rank's files of a checkpoint; change nothing. Raises :class:`CheckpointError`."""
    step_dir = Path(step_dir)
    main_path = step_dir / "model.pt"
    main = _read(main_path, step_dir)
    _need_dict(main, main_path, "the checkpoint", ("format", "model", "optimizer", "progress"))
    _need(main["format"] == CHECKPOINT_FORMAT, main_path, f"unknown checkpoint format {main['format']!r}")
    if "config" in main and config is not None:
        saved = _need_dict(main["config"], main_path, "'config'")
        now = config.to_dict()
        diff = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_MUST_MATCH if saved.get(k) != now[k]]
        _need(not diff, main_path, f"was written by a run with another {', '.join(diff)}; resume with the same "
                                   "model settings or start a fresh checkpoint_dir")
    saved_world = main.get("world_size")
    _need(saved_world is None or (_is_int(saved_world) and saved_world >= 1), main_path,
          f"'world_size' is {saved_world!r}")
    _check_model_state(main["model"], main_path, model)
    _check_optimizer_state(main["optimizer"], main_path, optimizer)
    progress = _check_progress(main["progress"], main_path)
    gq = main.get("gradquant_steps", [])
    _need(isinstance(gq, list) and all(_is_int(s) and s >= 0 for s in gq), main_path,
          f"'gradquant_steps' must be a list of ints >= 0; got {gq!r}")
    _need(not gradquant or len(gq) == len(gradquant), main_path,
          f"'gradquant_steps' has {len(gq)} entries, this model has {len(gradquant)} GradQuant modules")

    comp = step_dir / f"compression-rank{d.rank}.pt"
    loaded = _Loaded(step_dir, main, progress, comp, "none")
    if not hook.has_state:
        return loaded  # fp32, fp16, PowerSGD or one process: nothing to restore
    if saved_world is not None and saved_world != d.world_size:
        loaded.comp_status = "afresh"  # every rank reads the same model.pt, so every rank decides alike
        loaded.note = (f"checkpoint was written by {saved_world} ranks, this run has {d.world_size}; "
                       "error-feedback residuals and fits start afresh")
        return loaded
    if not comp.exists() and not comp.is_symlink():
        loaded.comp_status = "missing"
        return loaded
    c = _need_dict(_read(comp, step_dir), comp, "the compression state", ("format", "world_size", "hook"))
    _need(c["format"] == CHECKPOINT_FORMAT, comp, f"unknown checkpoint format {c['format']!r}")
    _need_count(c["world_size"], comp, "'world_size'", 1)
    if c["world_size"] != d.world_size:
        loaded.comp_status = "afresh"
        loaded.note = (f"checkpoint has compression state for {c['world_size']} ranks, this run has "
                       f"{d.world_size}; error-feedback residuals and fits start afresh")
    elif c["hook"] is None:
        loaded.comp_status = "afresh"
        loaded.note = "checkpoint was written without compression state (another codec); it starts afresh"
    else:
        check = _check_fsdp_compression_state if hook.fsdp else _check_compression_state
        loaded.hook_step = check(c["hook"], comp, model)
        want = hook.compression_config()
        _need(want is None or c["hook"]["config"] == want, comp,
              f"holds compression state written with {c['hook']['config']}, this run's is {want}; resume with the "
              "same codec settings or start a fresh checkpoint_dir")
        loaded.hook_sd, loaded.comp_status = c["hook"], "loaded"
    return loaded


def apply_checkpoint(loaded: _Loaded, model: nn.Module, optimizer, hook: _Hook, gradquant: list) -> dict:
    """Load a validated checkpoint into the run's objects; return its progress."""
    main = loaded.main
    main_path = loaded.step_dir / "model.pt"
    try:
        model.load_state_dict(_shard_like(main["model"], model.state_dict()))
        optimizer.load_state_dict(_shard_optimizer_like(main["optimizer"], optimizer))
    except Exception as exc:
        raise CheckpointError(main_path, f"does not fit this run ({type(exc).__name__}: "
                                         f"{' '.join(str(exc).split())[:300]})") from exc
    for g, s in zip(gradquant, main.get("gradquant_steps", [])):
        g.step = int(s)
    if loaded.comp_status == "loaded":
        try:
            hook.load_state_dict(loaded.hook_sd)
        except Exception as exc:
            raise CheckpointError(loaded.comp_path, f"does not fit this run's compression ({type(exc).__name__}: "
                                                    f"{' '.join(str(exc).split())[:400]})") from exc
    elif loaded.note:
        warnings.warn(f"gradcomp: {loaded.note}", stacklevel=2)
    elif loaded.comp_status == "missing":
        warnings.warn(f"gradcomp: {loaded.comp_path} missing; compression state starts afresh", stacklevel=2)
    return dict(loaded.progress)


def load_checkpoint(step_dir: Path, d: _Dist, model: nn.Module, optimizer, hook: _Hook, gradquant: list,
                    config: TrainConfig | None = None) -> dict:
    """Load this rank's part of a checkpoint written by :func:`save_checkpoint`; return progress.

    Every file is validated first (``weights_only=True`` load, structure, types, ranges, finite
    weights, tensor shapes against this model, the saved config against ``config``); anything
    wrong raises :class:`CheckpointError` naming the file, before anything is changed. This
    function alone does not compare ranks: :func:`train` does (see there).
    """
    return apply_checkpoint(read_checkpoint(step_dir, d, model, optimizer, hook, gradquant, config),
                            model, optimizer, hook, gradquant)


def _all_gather_object(d: _Dist, obj) -> list:
    if d.horovod is not None:
        return list(d.horovod.allgather_object(obj))
    out: list = [None] * d.world_size
    dist.all_gather_object(out, obj, group=d.group)
    return out


def _agree_on_resume(d: _Dist, src: Path | None, loaded: _Loaded | None, error: CheckpointError | None) -> None:
    """Compare every rank's resume point; raise the same kind of error on every rank if they differ.

    One small all-gather of (checkpoint directory, step, compression status, hook step, error).
    """
    mine = {"dir": None if src is None else str(src), "error": None if error is None else str(error),
            "step": None if loaded is None else int(loaded.progress["step"]),
            "status": None if loaded is None else loaded.comp_status,
            "hook_step": None if loaded is None else loaded.hook_step,
            "file": None if loaded is None else str(loaded.comp_path)}
    everyone = _all_gather_object(d, mine)
    failed = [(r, e["error"]) for r, e in enumerate(everyone) if e["error"] is not None]
    if failed:
        if error is not None:
            raise error
        r, msg = failed[0]
        raise CheckpointError(everyone[r]["file"] or everyone[r]["dir"] or "?",
                              f"rank {r} cannot resume from it, so no rank does: {msg}")
    steps = {e["step"] for e in everyone}
    if len(steps) > 1:
        where = "; ".join(f"rank {r}: {e['dir'] or 'no checkpoint'} (step {e['step']})" for r, e in enumerate(everyone))
        raise CheckpointError(src if src is not None else "latest",
                              f"ranks found different checkpoints to resume from ({where}); every rank must see "
                              "the same checkpoint (a shared file system, or copy it to every node)")
    missing = [(r, e["file"]) for r, e in enumerate(everyone) if e["status"] == "missing"]
    if missing:
        r, f = missing[0]
        raise CheckpointError(f, f"is missing (rank {r}'s compression state; missing on ranks "
                                 f"{[m for m, _ in missing]}), so ranks would resume at different hook steps; "
                                 "restore the file, or resume from an older checkpoint")
    statuses = {e["status"] for e in everyone}
    hook_steps = {e["hook_step"] for e in everyone}
    if len(statuses) > 1 or len(hook_steps) > 1:
        by_rank = "; ".join(f"rank {r}: {e['status']} at hook step {e['hook_step']} ({e['file']})"
                            for r, e in enumerate(everyone))
        raise CheckpointError(loaded.comp_path if loaded is not None else "latest",
                              f"ranks disagree on the compression state to resume ({by_rank})")


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
        dist.broadcast(b, src=0, group=d.group)


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
        fsdp = config.transport == "fsdp" and d.world_size > 1
        if fsdp:  # before the optimizer: fully_shard replaces the parameters by sharded DTensors
            _fully_shard(model, d, device)
        optimizer = _optimizer(config, model)
        ddp = None
        net = model
        if d.horovod is not None:
            from gradcomp.comm.horovod import DistributedOptimizer

            optimizer = DistributedOptimizer(
                optimizer, list(model.named_parameters()), codec=build_codec(config) or _horovod_dense(config),
                error_feedback=_error_feedback(config), seed=config.seed, collective=config.collective,
                warmup_steps=config.warmup_steps, refit_every=config.refit_every)
            d.horovod.broadcast_parameters(model.state_dict(), root_rank=0)
        elif d.world_size > 1 and not fsdp:
            ddp_kw = {}
            if config.codec == "powersgd":
                # torch's PowerSGD hook blocks gloo's worker threads in nested all_reduce().wait()
                # when two buckets are in flight (found by benchmarks/bandwidth_accuracy.py): give
                # it one bucket. An explicit cap also replaces DDP's 1 MiB first bucket.
                size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
                ddp_kw["bucket_cap_mb"] = max(25.0, size_mb + 1.0)
            ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, process_group=d.group, **ddp_kw)
            net = ddp
        hook = _Hook(config, ddp, model, d.world_size, optimizer if d.horovod is not None else None, fsdp=fsdp)
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
                loaded = read_checkpoint(src, d, model, optimizer, hook, gradquant, config)
        except CheckpointError as exc:
            load_error = exc
        if d.world_size > 1 and (resume_from is not None or config.resume):
            _agree_on_resume(d, src, loaded, load_error)  # raises on every rank, or on none
        elif load_error is not None:
            raise load_error
        if loaded is not None:
            progress = apply_checkpoint(loaded, model, optimizer, hook, gradquant)
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
            if hook.state is not None and hasattr(hook.state, "wait_idle"):
                hook.state.wait_idle()
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
        if d.group is not None and dist.is_initialized():
            try:
                dist.destroy_process_group(d.group)
            except (RuntimeError, ValueError):
                pass
        if d.owned and dist.is_initialized():
            dist.destroy_process_group()


def _fully_shard(model: nn.Module, d: _Dist, device: torch.device) -> None:
    """FSDP2: ``fully_shard`` each top-level child that holds parameters, then the root.

    The mesh is ``d.group`` (train()'s group with ``config.timeout``) or the default group.
    """
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if d.group is not None:
        # A dimension name unique to this group: meshes over the same ranks compare equal, and
        # DTensor's caches would hand a later run (a second train() in the process) the mesh of
        # an earlier run's destroyed group.
        mesh = DeviceMesh.from_group(d.group, device.type, mesh_dim_names=(f"dp_{d.group.group_name}",))
    else:
        mesh = init_device_mesh(device.type, (d.world_size,))
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor().detach().cpu() if isinstance(t, DTensor) else t


def _full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state dicts with whole tensors (FSDP's shards all-gathered, every rank
    in the same order; DDP's own dicts otherwise, so both write one checkpoint format)."""
    model_sd = {k: _full(v) for k, v in model.state_dict().items()}
    osd = optimizer.state_dict()
    optim_sd = {"state": {i: {k: _full(v) for k, v in st.items()} for i, st in osd["state"].items()},
                "param_groups": osd["param_groups"]}
    return model_sd, optim_sd


def _shard(full, like):
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor) and not isinstance(full, DTensor):  # each rank cuts its own shard
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)
    return full


def _shard_like(sd: dict, ref: dict) -> dict:
    return {k: _shard(v, ref[k]) if k in ref else v for k, v in sd.items()}


def _shard_optimizer_like(sd: dict, optimizer) -> dict:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {i: {k: _shard(v, params[i]) if isinstance(v, torch.Tensor) and v.dim() > 0 and _is_int(i)
                 and 0 <= i < len(params) else v for k, v in st.items()} for i, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def _horovod_dense(config: TrainConfig):
    from gradcomp import codecs

    # Horovod has no DDP hooks: "none" and "fp16" go through the same optimizer with a dense codec.
    return codecs.HalfCodec() if config.codec == "fp16" else codecs.IdentityCodec()


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
