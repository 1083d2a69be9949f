"""Gradient methods by name: the codec, the hook it registers, and the bytes it puts on the wire.

``TrainConfig.codec`` names a method: ``"none"`` (fp32 DDP), ``"fp16"`` and ``"powersgd"``
(torch's own DDP hooks, the baselines users would pick), or one of gradcomp's codecs (``"fp"``,
``"prune"``, ``"prune-fp"``, ``"budget"``, ``"topk"``). This module turns the name into objects:

* :func:`build_codec` -- the :class:`gradcomp.codecs.Codec` of a config (``None`` for torch's
  hooks), :func:`error_feedback` -- the ``error_feedback`` argument it is registered with;
* :class:`CommHook` -- registers the method on a DDP model, an FSDP2 model or a Horovod
  optimizer, reports its bytes per step and holds the state a checkpoint must restore;
* :func:`dense_ring_bytes` / :func:`powersgd_bytes` -- the byte models of the methods whose
  traffic is not measured (ring all-reduce; torch's PowerSGD hook).

Example:
    >>> from gradcomp.app.config import TrainConfig
    >>> build_codec(TrainConfig(codec="prune", sparsity=0.9))
    PruneCodec(...)
    >>> error_feedback(TrainConfig(codec="topk")), error_feedback(TrainConfig(codec="fp"))
    (True, False)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from gradcomp.app.config import OUR_CODECS, TrainConfig

if TYPE_CHECKING:
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

    from gradcomp.codecs import Codec


def build_codec(config: TrainConfig) -> Codec | None:
    """Return the :class:`gradcomp.codecs.Codec` for ``config.codec`` (``None`` for torch's hooks).

    >>> from gradcomp.app.config import TrainConfig
    >>> build_codec(TrainConfig(codec="fp", bits=5)).bits, build_codec(TrainConfig(codec="powersgd"))
    (5, None)
    """
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


def horovod_dense_codec(config: TrainConfig) -> Codec:
    """Return the dense codec that stands in for ``"none"`` / ``"fp16"`` under Horovod.

    Horovod has no DDP hooks: those two go through the same optimizer with a dense codec
    (:class:`gradcomp.codecs.HalfCodec` for ``"fp16"``, :class:`gradcomp.codecs.IdentityCodec`
    otherwise).

    >>> from gradcomp.app.config import TrainConfig
    >>> type(horovod_dense_codec(TrainConfig(codec="fp16"))).__name__
    'HalfCodec'
    """
    from gradcomp import codecs

    return codecs.HalfCodec() if config.codec == "fp16" else codecs.IdentityCodec()


def error_feedback(config: TrainConfig) -> bool | str:
    """Return the ``error_feedback`` argument of :func:`gradcomp.register` for ``config``.

    ``"auto"`` is on (``True``) for ``topk``, the one biased codec, and off otherwise; ``"none"``
    is ``False``, ``"both"`` is ``True``, ``"worker"`` / ``"reduce"`` pass through.

    >>> from gradcomp.app.config import TrainConfig
    >>> error_feedback(TrainConfig(codec="fp", error_feedback="worker"))
    'worker'
    """
    ef = config.error_feedback
    if ef == "auto":
        return config.codec == "topk"
    modes: dict[str, bool | str] = {"none": False, "worker": "worker", "reduce": "reduce", "both": True}
    return modes[ef]


# ------------------------------------------------------------------------------ byte models
def dense_ring_bytes(numel: int, world: int, elem_bytes: int) -> float:
    """Return the bytes one rank sends per ring all-reduce of ``numel`` elements of ``elem_bytes``.

    ``2 (world - 1) / world * numel * elem_bytes`` (reduce-scatter then all-gather).

    >>> dense_ring_bytes(1000, 4, 4)
    6000.0
    """
    return 2.0 * (world - 1) / world * numel * elem_bytes


def powersgd_bytes(params: Iterable[Any], rank: int, world: int) -> tuple[float, float]:
    """Return (bytes per rank per step, bits per element) of torch's PowerSGD hook (its rules).

    ``params`` are the tensors whose gradients the hook reduces (anything with ``dim()``,
    ``numel()`` and ``shape``). Matrices (tensors with ndim > 1 viewed as ``shape[0] x rest``)
    are compressed at rank ``r = min(n, m, rank)`` when ``n*m > (n+m)*r*2`` (the hook's
    ``min_compression_rate`` 2): P and Q, ``(n+m)*r`` elements, are all-reduced in fp32;
    everything else is all-reduced uncompressed. Bytes follow :func:`dense_ring_bytes`.

    >>> import torch
    >>> powersgd_bytes([torch.zeros(100, 100), torch.zeros(100)], rank=1, world=2)
    (1200.0, 0.9504950495049505)
    """
    sent = 0
    total = 0
    for p in params:
        total += p.numel()
        if p.dim() > 1:
            n, m = p.shape[0], p.numel() // p.shape[0]
            r = min(n, m, rank)
            if n * m > (n + m) * r * 2:
                sent += (n + m) * r
                continue
        sent += p.numel()
    return dense_ring_bytes(sent, world, 4), 32.0 * sent / max(total, 1)


# ------------------------------------------------------------------------------ the hook
class CompressionStateLike(Protocol):
    """What :class:`CommHook` needs of a gradcomp compression state (DDP's or FSDP2's)."""

    def stats(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, sd: dict) -> None: ...

    def close(self) -> None: ...


class CommHook:
    """The communication method of one run: registers it, accounts for its bytes, holds its state.

    ``config.codec`` picks the method; exactly one of ``ddp`` (a DDP-wrapped model), ``fsdp``
    (``model`` is FSDP2-sharded) or ``horovod_optimizer`` (a
    :class:`gradcomp.comm.horovod.DistributedOptimizer`, which carries its own state) says where
    it runs; with none of them (one process) nothing is registered. ``state`` is gradcomp's
    compression state (``None`` for torch's hooks and fp32), ``powersgd`` torch's
    ``PowerSGDState`` when ``codec == "powersgd"``.

    Example:
        >>> from gradcomp.app.config import TrainConfig
        >>> hook = CommHook(TrainConfig(codec="fp"), None, nn.Linear(4, 2), world=1)
        >>> hook.wire(nn.Linear(4, 2), steps=0)["bytes_source"], hook.has_state
        ('single process', False)
    """

    def __init__(self, config: TrainConfig, ddp: nn.parallel.DistributedDataParallel | None, model: nn.Module,
                 world: int, horovod_optimizer: Any = None, fsdp: bool = False):
        self.kind = config.codec
        self.state: CompressionStateLike | None = None
        self.powersgd: PowerSGDState | None = None
        self.world = world
        self.numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.horovod_optimizer = horovod_optimizer  # carries its own compression state
        self.fsdp = fsdp
        if fsdp:
            from gradcomp import codecs
            from gradcomp.comm.fsdp import register as register_fsdp

            codec = codecs.HalfCodec() if config.codec == "fp16" else build_codec(config)
            if codec is not None:
                self.state = register_fsdp(model, codec, error_feedback=error_feedback(config),
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
            self.powersgd = powerSGD_hook.PowerSGDState(
                process_group=ddp.process_group, matrix_approximation_rank=config.powersgd_rank,
                start_powerSGD_iter=2, random_seed=config.seed)
            ddp.register_comm_hook(self.powersgd, powerSGD_hook.powerSGD_hook)
        else:
            codec = build_codec(config)  # None for "none": fp32 DDP, no hook
            if codec is not None:
                from gradcomp.comm.hook import register

                self.state = register(ddp, codec, error_feedback=error_feedback(config),
                                      warmup_steps=config.warmup_steps, refit_every=config.refit_every,
                                      seed=config.seed, collective=config.collective, timeout=config.timeout)

    def wire(self, model: nn.Module, steps: int) -> dict:
        """Bytes this rank sent per step and bits per gradient element (``bytes_source`` says how)."""
        if self.world <= 1:
            return {"bytes_sent_per_step": 0.0, "bits_per_element": None, "bytes_source": "single process"}
        if self.fsdp and self.state is None:  # FSDP2's own fp32 reduce-scatter
            return {"bytes_sent_per_step": (self.world - 1) / self.world * 4 * self.numel,
                    "bits_per_element": 32.0,
                    "bytes_source": "FSDP reduce-scatter model (parameter all-gathers not counted)"}
        if self.fsdp and self.state is not None:
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
            return {"bytes_sent_per_step": dense_ring_bytes(self.numel, self.world, b),
                    "bits_per_element": 8.0 * b, "bytes_source": "ring all-reduce model"}
        if self.kind == "powersgd":
            per_step, bpe = powersgd_bytes((p for p in model.parameters() if p.requires_grad),
                                           self.powersgd_rank, self.world)
            return {"bytes_sent_per_step": per_step, "bits_per_element": bpe,
                    "bytes_source": "PowerSGD P/Q sizes, ring all-reduce model"}
        if self.state is None:
            raise RuntimeError(f"codec {self.kind!r} has no compression state to report (not registered)")
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
        """The rank of torch's PowerSGD approximation (``ValueError`` unless ``codec == "powersgd"``)."""
        if self.powersgd is None:
            raise ValueError(f"codec {self.kind!r} has no PowerSGD state")
        return self.powersgd.matrix_approximation_rank

    def state_dict(self) -> dict | None:
        """The per-rank compression state a checkpoint saves (``None``: this run keeps none)."""
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

    def load_state_dict(self, sd: dict | None) -> None:
        """Restore :meth:`state_dict` output (``None``: nothing to restore)."""
        if sd is not None and self.horovod_optimizer is not None:
            self.horovod_optimizer.load_compression_state_dict(sd)
        elif sd is not None and self.state is not None:
            self.state.load_state_dict(sd)

    def wait_idle(self) -> None:
        """Wait until the compression state has no exchange in flight (no-op if it never has one)."""
        wait = getattr(self.state, "wait_idle", None)
        if wait is not None:
            wait()

    def close(self) -> None:
        """Release the hook's worker threads and groups (idempotent)."""
        if self.horovod_optimizer is not None:
            self.horovod_optimizer.close()
        if self.state is not None:
            self.state.close()
