"""Horovod as a second transport: compressed gradient averaging for ``horovodrun`` and Ray jobs.

Horovod's own ``DistributedOptimizer(compression=...)`` all-reduces the compressed tensor, so it
can only carry summable formats (fp16); packed sub-byte payloads cannot be added by any
all-reduce. :class:`DistributedOptimizer` here sends gradcomp's payloads instead: the same
encoded bytes as the DDP hook (:mod:`gradcomp.comm.hook`), through ``hvd.alltoall`` (phase 1 of the
two-phase all-reduce) and ``hvd.allgather`` (the all-gather collective and phase 2), or
``hvd.allreduce`` for summable codecs, chosen by :func:`gradcomp.comm.collectives.choose_collective`.

Nothing is duplicated: :class:`HorovodTransport` implements :class:`gradcomp.comm.collectives.Transport`
and the hook's :class:`~gradcomp.comm.hook.CompressionState` runs on it, so error feedback, lognormal
refits, random keys ``derive_key(seed, step, bucket, rank, shard, phase)``, statistics and
checkpoints behave exactly as under DDP. Horovod has no buckets, so the optimizer flattens the
gradients into buckets the way DDP does (one bucket of all parameters in model order for the
first step; from the second step, buckets of ``bucket_cap_mb`` in the order the gradients became
ready in the first backward, as rank 0 saw it). Given the same codec, seed, data and bucket cap,
both paths produce bit-identical averaged gradients (``tests/horovod`` checks it).

Example (``horovodrun -np 4 --gloo python train.py``)::

    import horovod.torch as hvd
    from gradcomp.codecs import PruneFPCodec
    from gradcomp.comm.horovod import DistributedOptimizer

    hvd.init()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                               model.named_parameters(), codec=PruneFPCodec(0.85, 6),
                               error_feedback=True)
    loss.backward(); opt.step(); opt.zero_grad()

Horovod is imported lazily: ``import gradcomp`` works without it, and anything here that needs
it raises an ImportError that says how to build it (``launch/build_horovod.sh``).
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from gradcomp.codecs import Codec
from gradcomp.codecs.dense import IdentityCodec
from gradcomp.comm.collectives import ExchangeResult, Transport
from gradcomp.comm.hook import CompressionState

BUILD_HINT = ("Build it into the venv with `bash launch/build_horovod.sh` (Horovod 0.28.1 with "
              "PyTorch + Gloo, patched for C++17; about 4 minutes).")
_MB = 1024 * 1024
_DDP_FIRST_BUCKET_BYTES = 1024 * 1024  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES


def _import_hvd():
    """Return ``horovod.torch``, or raise an ImportError naming the build script."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise ImportError(f"gradcomp.comm.horovod needs horovod.torch, which does not import ({exc}). "
                          + BUILD_HINT) from exc
    return hvd


# ---------------------------------------------------------------------------------- transport
class HorovodTransport(Transport):
    """:class:`gradcomp.comm.collectives.Transport` over Horovod (``hvd.init()`` first).

    ``all_to_all`` is one ``hvd.alltoall`` with uneven splits (Horovod exchanges the split sizes
    itself); ``all_gather`` is ``hvd.allgather`` of the payloads (preceded by an all-gather of
    their sizes unless the codec's sizes are known); ``all_reduce_sum_`` is ``hvd.allreduce_``
    with ``op=Sum``. Operations are named ``gradcomp.<set>.<kind>.<n>`` with a per-transport
    counter: every rank issues the same operations in the same order, so the names match.
    CUDA tensors are staged through host memory when Horovod was built without GPU support.
    """

    def __init__(self, process_set=None):
        hvd = _import_hvd()
        if not hvd.is_initialized():
            raise ValueError("Horovod is not initialized: call horovod.torch.init() first")
        self._hvd = hvd
        self.process_set = process_set if process_set is not None else hvd.global_process_set
        if self.process_set.process_set_id is None or not self.process_set.included():
            raise ValueError(f"this rank is not in {self.process_set}")
        self.rank, self.world_size = int(self.process_set.rank()), int(self.process_set.size())
        self._counter = itertools.count()
        self._gpu_ops = bool(hvd.cuda_built() or hvd.rocm_built())

    def _name(self, kind: str) -> str:
        return f"gradcomp.{self.process_set.process_set_id}.{kind}.{next(self._counter)}"

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device.type == "cpu" or self._gpu_ops else t.cpu()

    def all_to_all(self, chunks: list[torch.Tensor], recv_sizes: list[int] | None = None) -> ExchangeResult:
        hvd, device = self._hvd, chunks[0].device
        send_sizes = [int(c.numel()) for c in chunks]
        send = self._wire(torch.cat(chunks))
        splits = torch.tensor(send_sizes, dtype=torch.int32)
        recv, got = hvd.alltoall(send, splits=splits, name=self._name("alltoall"),
                                 process_set=self.process_set)
        sizes = [int(s) for s in got.tolist()]
        if recv_sizes is not None and list(recv_sizes) != sizes:
            raise RuntimeError(f"gradcomp: expected payloads of {list(recv_sizes)} bytes, received {sizes}")
        recv = recv.to(device)
        return ExchangeResult(list(torch.split(recv, sizes)),
                              sum(s for j, s in enumerate(send_sizes) if j != self.rank),
                              self.world_size - 1)

    def all_gather(self, payload: torch.Tensor, recv_sizes: list[int] | None = None) -> ExchangeResult:
        hvd, device = self._hvd, payload.device
        rounds = 1
        if recv_sizes is None:  # hvd.allgather accepts uneven sizes but does not return them
            rounds = 2
            size = torch.tensor([payload.numel()], dtype=torch.int64)
            recv_sizes = hvd.allgather(size, name=self._name("sizes"), process_set=self.process_set).tolist()
        out = hvd.allgather(self._wire(payload), name=self._name("allgather"), process_set=self.process_set)
        if out.numel() != sum(recv_sizes):
            raise RuntimeError(f"gradcomp: all-gather returned {out.numel()} bytes, expected {sum(recv_sizes)}")
        out = out.to(device)
        return ExchangeResult(list(torch.split(out, [int(s) for s in recv_sizes])),
                              (self.world_size - 1) * payload.numel(), rounds * (self.world_size - 1))

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        hvd = self._hvd
        wire = self._wire(tensor)
        hvd.allreduce_(wire, op=hvd.Sum, name=self._name("allreduce"), process_set=self.process_set)
        if wire is not tensor:
            tensor.copy_(wire)


class HorovodCompressionState(CompressionState):
    """:class:`gradcomp.comm.hook.CompressionState` whose collectives run on a :class:`HorovodTransport`.

    Takes the same options as the DDP hook's state, except ``process_group``: it is the base
    state built with ``transport=`` (bound at construction, no process group of its own; Horovod
    orders its own collectives). Built by :class:`DistributedOptimizer`; use it directly to
    reduce your own buckets with ``submit(bucket)`` (any :class:`gradcomp.comm.hook.Bucket`:
    an object with ``buffer()``, ``index()``, ``is_last()``, ``parameters()``).
    """

    settings_owner = "their Horovod DistributedOptimizer"

    def __init__(self, codec: Codec, transport: HorovodTransport, **options: Any):
        if "process_group" in options:
            raise ValueError("HorovodCompressionState takes a transport, not a process_group")
        if not isinstance(transport, HorovodTransport):
            raise ValueError(f"transport must be a HorovodTransport, got {type(transport).__name__}")
        super().__init__(codec, transport=transport, **options)

    def __setstate__(self, state: dict) -> None:
        raise TypeError("a HorovodCompressionState cannot be unpickled (it holds a Horovod "
                        "transport); save state_dict() and load it into a new one instead")


# ---------------------------------------------------------------------------------- buckets
class _Bucket:
    """The part of ``dist.GradBucket`` that :meth:`CompressionState.submit` reads."""

    def __init__(self, buffer: torch.Tensor, index: int, last: bool, params: list[torch.Tensor]):
        self._buffer, self._index, self._last, self._params = buffer, index, last, params

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last

    def parameters(self) -> list[torch.Tensor]:
        return self._params


class _ParameterHolder:
    """What :meth:`CompressionState.bind_model` reads from a model: ``parameters()``."""

    def __init__(self, params: list[torch.Tensor]):
        self._params = params

    def parameters(self):
        return iter(self._params)


def bucket_assignment(params: Sequence[torch.Tensor], limits: Sequence[int],
                      order: Sequence[int] | None = None) -> list[list[int]]:
    """Group parameter indices into buckets as DDP's ``_compute_bucket_assignment_by_size`` does.

    ``params`` are visited in ``order`` (default: their own order); one running bucket per
    (dtype, device) is closed once it holds ``>= limit`` bytes, the limit moving along
    ``limits`` (its last entry repeats). Without ``order`` the buckets are sorted by their
    smallest index; with it (the gradient-ready order) they stay in the order they closed.
    """
    visit = list(range(len(params))) if order is None else list(order)
    result: list[list[int]] = []  # buckets of parameter indices, in the order they closed
    open_: dict[tuple, list[int]] = {}
    sizes: dict[tuple, int] = {}
    limit_pos: dict[tuple, int] = {}
    for i in visit:
        p = params[i]
        key = (p.dtype, p.device)
        open_.setdefault(key, []).append(i)
        sizes[key] = sizes.get(key, 0) + p.numel() * p.element_size()
        pos = limit_pos.setdefault(key, 0)
        if sizes[key] >= limits[pos]:
            result.append(open_.pop(key))
            sizes[key] = 0
            limit_pos[key] = min(pos + 1, len(limits) - 1)
    result.extend(idx for idx in open_.values() if idx)
    if order is None:
        result.sort(key=min)
    return result


# ---------------------------------------------------------------------------------- optimizer
class DistributedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that :meth:`step` first averages the gradients over Horovod ranks
    with a gradcomp codec.

    Args:
        optimizer: any ``torch.optim.Optimizer``; its ``param_groups`` and ``state`` are shared
            (LR schedulers may be given either object).
        named_parameters: ``model.named_parameters()``; the order defines the first step's
            bucket and the error-feedback residual keys, as DDP's module order does. ``None``:
            the optimizer's parameters, in group order.
        codec: a :class:`gradcomp.codecs.Codec`; ``None`` means fp32 (plain all-reduce).
        bucket_cap_mb: bucket size as DDP's ``bucket_cap_mb``; ``None`` means DDP's default
            (25 MiB, first bucket 1 MiB).
        process_set: a Horovod process set (default: all ranks).
        **options: :class:`gradcomp.comm.hook.CompressionState` options: ``error_feedback``,
            ``warmup_steps``, ``refit_every``, ``seed``, ``collective``, ``reduce_codec``.

    Call ``hvd.init()`` first and broadcast the initial parameters
    (``hvd.broadcast_parameters``). Gradients are reduced when :meth:`step` runs (or earlier by
    :meth:`synchronize`, e.g. to clip them; the next :meth:`step` then does not reduce again).
    Parameters without a gradient count as zero gradients, as in Horovod. Every rank must build
    the optimizer with the same settings (checked at construction).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
        codec: Codec | None = None,
        *,
        bucket_cap_mb: float | None = None,
        process_set=None,
        **options: Any,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DistributedOptimizer):
            raise ValueError("optimizer is already a gradcomp DistributedOptimizer")
        if codec is None:
            codec = IdentityCodec()
        if bucket_cap_mb is not None and (isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float))
                                          or not bucket_cap_mb > 0):
            raise ValueError(f"bucket_cap_mb must be a positive number or None, got {bucket_cap_mb!r}")
        group_params = [p for g in optimizer.param_groups for p in g["params"]]
        if named_parameters is None:
            named = [(f"param.{i}", p) for i, p in enumerate(group_params)]
        else:
            named = list(named_parameters)
            if not all(isinstance(t, tuple) and len(t) == 2 and isinstance(t[1], torch.Tensor) for t in named):
                raise ValueError("named_parameters must yield (name, tensor) pairs, e.g. model.named_parameters()")
            names = [n for n, _ in named]
            if len(set(names)) != len(names):
                raise ValueError("named_parameters holds duplicate names")
            unnamed = {id(p) for p in group_params} - {id(p) for _, p in named}
            if unnamed:
                raise ValueError(f"{len(unnamed)} optimizer parameter(s) are not in named_parameters; "
                                 "pass model.named_parameters() of the model the optimizer trains")
        self._transport = HorovodTransport(process_set)  # also checks horovod is importable and initialized
        self._state = HorovodCompressionState(codec, self._transport, **options)

        # What DDP reduces: parameters that require gradients, each once, in model order.
        seen: set[int] = set()
        self._params: list[torch.Tensor] = []
        for _, p in named:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self._params.append(p)
        for p in self._params:
            if p.is_sparse:
                raise ValueError("sparse parameters are not supported")
        # Residual keys: positions in model.parameters() order (each parameter once), as for DDP.
        all_params, ids = [], set()
        for _, p in named:
            if id(p) not in ids:
                ids.add(id(p))
                all_params.append(p)
        self._state.bind_model(_ParameterHolder(all_params))
        if bucket_cap_mb is None:
            self._cap, self._first_cap = 25 * _MB, _DDP_FIRST_BUCKET_BYTES
        else:
            self._cap = self._first_cap = int(bucket_cap_mb * _MB)
        # DDP's first step: one bucket per dtype/device, in model order; then it rebuilds.
        self._buckets = bucket_assignment(self._params, [sys.maxsize])
        self._rebuilt = False
        self._ready: list[int] = []  # parameter positions in gradient-ready order (first step)
        self._ready_set: set[int] = set()
        index_of = {id(p): i for i, p in enumerate(self._params)}
        self._hooks = [p.register_post_accumulate_grad_hook(
                           lambda p, i=index_of[id(p)]: self._mark_ready(i))  # noqa: B008 (binds p's position)
                       for p in self._params]
        self._synchronized = False

        super().__init__(optimizer.param_groups, optimizer.defaults)
        # Share, do not copy: the wrapped optimizer's groups and state are the truth.
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state

    # ------------------------------------------------------------------ bucketing
    def _mark_ready(self, i: int) -> None:
        if not self._rebuilt and i not in self._ready_set:
            self._ready_set.add(i)
            self._ready.append(i)

    def _rebuild_buckets(self) -> None:
        """Re-bucket by gradient-ready order, as DDP's reducer does after its first iteration.

        The order is rank 0's (DDP broadcasts rank 0's rebuilt buckets too); parameters whose
        gradient never arrived through backward follow in reverse model order.
        """
        order = list(self._ready)
        seen = set(order)
        order += [i for i in reversed(range(len(self._params))) if i not in seen]
        transport = self._transport
        if transport.world_size > 1:
            order = [int(t) for t in transport.all_gather_object(",".join(map(str, order)))[0].split(",") if t]
        self._buckets = bucket_assignment(self._params, [self._first_cap, self._cap], order)
        self._rebuilt = True
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def bucket_layout(self) -> list[list[int]]:
        """Current buckets as lists of parameter positions (in ``named_parameters`` order, among
        those that require gradients)."""
        return [list(b) for b in self._buckets]

    # ------------------------------------------------------------------ reduction
    def synchronize(self) -> None:
        """Average every gradient over the ranks now (in place in ``p.grad``)."""
        work = []
        last = len(self._buckets) - 1
        for index, idxs in enumerate(self._buckets):
            params = [self._params[i] for i in idxs]
            grads = []
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
                elif p.grad.is_sparse:
                    raise ValueError("sparse gradients are not supported")
                grads.append(p.grad)
            flat = torch.cat([g.detach().reshape(-1) for g in grads])
            work.append((grads, flat, self._state.submit(_Bucket(flat, index, index == last, params))))
        for grads, flat, fut in work:
            fut.wait()
            offset = 0
            for g in grads:
                n = g.numel()
                g.detach().copy_(flat[offset:offset + n].view_as(g))
                offset += n
        if not self._rebuilt:
            self._rebuild_buckets()
        self._synchronized = True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Average the gradients (unless :meth:`synchronize` already did), then step the wrapped optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._synchronized:
            self.synchronize()
        self._synchronized = False
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if "optimizer" not in self.__dict__:  # Optimizer.__init__ registering the shared groups
            return super().add_param_group(param_group)
        raise ValueError("add parameter groups to the wrapped optimizer before wrapping it: the "
                         "buckets are fixed at construction")

    def state_dict(self) -> dict:
        """The wrapped optimizer's state_dict (the compression state has its own, below)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    # ------------------------------------------------------------------ compression state
    @property
    def compression(self) -> HorovodCompressionState:
        """The :class:`~gradcomp.comm.hook.CompressionState` doing the reduction."""
        return self._state

    def stats(self) -> dict:
        """Wire statistics, as :meth:`gradcomp.CompressionState.stats`."""
        return self._state.stats()

    def compression_state_dict(self) -> dict:
        """Step, fits, residuals and statistics of the compression (checkpoint with the model)."""
        return self._state.state_dict()

    def load_compression_state_dict(self, sd: dict) -> None:
        """Restore :meth:`compression_state_dict` (residuals follow their parameters even though
        this process starts again from DDP's first-step buckets, as a resumed DDP run does)."""
        self._state.load_state_dict(sd)

    def close(self) -> None:
        """Stop the compression worker thread."""
        self._state.close()
        for h in self._hooks:
            h.remove()
        self._hooks = []


# ---------------------------------------------------------------------------------- Ray
def _run_with_hvd(fn: Callable, *args):
    _import_hvd().init()
    return fn(*args)


def run_on_ray(fn: Callable, *, num_workers: int, cpus_per_worker: int = 1, use_gpu: bool = False,
               args: Sequence = (), address: str | None = None, timeout_s: int = 60) -> list:
    """Run ``fn(*args)`` on ``num_workers`` Horovod ranks in Ray actors; return their results in rank order.

    ``hvd.init()`` has already run when ``fn`` starts (Horovod over Gloo, rendezvous set up by
    ``horovod.ray.RayExecutor``). Without a running Ray session, a local one is started (with
    ``address`` given, that cluster is joined) and shut down again afterwards; an existing
    session is used and left running. ``timeout_s`` bounds the Gloo rendezvous.
    ``fn`` and ``args`` must be picklable by cloudpickle; gradcomp must be importable on the workers.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
    if isinstance(cpus_per_worker, bool) or not isinstance(cpus_per_worker, int) or cpus_per_worker < 1:
        raise ValueError(f"cpus_per_worker must be an int >= 1, got {cpus_per_worker!r}")
    if not callable(fn):
        raise ValueError("fn must be callable")
    _import_hvd()
    try:
        import ray
        from horovod.ray import RayExecutor
    except ImportError as exc:
        raise ImportError(f"run_on_ray needs ray and horovod.ray ({exc}). " + BUILD_HINT) from exc
    started = False
    temp_root = None
    if not ray.is_initialized():
        if address is not None:
            ray.init(address=address)
        else:
            # Logical CPUs: enough for the workers even on a small machine (they time-share).
            # A private, short temp dir (Ray's socket paths have a length limit), removed after.
            need = num_workers * cpus_per_worker
            temp_root = tempfile.mkdtemp(prefix="gcray-")
            ray.init(num_cpus=max(need, os.cpu_count() or 1), include_dashboard=False, _temp_dir=temp_root)
        started = True
    try:
        settings = RayExecutor.create_settings(timeout_s=timeout_s)
        executor = RayExecutor(settings, num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                               use_gpu=use_gpu)
        with warnings.catch_warnings():
            # horovod.ray still passes Ray's deprecated placement_group= arguments (it works).
            warnings.filterwarnings("ignore", message="placement_group", category=DeprecationWarning)
            executor.start()
            try:
                return executor.run(_run_with_hvd, args=[fn, *args])
            finally:
                executor.shutdown()
    finally:
        if started:
            ray.shutdown()
        if temp_root is not None:
            shutil.rmtree(temp_root, ignore_errors=True)
