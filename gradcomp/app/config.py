"""What one training run depends on: :class:`TrainConfig`, its choices, and the validators.

:class:`TrainConfig` is a frozen dataclass validated on construction: a value of the wrong type
or out of range raises ``ValueError`` naming the field (``TrainConfig.<field> must be ...``).
The ``check_*`` helpers below are the one set of field validators the application's configs
share; each raises ``ValueError`` with a message that starts ``<owner>.<field>``.

Example:
    >>> from gradcomp.app.config import TrainConfig
    >>> TrainConfig(codec="fp", bits=5).bits
    5
    >>> TrainConfig(codec="zip")
    Traceback (most recent call last):
    ...
    ValueError: TrainConfig.codec must be one of none, fp16, fp, prune, prune-fp, budget, topk, powersgd; got 'zip'
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

CODECS = ("none", "fp16", "fp", "prune", "prune-fp", "budget", "topk", "powersgd")
OUR_CODECS = ("fp", "prune", "prune-fp", "budget", "topk")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")
ERROR_FEEDBACK = ("auto", "none", "worker", "reduce", "both")
DEVICES = ("auto", "cpu", "cuda")
TRANSPORTS = ("ddp", "horovod", "fsdp")
COLLECTIVES = ("auto", "two_phase", "allgather", "allreduce")


# ------------------------------------------------------------------------------ validators
def is_int(v: Any) -> bool:
    """Whether ``v`` is an ``int`` and not a ``bool``.

    >>> is_int(3), is_int(True), is_int(3.0)
    (True, False, False)
    """
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    """Whether ``v`` is a finite ``int`` or ``float`` and not a ``bool``.

    >>> is_real(0.5), is_real(float("nan")), is_real(False)
    (True, False, False)
    """
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_choice(owner: str, name: str, value: Any, options: Iterable[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``options``.

    >>> check_choice("Cfg", "mode", "b", ("a", "b"))
    >>> check_choice("Cfg", "mode", "c", ("a", "b"))
    Traceback (most recent call last):
    ...
    ValueError: Cfg.mode must be one of a, b; got 'c'
    """
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(map(str, options))}; got {value!r}")


def check_int(owner: str, name: str, value: Any, lo: int, hi: int | None = None, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int in ``lo..hi`` (``hi=None``: no upper bound).

    ``optional``: ``None`` is accepted too.

    >>> check_int("Cfg", "n", 4, 1, 8)
    >>> check_int("Cfg", "n", None, 1, optional=True)
    >>> check_int("Cfg", "n", 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: Cfg.n must be an int >= 1; got 0
    """
    if optional and value is None:
        return
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{owner}.{name} must be an int {rng}{' or None' if optional else ''}; got {value!r}")


def check_real(owner: str, name: str, value: Any, lo: float, hi: float, lo_open: bool = False,
               hi_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number in the interval from ``lo`` to ``hi``.

    The interval is closed at each end unless ``lo_open`` / ``hi_open``.

    >>> check_real("Cfg", "p", 0.5, 0.0, 1.0, hi_open=True)
    >>> check_real("Cfg", "p", 1.0, 0.0, 1.0, hi_open=True)
    Traceback (most recent call last):
    ...
    ValueError: Cfg.p must be a number in [0.0, 1.0); got 1.0
    """
    ok = is_real(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"{owner}.{name} must be a number in {'(' if lo_open else '['}{lo}, "
                         f"{hi}{')' if hi_open else ']'}; got {value!r}")


def check_bool(owner: str, name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a ``bool``.

    >>> check_bool("Cfg", "flag", 1)
    Traceback (most recent call last):
    ...
    ValueError: Cfg.flag must be a bool; got 1
    """
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be a bool; got {value!r}")


def check_path(owner: str, name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` or a non-empty ``str`` / ``os.PathLike``.

    >>> check_path("Cfg", "out", "runs/a")
    >>> check_path("Cfg", "out", "")
    Traceback (most recent call last):
    ...
    ValueError: Cfg.out must be a non-empty path or None; got ''
    """
    if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
        raise ValueError(f"{owner}.{name} must be a non-empty path or None; got {value!r}")


# ------------------------------------------------------------------------------ the config
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
    is the ``init_process_group(timeout=...)`` of a group :func:`gradcomp.app.train.train`
    creates itself (so it bounds the rendezvous too) and the timeout of the gradcomp hook's own
    group (``CompressionState(timeout=...)``). When someone else created the default group (Ray
    Train, a test's ``FileStore`` group), the run uses DDP and its own collectives on a new group
    of the same ranks with this timeout, so theirs does not apply. A stalled or stopped peer
    makes the other ranks fail with an error after about ``timeout`` seconds instead of hanging.
    (Horovod: its own timeouts apply.)

    Example:
        >>> cfg = TrainConfig(model="mlp", codec="prune-fp", sparsity=0.9, epochs=2)
        >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
        True
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

    def __post_init__(self) -> None:
        from gradcomp.app import data, models  # local: keep `import gradcomp.app.config` light

        def choice(name: str, options: Iterable[Any]) -> None:
            check_choice("TrainConfig", name, getattr(self, name), options)

        def integer(name: str, lo: int, hi: int | None = None, optional: bool = False) -> None:
            check_int("TrainConfig", name, getattr(self, name), lo, hi, optional)

        def real(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
            check_real("TrainConfig", name, getattr(self, name), lo, hi, lo_open, hi_open)

        choice("model", models.MODELS)
        choice("dataset", data.DATASETS)
        choice("codec", CODECS)
        choice("error_feedback", ERROR_FEEDBACK)
        choice("collective", COLLECTIVES)
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
            check_bool("TrainConfig", name, getattr(self, name))
        for name in ("checkpoint_dir", "metrics_path"):
            check_path("TrainConfig", name, getattr(self, name))
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
        """Return the config as plain JSON-compatible values (paths as ``str``)."""
        return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build a config from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)
