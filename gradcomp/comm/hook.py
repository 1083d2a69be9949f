"""The DDP communication hook and its state.

Usage::

    state = gradcomp.register(ddp_model, codec=gradcomp.codecs.PruneFPCodec(0.85, bits=6))
    # or: state = CompressionState(codec); ddp_model.register_comm_hook(state, compression_hook)

What happens to one gradient bucket (``bucket.buffer()``, averaged in place):

1. Warm-up (the first ``warmup_steps`` steps): plain fp32 all-reduce. DDP rebuilds its buckets
   after the first step, so per-bucket state is only meaningful from then on.
2. With error feedback on the worker side, the residual of the previous step is added.
3. Every ``refit_every`` steps each shard gets fresh lognormal fits, and the codec turns each
   into a plan (format, scale, threshold); in between the cached plans are reused. With
   ``per_tensor=True`` (the default) a shard is cut at its tensors' boundaries (DDP's
   ``bucket.parameters()``) and every tensor's part gets a fit and plan of its own, sent as one
   SEGMENTS payload (:mod:`gradcomp.codecs.segments`): the tensors of a bucket differ in scale
   by orders of magnitude, and one plan per shard lets the largest set the scale and the
   threshold for all. Runs of parts under ``MIN_SEGMENT_NUMEL`` elements share one segment.
4. The collective (:mod:`gradcomp.comm.collectives`: two-phase, all-gather or all-reduce) runs on the
   state's worker thread, so backward keeps computing while buckets cross the network. One
   thread per state runs the buckets first-in first-out: DDP hands buckets over in the same
   order on every rank, so every rank issues the same collectives in the same order.
5. The result is decoded in place into the bucket; the returned future completes with it.

Collective ordering. Every collective of the hook (the warm-up all-reduce, size exchanges, both
two-phase rounds) runs on the state's *own* process group, a copy of DDP's group (same ranks,
same backend) made with ``dist.new_group`` when the state is bound, and only the worker thread
issues on it. DDP meanwhile issues collectives of its own on its group from the backward thread
(``find_unused_parameters=True`` all-reduces the used-parameter map while the last buckets are
still being reduced; ``Join`` shadows collectives); on a shared group the two threads' orders
could differ between ranks, which pairs mismatched messages (gloo: "Received data size doesn't
match expected size") or hangs. With two groups each group sees one thread's order, the same on
every rank. Cost: one group per state (gloo: a TCP connection to each peer and its rendezvous
through the store, milliseconds at construction; NCCL: one more communicator, created on first
use). The group is released by :meth:`CompressionState.close`.

Failures. A collective that fails (a peer died: gloo notices a closed connection at once) or
stalls past the group's ``timeout`` (a stopped or very late peer) raises in the worker; the
bucket's future carries a ``RuntimeError`` that names the bucket, the step and the timeout, DDP
re-raises it from ``backward()``, and every later bucket fails at once with the same cause
instead of waiting another timeout. The worker is a daemon thread: a process whose main thread
has ended is never kept alive by a collective stuck in it.

Non-finite gradients (AMP). A payload whose input held inf or NaN carries the header flag and
decodes to NaN, so the averaged bucket is NaN on every rank and ``GradScaler`` skips the step
everywhere. Error feedback is overflow-safe: the residuals of a step in which any bucket's
result was flagged are discarded whole (worker and reduce side keep the previous step's), and
``stats()["nonfinite_steps"]`` counts such steps. (The residual is carried in the units of the
gradient it came from; GradScaler's occasional scale changes rescale it by that factor once.)

CUDA. The returned future is made with ``devices=[bucket device]``; the worker waits on an event
recorded on the caller's current stream at ``submit()``, runs on a side stream, and completes
the future with that stream current, so DDP's consumers synchronise with it.

Random draws use keys ``derive_key(seed, step, bucket_index, rank, shard, phase)``
(:func:`gradcomp.numerics.rng.derive_key`, phase 1 = worker encode, 2 = reduce-side encode;
segment ``s`` of a SEGMENTS payload uses ``derive_key(that key, 3, s)``), never the global RNG,
so a run is reproducible and a resumed run continues exactly.
"""

from __future__ import annotations

import datetime
import math
import queue
import threading
import warnings
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
import torch.distributed as dist

from gradcomp.codecs import Codec, decode_payload
from gradcomp.codecs.dense import IdentityCodec
from gradcomp.comm.collectives import (
    TorchTransport,
    Transport,
    allgather_mean,
    allreduce_mean,
    choose_collective,
    shard_bounds,
    two_phase_mean,
)
from gradcomp.comm.feedback import ErrorFeedbackMemory
from gradcomp.comm.plans import PlanCache
from gradcomp.comm.stats import HOOK_COUNTERS, WireStats
from gradcomp.numerics import kernels
from gradcomp.numerics.rng import derive_key

ERROR_FEEDBACK = (False, True, "worker", "reduce")
STATE_VERSION = 2


def check_codecs(codec: Codec, reduce_codec: Codec | None, error_feedback) -> Codec:
    """Validate a state's codec, reduce codec and ``error_feedback`` (``ValueError``); return the
    reduce codec to use (``codec.reduce_codec()`` when none is given). Shared by the DDP and FSDP states."""
    if not isinstance(codec, Codec):
        raise ValueError(f"codec must be a gradcomp.codecs.Codec, got {type(codec).__name__}")
    if reduce_codec is not None and not isinstance(reduce_codec, Codec):
        raise ValueError(f"reduce_codec must be a Codec or None, got {type(reduce_codec).__name__}")
    if error_feedback not in ERROR_FEEDBACK or (isinstance(error_feedback, int)
                                                and not isinstance(error_feedback, bool)):
        raise ValueError(f"error_feedback must be one of {ERROR_FEEDBACK}, got {error_feedback!r}")
    return reduce_codec if reduce_codec is not None else codec.reduce_codec()


def _check_int(value, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


class Bucket(Protocol):
    """What :meth:`CompressionState.submit` reads from a bucket: DDP's ``dist.GradBucket``, or any
    object with these methods (Horovod's optimizer builds its own).

    ``buffer()``: the flat gradients, averaged in place; ``index()``: the bucket's position in
    the step (the same on every rank); ``is_last()``: whether it ends the step;
    ``parameters()``: the tensors whose gradients ``buffer()`` holds, in order.
    """

    def buffer(self) -> torch.Tensor: ...

    def index(self) -> int: ...

    def is_last(self) -> bool: ...

    def parameters(self) -> Sequence[torch.Tensor]: ...


class HasParameters(Protocol):
    """What :meth:`CompressionState.bind_model` reads from a model: ``parameters()`` in model order."""

    def parameters(self) -> Iterable[torch.Tensor]: ...


class _Worker:
    """One daemon thread that runs jobs first-in first-out (the hook's collective schedule).

    A daemon, unlike ``concurrent.futures``' workers (joined at interpreter exit): a job stuck
    in a collective whose peer is gone never keeps the process alive. Jobs handle their own
    exceptions.
    """

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fn, args = job
            fn(*args)

    def submit(self, fn, *args) -> None:
        self._queue.put((fn, args))

    def drain(self) -> None:
        """Block until every job submitted so far has run."""
        done = threading.Event()
        self.submit(done.set)
        done.wait()

    def stop(self, wait: bool) -> None:
        self._queue.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()


def _as_timeout(value) -> datetime.timedelta | None:
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(f"timeout must be seconds (a number) or a datetime.timedelta, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"timeout must be positive and finite, got {value!r}")
    return datetime.timedelta(seconds=seconds)


def _group_timeout(group) -> datetime.timedelta | None:
    """The timeout ``group``'s backend was built with (``init_process_group(timeout=...)``)."""
    try:
        pg = group if group is not None else dist.group.WORLD
        if pg is None:
            return None
        for device in (torch.device("cpu"), torch.device("cuda")):
            try:
                return pg._get_backend(device).options._timeout
            except (RuntimeError, AttributeError):
                continue
    except Exception:  # a private API: fall back to torch's default for the backend
        pass
    return None


def copy_group(group, timeout: datetime.timedelta | None, desc: str):
    """A new process group with ``group``'s ranks and backend (``None``: the default group).

    Returns ``(new_group, timeout)``: ``timeout`` if given, else ``group``'s own. Collective
    over ``group``'s members: the whole world when ``group`` spans it (torch's own counter names
    the group), else only the members synchronise (``use_local_synchronization``).
    """
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    whole = len(ranks) == dist.get_world_size()
    timeout = timeout if timeout is not None else _group_timeout(group)
    return dist.new_group(ranks=None if whole else ranks, timeout=timeout, backend=dist.get_backend(group),
                          use_local_synchronization=not whole, group_desc=desc), timeout


class CompressionState:
    """State of :func:`compression_hook`: settings, per-bucket fits and residuals, statistics.

    Args:
        codec: a :class:`gradcomp.codecs.Codec` (e.g. ``FPCodec(6)``, ``PruneFPCodec(0.85, 6)``).
        process_group: the group to reduce over (default: the default group).
        error_feedback: ``False``; ``True`` (worker and reduce side); ``"worker"``: add
            ``x - decode(encode(x))`` to the next step's gradient on each rank; ``"reduce"``:
            the same for the re-encoded mean on the reducing rank (two-phase only).
        warmup_steps: steps of plain fp32 all-reduce first (>= 1 recommended: DDP rebuilds its
            buckets after the first step).
        refit_every: steps between lognormal refits of each shard (>= 1).
        seed: base of every random key (see the module docstring).
        collective: ``"auto"`` (by the cost model), ``"two_phase"``, ``"allgather"``, or
            ``"allreduce"`` (summable codecs only).
        reduce_codec: codec for the two-phase re-encode; default ``codec.reduce_codec()``.
        per_tensor: ``True`` (default): a fit and plan per tensor inside each shard (see the
            module docstring, step 3); ``False``: one per shard (16 bytes less per tensor on the
            wire, far larger errors on real models' buckets).
        timeout: seconds (or a ``timedelta``) after which a collective of the hook's own process
            group gives up (a stalled or stopped peer); default: the timeout of
            ``process_group`` itself (``init_process_group(timeout=...)``; torch's default is
            30 minutes for gloo, 10 for NCCL). A killed peer is noticed sooner by gloo.
        transport: a :class:`gradcomp.comm.collectives.Transport` to run the collectives on
            instead of a process group (keyword only; not with ``process_group``). See below.

    Transports. By default the collectives run on the state's own copy of ``process_group``,
    through :class:`gradcomp.comm.collectives.TorchTransport`; the copy is made when the state
    binds (at construction, or at the first bucket when ``torch.distributed`` was not yet
    initialized) and released by :meth:`close`. With ``transport=`` (Horovod's
    :class:`gradcomp.comm.horovod.HorovodTransport`, or any ``Transport``) the state binds to that
    object at construction (its ``rank`` and ``world_size``; the settings check runs through
    its ``all_gather_object``), makes no group of its own, stays bound after :meth:`close`, and
    cannot be unpickled (the transport cannot travel). Everything else (plans, error feedback,
    random keys, statistics, checkpoints, the bytes on the wire) is the same on every transport.
    A subclass that builds the state for its users sets ``settings_owner``, the name the settings
    check's error gives to what every rank built.

    Constructing a state builds (first time, about a minute) or loads the native codec kernels
    (:mod:`gradcomp.numerics.kernels`), so no training step waits for a compiler. Invalid settings raise
    ``ValueError`` here, never mid-training. The state pickles without its process group and
    worker thread (like torch's PowerSGD state); ``state_dict()`` holds only tensors and
    numbers (``torch.load(weights_only=True)`` reads it).

    Example:
        >>> from gradcomp.codecs import FPCodec
        >>> state = CompressionState(FPCodec(6), error_feedback=True, refit_every=5)
        >>> state.stats()["steps"], state.transport is None  # not bound: no torch.distributed here
        (0, True)
    """

    #: What the settings check's error says every rank built (``"gradcomp: ranks built <this>
    #: with different settings; ..."``).
    settings_owner: str = "CompressionState"

    def __init__(
        self,
        codec: Codec,
        process_group: dist.ProcessGroup | None = None,
        error_feedback: bool | str = False,
        warmup_steps: int = 1,
        refit_every: int = 10,
        seed: int = 0,
        collective: str = "auto",
        reduce_codec: Codec | None = None,
        timeout: float | datetime.timedelta | None = None,
        per_tensor: bool = True,
        *,
        transport: Transport | None = None,
    ):
        if transport is not None and not isinstance(transport, Transport):
            raise ValueError(f"transport must be a gradcomp.comm.collectives.Transport, got {type(transport).__name__}")
        if transport is not None and process_group is not None:
            raise ValueError("CompressionState takes a process_group or a transport, not both")
        # ---- settings
        self.codec = codec
        self.reduce_codec = check_codecs(codec, reduce_codec, error_feedback)
        self.worker_feedback = error_feedback in (True, "worker")
        self.reduce_feedback = error_feedback in (True, "reduce")
        self.error_feedback = error_feedback
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", 0)
        self.refit_every = _check_int(refit_every, "refit_every", 1)
        self.seed = _check_int(seed, "seed", 0)
        self.collective_setting = collective
        self.timeout = _as_timeout(timeout)
        self.plans = PlanCache(per_tensor, follow_growth=not (self.worker_feedback or self.reduce_feedback))
        self.per_tensor = per_tensor
        # ---- internal
        self.process_group = process_group
        self._given_transport = transport  # transport= (never rebinds), else None
        self._on_given_transport = transport is not None  # survives pickling (to refuse unpickling)
        self._comm: dist.ProcessGroup | None = None  # the state's own copy of process_group
        self._transport: Transport | None = None  # what the collectives run on, once bound
        self._bound = False
        self.world_size, self.rank = 1, 0
        self.collective = choose_collective(collective, codec, 2)  # validates early
        self.step = 0
        self._worker: _Worker | None = None
        self._failure: BaseException | None = None  # first failed collective: later buckets fail fast
        self._steps_agreed = False  # ranks compared their step before this state's first collective
        self._comm_timeout: datetime.timedelta | None = None  # resolved when the own group is made
        self._cuda_streams: dict = {}
        if transport is not None or (dist.is_available() and dist.is_initialized()):
            self._bind_group()
        self._param_keys: dict[int, int] = {}  # id(parameter) -> position in the model
        self.memory = ErrorFeedbackMemory()
        self._lock = threading.Lock()
        # ---- stats (guarded by _lock: the worker thread updates them)
        self._stats = WireStats(HOOK_COUNTERS)
        # Build (or load) the native codec kernels now, not inside the first step's backward:
        # a first build takes about a minute (announced on stderr only then), a cached one milliseconds.
        kernels.warmup()

    # ------------------------------------------------------------------ setup / pickling
    def _bind_group(self) -> None:
        """Join the transport: rank, size, the state's own group, the settings check.

        With ``transport=``: that transport, at construction. Otherwise collective over
        ``process_group`` (every rank binds in the same order): at construction when
        ``torch.distributed`` is initialized, else (a state built before
        ``init_process_group``, or unpickled) at its first bucket.
        """
        given = self._given_transport
        group = self.process_group
        if given is not None:
            self.world_size, self.rank = given.world_size, given.rank
        else:
            self.world_size = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
        self.collective = choose_collective(self.collective_setting, self.codec, self.world_size)
        self._bound = True
        self._steps_agreed = False
        if given is not None:
            self._transport = given
        elif self.world_size > 1:
            self._comm, self._comm_timeout = copy_group(group, self.timeout, "gradcomp_hook")
            self._transport = TorchTransport(self._comm)
        if self.world_size > 1:
            self._check_same_settings_on_all_ranks()

    @property
    def transport(self) -> Transport | None:
        """The :class:`~gradcomp.comm.collectives.Transport` the collectives run on: the one given
        as ``transport=``, else one over the state's own group; ``None`` while unbound (or with
        one rank and no transport given)."""
        return self._transport

    def _bound_transport(self) -> Transport:
        if self._transport is None:  # submit() binds before any collective
            raise RuntimeError("gradcomp: the CompressionState is not bound to a transport")
        return self._transport

    def _check_same_settings_on_all_ranks(self) -> None:
        """Fail now, on every rank, if ranks were given different settings.

        Different collectives or codecs on different ranks would otherwise pair mismatched
        collectives mid-training (a hang or garbage). One small all-gather on the state's own
        group when it is bound.
        """
        if self.world_size <= 1:
            return
        mine = repr(sorted(self._config().items()))
        everyone = self._bound_transport().all_gather_object(mine)
        if any(other != mine for other in everyone):
            raise ValueError(
                f"gradcomp: ranks built {self.settings_owner} with different settings; every rank must "
                "use the same codec and options, or their collectives would not match. Settings "
                "by rank: " + "; ".join(f"{r}: {c}" for r, c in enumerate(everyone))
            )

    def bind_model(self, model: torch.nn.Module | HasParameters) -> None:
        """Key residuals by parameter position in ``model`` (needed to checkpoint error feedback).

        ``model``: the DDP model (its ``module`` is read), the module itself, or any object whose
        ``parameters()`` yields the model's parameters in order.
        """
        module = getattr(model, "module", model)
        self._param_keys = {id(p): i for i, p in enumerate(module.parameters())}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in ("process_group", "_given_transport", "_comm", "_transport", "_worker", "_lock",
                  "_cuda_streams", "_failure"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        if state.get("_on_given_transport"):
            raise TypeError(f"a {type(self).__name__} built on a transport cannot be unpickled (the "
                            "transport cannot travel); save state_dict() and load it into a new one instead")
        self.__dict__.update(state)
        self.process_group = None
        self._given_transport = None
        self._comm = None
        self._transport = None
        self._bound = False  # binds (collectively) at its first bucket
        self._steps_agreed = False
        self._worker = None
        self._failure = None
        self._cuda_streams = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Finish the submitted buckets, stop the worker thread and release the state's own group.

        Also done, without waiting and without releasing the group, when the state is garbage
        collected. A closed state rebinds (collectively) if it is used again.
        """
        if self._worker is not None:
            self._worker.stop(wait=True)
            self._worker = None
        comm = self._comm
        if isinstance(comm, dist.ProcessGroup) and dist.is_initialized():
            try:
                dist.destroy_process_group(comm)
            except (RuntimeError, ValueError):
                pass  # already gone with the default group
        if isinstance(comm, dist.ProcessGroup):
            self._comm = None
            self._transport = None
            self._bound = False

    def __del__(self):
        worker = self.__dict__.get("_worker")
        if worker is not None:
            worker.stop(wait=False)

    # ------------------------------------------------------------------ the hook body
    def _key(self, step: int, bucket: int, shard: int, phase: int) -> int:
        return derive_key(self.seed, step, bucket, self.rank, shard, phase)

    def _layout(self, params: Sequence[torch.Tensor]) -> tuple:
        return tuple((self._param_keys.get(id(p), id(p)), p.numel()) for p in params)

    def submit(self, bucket: Bucket) -> torch.futures.Future:
        """Start reducing ``bucket`` (a ``dist.GradBucket`` or any :class:`Bucket`); return the
        future DDP waits on.

        Called from DDP's backward thread; the collectives run on the worker thread, on the
        state's transport (see the module docstring).
        """
        if not self._bound and dist.is_available() and dist.is_initialized():
            self._bind_group()
        buffer, index, step, last = bucket.buffer(), bucket.index(), self.step, bucket.is_last()
        layout = self._layout(bucket.parameters())
        if last:
            self.step += 1
        device = buffer.device
        if device.type == "cuda":
            fut: torch.futures.Future = torch.futures.Future(devices=[device])
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        else:
            fut, ready = torch.futures.Future(), None
        if self.world_size == 1:  # nothing crosses a network
            fut.set_result(buffer)
            return fut
        if self._worker is None:
            self._worker = _Worker("gradcomp-reduce")
        self._worker.submit(self._job, fut, buffer, index, step, last, layout, ready)
        # DDP reads the future from C++: an exception stored by set_exception() would reach
        # backward() as "Unable to cast <message> to Tensor"; raised inside then(), it arrives
        # as a RuntimeError that quotes the original type and message.
        return fut.then(_bucket_value)

    def _job(self, fut, buffer, index, step, last, layout, ready) -> None:
        try:
            if self._failure is not None:
                raise RuntimeError(
                    f"gradcomp: bucket {index} of step {step} not reduced on rank {self.rank}: an "
                    f"earlier collective of this hook failed ({self._failure})") from self._failure
            if not self._steps_agreed:
                self._agree_on_step(step, buffer.device)
            if ready is not None:  # CUDA: run after the caller's stream produced the gradients
                with torch.cuda.device(buffer.device):
                    stream = self._cuda_streams.get(buffer.device)
                    if stream is None:
                        stream = self._cuda_streams[buffer.device] = torch.cuda.Stream(buffer.device)
                    stream.wait_event(ready)
                    with torch.cuda.stream(stream):
                        self._reduce_step(buffer, index, step, last, layout)
                        fut.set_result(buffer)
            else:
                self._reduce_step(buffer, index, step, last, layout)
                fut.set_result(buffer)
        except BaseException as exc:  # surface in backward instead of hanging DDP
            if self._failure is None:
                self._failure = exc
            if exc is self._failure and not isinstance(exc, ValueError):  # ValueError: clear already
                exc = RuntimeError(
                    f"gradcomp: reducing bucket {index} ({buffer.numel()} elements) of step {step} "
                    f"failed on rank {self.rank} of {self.world_size}: {type(exc).__name__}: {exc}. "
                    "A peer that died or stopped fails its collectives (a killed process at once, "
                    f"a stalled one after the hook group's timeout, {self._timeout_text()}); every "
                    "later bucket of this state fails at once.")
                exc.__cause__ = self._failure
            fut.set_exception(exc)

    @property
    def failure(self) -> BaseException | None:
        """The first exception a bucket of this state failed with (its original type), or ``None``.

        DDP re-raises a hook's error from ``backward()`` as a ``RuntimeError`` whose message
        quotes the original type and message; this is the original object.
        """
        return self._failure

    def _agree_on_step(self, step: int, device: torch.device) -> None:
        """Compare the hook step of every rank before the state's first collective.

        Ranks at different steps (a resumed run where one rank's compression state was missing
        and started afresh, a state restored on some ranks only) would issue different
        collectives (a warm-up all-reduce against a two-phase exchange): a hang or garbage.
        Raises ``ValueError`` on every rank instead. One 8-byte all-gather per bind or
        ``load_state_dict``, not counted in ``stats()``.
        """
        mine = torch.tensor([step], dtype=torch.int64).view(torch.uint8).to(device)
        got = self._bound_transport().all_gather(mine, [mine.numel()] * self.world_size).received
        steps = [int(t.cpu().view(torch.int64)[0]) for t in got]
        self._steps_agreed = True
        if len(set(steps)) > 1:
            raise ValueError(
                f"gradcomp: ranks are at different hook steps {steps} (by rank) at their first "
                "bucket; every rank must restore the same CompressionState step (a checkpoint with "
                "one rank's compression state missing or from another run?), or all start afresh")

    def _timeout_text(self) -> str:
        t = self._comm_timeout
        where = "CompressionState(timeout=...)" if self.timeout is not None else \
            ("that of the DDP process group; set it with CompressionState(timeout=...) or "
             "init_process_group(timeout=...)")
        return f"{t.total_seconds():g} s, {where}" if t is not None else where

    def _reduce_step(self, buffer, index, step, last, layout) -> None:
        """Reduce one bucket, then at the step's last bucket commit (or drop) its residuals."""
        self.memory.start_step(step)
        self._reduce(buffer, index, step, layout)
        if last and self.memory.finish_step():
            with self._lock:
                self._stats.count_nonfinite_step()

    def _reduce(self, buffer: torch.Tensor, index: int, step: int, layout: tuple) -> None:
        group, n = self._bound_transport(), self.world_size
        dense = 2 * (n - 1) / n * 4 * buffer.numel()
        if step < self.warmup_steps or self.collective == "allreduce":
            codec = IdentityCodec() if step < self.warmup_steps else self.codec
            rs = allreduce_mean(buffer, codec, group)
            self._account(index, step, buffer.numel(), rs, dense, "allreduce", compressed=False)
            return
        x = buffer if buffer.dtype == torch.float32 else buffer.to(torch.float32)
        if self.worker_feedback:
            x = x + self.memory.residual_for(index, layout, x)
        compressed_step = step - self.warmup_steps
        refit = compressed_step % self.refit_every == 0
        feedback = torch.empty_like(x) if self.worker_feedback else None

        def encode(j: int, lo: int, hi: int) -> torch.Tensor:
            shard = x[lo:hi]
            payload = self.plans.encode(self.codec, shard, self.plans.segment_points(layout, lo, hi),
                                        (index, 1, j), self._key(step, index, j, 1), refit)
            if feedback is not None:  # residual = what this payload failed to carry
                seg = decode_payload(payload, hi - lo, out=feedback[lo:hi])
                torch.sub(shard, seg, out=seg)
            return payload

        def reduce_encode(mean: torch.Tensor) -> torch.Tensor:
            if self.reduce_feedback:
                mean = mean + self.memory.reduce_residual_for(index, mean)
            lo, hi = shard_bounds(x.numel(), n)[self.rank]
            payload = self.plans.encode(self.reduce_codec, mean, self.plans.segment_points(layout, lo, hi),
                                        (index, 2, self.rank), self._key(step, index, self.rank, 2), refit)
            if self.reduce_feedback:
                self.memory.stage_reduce(index, (n, buffer.numel()), mean - decode_payload(payload, mean.numel()))
            return payload

        out = buffer if buffer.dtype == torch.float32 else torch.empty_like(x)
        if self.collective == "allgather":
            rs = allgather_mean(x.numel(), out, encode, group, self.plans.fixed_size(self.codec, layout))
        else:
            rs = two_phase_mean(x.numel(), out, encode, reduce_encode, group,
                                self.plans.fixed_size(self.codec, layout),
                                self.plans.fixed_size(self.reduce_codec, layout))
        if out is not buffer:
            buffer.copy_(out)
        if rs.nonfinite:
            self.memory.mark_nonfinite()
        if feedback is not None:
            self.memory.stage(index, layout, feedback)
        self._account(index, step, buffer.numel(), rs, dense, self.collective, compressed=True)

    def _account(self, index, step, numel, rs, dense, collective, compressed) -> None:
        with self._lock:
            self._stats.record(rs, dense, numel if compressed else None)
            info = {"numel": numel, "collective": collective, "bytes_sent": rs.bytes_sent,
                    "payload_bytes": rs.payload_bytes, "messages": rs.messages}
            if compressed:
                shard = self.rank if collective == "two_phase" else 0
                info["phase1"] = self.plans.describe(self.codec, (index, 1, shard))
                if collective == "two_phase":
                    info["phase2"] = self.plans.describe(self.reduce_codec, (index, 2, self.rank))
                    info["reduce_payload_bytes"] = rs.reduce_payload_bytes
                    info["shard_payload_bytes"] = list(rs.shard_payload_bytes)
            self._stats.entries[index] = info

    # ------------------------------------------------------------------ public API
    def stats(self) -> dict:
        """Cumulative wire statistics of this rank.

        ``nonfinite_steps``: compressed steps whose result carried inf or NaN (GradScaler
        skips them; their residuals were discarded); ``bytes_sent``: bytes this rank handed to
        collectives for other ranks; ``messages``: the nominal messages it sent (``N-1`` per
        round, size exchanges included: each costs a few hundred bytes of framing on a real
        link); ``dense_bytes``: what an fp32 ring all-reduce would have sent;
        ``bits_per_element``: phase-1 payload bits per gradient element over compressed steps,
        headers included; ``steps``; ``buckets``: per bucket the collective and the chosen
        format, sparsity and threshold (with per-tensor plans: the first segment's, plus the
        segment count and every segment's format); ``drift_refits``: shard refits between the
        periodic ones because a payload's size drifted (:mod:`gradcomp.comm.plans`).
        """
        with self._lock:
            return self._stats.summary(steps=self.step, drift_refits=self.plans.drift_refits,
                                       world_size=self.world_size, collective=self.collective,
                                       codec=repr(self.codec))

    def _config(self) -> dict:
        return {"codec": repr(self.codec), "reduce_codec": repr(self.reduce_codec),
                "error_feedback": str(self.error_feedback), "warmup_steps": self.warmup_steps,
                "refit_every": self.refit_every, "seed": self.seed,
                "collective": self.collective_setting, "per_tensor": self.per_tensor}

    def state_dict(self) -> dict:
        """Checkpointable state: step, fits, residuals (by parameter position), statistics."""
        self.wait_idle()
        residuals = self.memory.by_parameter(set(self._param_keys.values()))
        if self.worker_feedback and self.memory.residuals and not self._param_keys:
            warnings.warn("gradcomp: error-feedback residuals are not saved because the state does "
                          "not know the model's parameters; use gradcomp.register() or bind_model()",
                          stacklevel=2)
        fits = self.plans.state_dict()
        reduce_res = {int(b): t.clone() for b, ((_, _), t) in self.memory.reduce_residuals.items()}
        return {
            "version": STATE_VERSION,
            "config": self._config(),
            "step": self.step,
            "fits": fits,
            "payload_sizes": self.plans.sizes_state_dict(),
            "residuals": residuals,
            "reduce_residuals": reduce_res,
            "reduce_residual_layouts": {int(b): list(layout)
                                        for b, (layout, _) in self.memory.reduce_residuals.items()},
            "stats": self._stats.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict`; the configuration must match this state's."""
        if isinstance(sd, dict) and sd.get("version") == 1:
            raise ValueError(
                "this CompressionState state_dict (version 1) was saved by an older gradcomp, whose "
                "plans were one per shard; its fits do not apply to per-tensor plans (version 2). "
                "Start the compression state afresh (the model and optimizer checkpoint are unaffected)")
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise ValueError(f"not a gradcomp CompressionState state_dict of version {STATE_VERSION}")
        if sd["config"] != self._config():
            raise ValueError(f"state_dict was saved with {sd['config']}, this state is {self._config()}")
        self.wait_idle()
        self.step = int(sd["step"])
        self._steps_agreed = False
        self.plans.load_state_dict(sd["fits"], sd.get("payload_sizes"))
        self.memory.load(sd["residuals"], sd["reduce_residuals"], sd["reduce_residual_layouts"])
        stats = WireStats(HOOK_COUNTERS)  # per-bucket figures start afresh
        # Checkpoints from before messages and nonfinite_steps were counted lack them: 0.
        stats.load_state_dict(sd["stats"], required=("bytes_sent", "dense_bytes", "payload_bytes", "payload_elements"))
        with self._lock:
            self._stats = stats

    def wait_idle(self) -> None:
        """Block until every submitted bucket has been reduced (or has failed)."""
        if self._worker is not None:
            self._worker.drain()


def _bucket_value(fut: torch.futures.Future) -> torch.Tensor:
    return fut.value()  # re-raises the worker's exception inside then(): DDP reports it as an error


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future:
    """DDP communication hook: compress, reduce and decode ``bucket`` in place (see module doc)."""
    return state.submit(bucket)


# DDP's register_comm_hook inspects these annotations; with postponed evaluation they would be
# strings, so give it the objects.
compression_hook.__annotations__ = {
    "state": CompressionState, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}


def register(ddp_model: torch.nn.parallel.DistributedDataParallel, codec: Codec, **options) -> CompressionState:
    """Build a :class:`CompressionState` for ``ddp_model``'s group and register the hook.

    ``options`` are :class:`CompressionState`'s keyword arguments. Returns the state (for
    ``stats()``, ``state_dict()``).

    Example:
        >>> state = register(ddp_model, codec=FPCodec(6), error_feedback=True)  # doctest: +SKIP
    """
    if not callable(getattr(ddp_model, "register_comm_hook", None)):
        raise ValueError(
            f"register() needs a DistributedDataParallel model, got {type(ddp_model).__name__}: wrap "
            "it in DDP first (a trainer's prepared model is DDP only when it runs on several processes)")
    options.setdefault("process_group", getattr(ddp_model, "process_group", None))
    state = CompressionState(codec, **options)
    state.bind_model(ddp_model)
    ddp_model.register_comm_hook(state, compression_hook)
    return state
