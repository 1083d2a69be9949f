"""FSDP2 (``torch.distributed.fsdp.fully_shard``): compressed reduce-scatter and HSDP replica all-reduce.

Usage::

    fully_shard(block) for each block; fully_shard(model)
    state = gradcomp.comm.fsdp.register(model, codec=gradcomp.codecs.PruneFPCodec(0.85, 6))

What happens to one FSDP parameter group's gradients (FSDP hands a flat input of ``N * S``
elements in its reduce dtype, ``S`` the padded shard size, and an output of ``S``):

1. Warm-up (the first ``warmup_steps`` steps) and summable codecs (``IdentityCodec``): a plain
   ``reduce_scatter_tensor`` of the input as FSDP would do it (same dtype, same op), on the
   state's own group. ``IdentityCodec`` is therefore bit-identical to FSDP's default.
2. Otherwise, with error feedback on the input side, the residual of the previous step is added
   (fp32). Every ``refit_every`` steps each of the ``N`` shards gets a fresh lognormal fit and
   the codec a fresh plan; in between the cached plan is reused.
3. Phase 1 of gradcomp's two-phase all-reduce (:func:`gradcomp.comm.collectives.reduce_scatter_mean`):
   shard ``j`` is encoded and sent to rank ``j``, which decodes the ``N`` copies of its shard
   and sums them in fp32 in rank order. There is no second quantization: FSDP keeps the reduced
   shard. Bytes per rank: ``(N-1)/N`` of its payload.
4. The sum is divided as FSDP's ``op`` asks (``AVG``: by ``N``; ``SUM`` under
   ``set_force_sum_reduction_for_comms``: not at all, FSDP divides afterwards; ``PREMUL_SUM``
   from ``set_gradient_divide_factor``: times its factor) and written in the output's dtype
   (fp32, or bf16 under ``MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)``; bf16 inputs are
   widened exactly to fp32 before encoding).

HSDP. FSDP2's native HSDP (a 2-D mesh) all-reduces the replicate dimension itself, densely,
before ``set_all_reduce_hook``'s hook sees the result (``foreach_reduce`` in torch 2.13 calls
``dist.all_reduce(reduce_output, group=all_reduce_group)`` and then the hook), so that
all-reduce cannot be replaced: with a 2-D mesh only the reduce-scatter is compressed. To
compress the replicate dimension too, shard on a 1-D mesh (the shard sub-mesh) and pass
``replicate_group=``: the state installs ``set_all_reduce_hook`` (FSDP calls it after the
reduce-scatter with the reduced shard), which averages the shard over the replicas with
gradcomp's compressed all-reduce (``collective``: two-phase or all-gather, as in the DDP hook).

Steps. A step is one backward pass that reduced anything: the first reduce-scatter of a
backward queues an autograd-engine callback (after FSDP's own) that ends the step: ranks agree
(one 1-byte all-reduce on the state's groups, not counted in ``stats()``) whether any reduced
value anywhere was non-finite, residuals are kept or discarded accordingly, and the step
counter advances. A reduce-scatter issued outside a backward pass is a step of its own.

Collective ordering and failures: as the DDP hook (:mod:`gradcomp.comm.hook`). Every collective of
the state runs on its *own* groups, copies of FSDP's shard group (and of ``replicate_group``)
made with ``dist.new_group`` at :func:`register`, so they never interleave with FSDP's
all-gathers on FSDP's group. They run synchronously in the thread that calls the reduce-scatter
(FSDP's post-backward). A peer that died fails the collective (gloo: at once), a stalled one
after ``timeout``; the error names the unit, the step and the timeout, and every later call
fails at once with the same cause.

Random keys: ``derive_key(seed, step, unit, rank, shard, phase)`` with phase 1 for the
reduce-scatter, 3 and 4 for the replica all-reduce's two encodes; ``unit`` is the index of the
FSDP module in ``model.modules()`` order among those with parameters.
"""

from __future__ import annotations

import datetime
import functools

import torch
import torch.distributed as dist

from gradcomp.codecs import Codec, HalfCodec, decode_payload
from gradcomp.comm.collectives import (
    ReduceStats,
    allgather_mean,
    allreduce_mean,
    choose_collective,
    reduce_scatter_mean,
    shard_bounds,
    two_phase_mean,
)
from gradcomp.comm.hook import _as_timeout, _check_int, _group_timeout, check_codecs, copy_group
from gradcomp.comm.plans import PlanCache
from gradcomp.comm.stats import FSDP_COUNTERS, WireStats
from gradcomp.numerics import kernels
from gradcomp.numerics.rng import derive_key

STATE_VERSION = 2
REDUCE_DTYPES = (torch.float32, torch.bfloat16)

try:  # torch >= 2.6 exposes the seam; older versions get a clear error from register()
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
except ImportError:  # pragma: no cover
    FSDPModule = None  # type: ignore[assignment,misc]  # register() then raises a clear ValueError

    class ReduceScatter:  # type: ignore[no-redef]
        pass


class CompressedReduceScatter(ReduceScatter):
    """FSDP2 ``ReduceScatter`` for one FSDP unit of a :class:`FSDPCompressionState`.

    ``allocate`` returns plain tensors; ``__call__`` reduces synchronously and returns ``None``.
    Built and installed by :func:`register` (``module.set_custom_reduce_scatter(comm)``).
    """

    def __init__(self, state: FSDPCompressionState, unit: int, layout: tuple = ()):
        self.state, self.unit = state, unit
        state._layouts[unit] = layout

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        self.state._reduce_scatter(self.unit, output_tensor, input_tensor, group, op)
        return None


def _op_scaling(op, world: int) -> tuple[int, float | None, str]:
    """(integer divisor, extra factor, name) of a reduce op FSDP passes."""
    kind = getattr(op, "op", op)
    if kind == dist.ReduceOp.AVG:
        return world, None, "avg"
    if kind == dist.ReduceOp.SUM:
        return 1, None, "sum"
    if kind == dist.ReduceOp.PREMUL_SUM and getattr(op, "factor", None) is not None:
        return 1, float(op.factor), "premul_sum"
    raise ValueError(f"gradcomp.comm.fsdp: FSDP asked for reduce op {op!r}; a compressed reduce-scatter "
                     "averages or sums (AVG, SUM, PREMUL_SUM), nothing else")


def _copy_partition(group, timeout, desc: str):
    """``(copy of group, timeout)``: a new group of ``group``'s ranks, backend and timeout.

    ``group`` may be one of several disjoint sub-groups (FSDP's shard groups under HSDP): every
    process of the world calls this (``register`` is SPMD), the ranks of each process's group
    are all-gathered on the default group, and every process creates every distinct group in
    the same order, so torch numbers them (``dist.new_group`` with local synchronization would
    name a group by its ranks alone, and a second copy of the same ranks would find the first
    one's stale rendezvous keys in the store).
    """
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    if len(ranks) == dist.get_world_size():
        return copy_group(group, timeout, desc)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, ranks)
    timeout = timeout if timeout is not None else _group_timeout(group)
    mine = None
    for members in sorted({tuple(r) for r in everyone}):
        g = dist.new_group(list(members), timeout=timeout, backend=dist.get_backend(group), group_desc=desc)
        if dist.get_rank() in members:
            mine = g
    return mine, timeout


class FSDPCompressionState:
    """Settings, fits, residuals and statistics of the compressed FSDP2 reduce-scatter.

    Args (the names and meanings of :class:`gradcomp.CompressionState`'s):
        codec: any non-summable :class:`gradcomp.codecs.Codec` (``FPCodec``, ``PruneCodec``,
            ``PruneFPCodec``, ``BudgetCodec``, ``TopKCodec``); ``IdentityCodec`` and
            ``HalfCodec`` reduce densely (fp32 / fp16 on the wire).
        process_group: FSDP's shard group (:func:`register` takes it from the model).
        error_feedback: ``False``; ``True`` or ``"worker"``: per rank, add what last step's
            payloads failed to carry to this step's input (reduce-scatter, and the replica
            all-reduce's input); ``"reduce"`` (or ``True``): the same for the re-encoded mean
            of a two-phase replica all-reduce. The reduce-scatter itself has no reduce side.
        warmup_steps: steps of plain dense reduce-scatter first.
        refit_every: steps between lognormal refits of each shard (>= 1).
        seed: base of every random key (see the module docstring).
        collective: the replica all-reduce's algorithm (``"auto"``, ``"two_phase"``,
            ``"allgather"``); unused without ``replicate_group``.
        reduce_codec: codec of the two-phase replica all-reduce's re-encode.
        timeout: seconds (or a ``timedelta``) after which a collective of the state's own groups
            gives up; default: the timeout of the group it copies.
        replicate_group: HSDP's replicate group when the model is sharded on a 1-D shard mesh
            (see the module docstring), else ``None``.
        per_tensor: ``True`` (default): a fit and plan per parameter inside each shard (each
            rank's part of the reduce-scatter input is its dim-0 chunk of every parameter, padded,
            one after another; see :class:`gradcomp.comm.plans.PlanCache`); ``False``: one per shard.

    Invalid settings raise ``ValueError`` at construction or in :func:`register`, never
    mid-training (except a reduce op or dtype FSDP only reveals at its first reduce-scatter).
    ``state_dict()`` is per rank (residuals are this rank's); each rank saves and loads its own.
    """

    def __init__(self, codec: Codec, process_group=None, error_feedback: bool | str = False,
                 warmup_steps: int = 1, refit_every: int = 10, seed: int = 0, collective: str = "auto",
                 reduce_codec: Codec | None = None, timeout: float | datetime.timedelta | None = None,
                 replicate_group=None, per_tensor: bool = True):
        reduce_codec = check_codecs(codec, reduce_codec, error_feedback)
        if collective == "allreduce" or collective not in ("auto", "two_phase", "allgather"):
            raise ValueError(f"collective (the HSDP replica all-reduce) must be 'auto', 'two_phase' or "
                             f"'allgather', got {collective!r}")
        self.codec = codec
        self.reduce_codec = reduce_codec
        self.error_feedback = error_feedback
        self.worker_feedback = error_feedback in (True, "worker")
        self.reduce_feedback = error_feedback in (True, "reduce")
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", 0)
        self.refit_every = _check_int(refit_every, "refit_every", 1)
        self.seed = _check_int(seed, "seed", 0)
        self.collective_setting = collective
        self.timeout = _as_timeout(timeout)
        self.process_group = process_group
        self.replicate_group = replicate_group
        self.rank, self.world_size, self.replicas, self.replica_rank = 0, 1, 1, 0
        self.collective = choose_collective(collective, codec, 2)
        self._comm = self._rcomm = None
        self._comm_timeout: datetime.timedelta | None = None
        self._bound = False
        self.step = 0
        self._in_step = False
        self._end_now = False
        self._steps_agreed = False
        self._step_nonfinite = False
        self._failure: BaseException | None = None
        self.plans = PlanCache(per_tensor, follow_growth=not (self.worker_feedback or self.reduce_feedback))
        self.per_tensor = per_tensor
        self._layouts: dict[int, tuple] = {}  # unit -> ((parameter, padded shard numel), ...)
        self._residuals: dict[tuple, torch.Tensor] = {}  # (unit, phase) -> flat fp32
        self._staged: dict[tuple, torch.Tensor] = {}
        self._units: dict[int, int] = {}  # unit -> input numel (for stats and checks)
        self._ops: dict[int, str] = {}
        self._stats = WireStats(FSDP_COUNTERS)  # entries: unit -> its last call's figures
        kernels.warmup()  # build or load the native codec kernels now, not in the first backward

    # ------------------------------------------------------------------ setup
    def bind(self) -> None:
        """Make the state's own groups and compare settings across ranks (collective).

        Called by :func:`register` on every rank in the same order.
        """
        pg = self.process_group
        self.world_size, self.rank = dist.get_world_size(pg), dist.get_rank(pg)
        if self.world_size > 1:
            self._comm, self._comm_timeout = _copy_partition(pg, self.timeout, "gradcomp_fsdp")
        if self.replicate_group is not None:
            self.replicas = dist.get_world_size(self.replicate_group)
            self.replica_rank = dist.get_rank(self.replicate_group)
            self.collective = choose_collective(self.collective_setting, self.codec, self.replicas)
            if self.replicas > 1:
                self._rcomm, _ = _copy_partition(self.replicate_group, self.timeout, "gradcomp_fsdp_replicate")
        self._bound = True
        mine = repr(sorted(self._config().items()))
        for comm, size in ((self._comm, self.world_size), (self._rcomm, self.replicas)):
            if comm is None:
                continue
            everyone: list = [None] * size
            dist.all_gather_object(everyone, mine, group=comm)
            if any(o != mine for o in everyone):
                raise ValueError("gradcomp.comm.fsdp: ranks registered different settings; every rank must use "
                                 "the same codec and options, or their collectives would not match. By rank: "
                                 + "; ".join(f"{r}: {c}" for r, c in enumerate(everyone)))

    def close(self) -> None:
        """Release the state's own process groups (FSDP keeps calling it: don't train after)."""
        for name in ("_comm", "_rcomm"):
            comm = getattr(self, name)
            if isinstance(comm, dist.ProcessGroup) and dist.is_initialized():
                try:
                    dist.destroy_process_group(comm)
                except (RuntimeError, ValueError):
                    pass
            setattr(self, name, None)
        self._bound = False

    def _config(self) -> dict:
        return {"codec": repr(self.codec), "reduce_codec": repr(self.reduce_codec),
                "error_feedback": str(self.error_feedback), "warmup_steps": self.warmup_steps,
                "refit_every": self.refit_every, "seed": self.seed, "collective": self.collective_setting,
                "hsdp": self.replicate_group is not None, "per_tensor": self.per_tensor}

    def _timeout_text(self) -> str:
        t = self._comm_timeout
        where = "FSDPCompressionState(timeout=...)" if self.timeout is not None else \
            "that of FSDP's process group; set it with register(..., timeout=...)"
        return f"{t.total_seconds():g} s, {where}" if t is not None else where

    # ------------------------------------------------------------------ steps
    def _check_alive(self, unit: int) -> None:
        if self._failure is not None:
            raise RuntimeError(f"gradcomp.comm.fsdp: unit {unit} of step {self.step} not reduced on rank "
                               f"{self.rank}: an earlier collective of this state failed ({self._failure})"
                               ) from self._failure
        if not self._bound:
            raise ValueError("gradcomp.comm.fsdp: the state is not bound (closed, or built without register())")

    def _begin(self, device: torch.device) -> None:
        """Before a reduce-scatter: compare steps once per bind/load; start a step if none is open."""
        if not self._steps_agreed:
            self._agree_on_step(device)
        if not self._in_step:
            self._in_step, self._step_nonfinite = True, False
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self._end_step)
                self._end_now = False
            except RuntimeError:  # not inside a backward pass: this call is a step of its own
                self._end_now = True

    def _agree_on_step(self, device: torch.device) -> None:
        mine = torch.tensor([self.step], dtype=torch.int64)
        steps: list[int] = []
        for comm in (self._comm, self._rcomm):
            if comm is not None:
                got = [torch.empty_like(mine) for _ in range(dist.get_world_size(comm))]
                dist.all_gather(got, mine, group=comm)
                steps += [int(t) for t in got]
        self._steps_agreed = True
        if len(set(steps)) > 1:
            raise ValueError(f"gradcomp.comm.fsdp: ranks are at different steps {steps}; every rank must restore "
                             "the same FSDPCompressionState step (a checkpoint with one rank's compression "
                             "state missing?), or all start afresh")

    def _end_step(self) -> None:
        """End of a backward pass: agree on non-finite results, commit or drop residuals, step."""
        flag = torch.tensor([1 if self._step_nonfinite else 0], dtype=torch.uint8)
        try:
            for comm in (self._comm, self._rcomm):
                if comm is not None:
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=comm)
        except Exception as exc:
            self._fail(exc, "end of step")
        if int(flag):
            self._stats.count_nonfinite_step()
            self._staged.clear()
        else:
            self._residuals.update(self._staged)
            self._staged.clear()
        self.step += 1
        self._in_step, self._step_nonfinite = False, False

    def _fail(self, exc: BaseException, where: str):
        if self._failure is None:
            self._failure = exc
        if isinstance(exc, ValueError):
            raise exc
        raise RuntimeError(
            f"gradcomp.comm.fsdp: {where} of step {self.step} failed on rank {self.rank} of {self.world_size}: "
            f"{type(exc).__name__}: {exc}. A peer that died or stopped fails its collectives (a killed "
            f"process at once, a stalled one after the state's timeout, {self._timeout_text()}); every "
            "later reduce-scatter of this state fails at once.") from exc

    # ------------------------------------------------------------------ reduce-scatter
    def _shard_layout(self, unit: int, numel: int) -> tuple:
        """The unit's per-shard layout, or ``()`` (one segment) when it does not add up to ``numel``
        (a parameter without a gradient this step is left out of FSDP's input)."""
        layout = self._layouts.get(unit, ())
        return layout if sum(n for _, n in layout) == numel else ()

    def _residual(self, key: tuple, x: torch.Tensor) -> torch.Tensor | None:
        r = self._residuals.get(key)
        return r.to(x.device) if r is not None and r.numel() == x.numel() else None

    def _reduce_scatter(self, unit: int, out: torch.Tensor, inp: torch.Tensor, group, op) -> None:
        self._check_alive(unit)
        n = self.world_size
        if inp.dtype not in REDUCE_DTYPES or out.dtype != inp.dtype:
            raise ValueError(f"gradcomp.comm.fsdp: reduce dtype {inp.dtype}; the compressed reduce-scatter takes "
                             "float32 or bfloat16 (MixedPrecisionPolicy(reduce_dtype=...)): FSDP pre-divides "
                             "float16 inputs for overflow, which the codecs' fits would not see")
        if group is not None and dist.get_world_size(group) != n:
            raise ValueError(f"gradcomp.comm.fsdp: FSDP reduce-scatters over {dist.get_world_size(group)} ranks, "
                             f"the state was bound to {n}: register() must see FSDP's shard group")
        if inp.numel() != n * out.numel():
            raise ValueError(f"gradcomp.comm.fsdp: reduce-scatter input of {inp.numel()} elements for an output "
                             f"of {out.numel()} on {n} ranks")
        divisor, factor, opname = _op_scaling(op, n)
        if self.replicate_group is not None and opname != "avg":
            raise ValueError(
                "gradcomp.comm.fsdp: with replicate_group the replica all-reduce averages, so the reduce-scatter "
                f"must average too; FSDP asked for {opname} (set_force_sum_reduction_for_comms or "
                "set_gradient_divide_factor divide only by the shard size when the all-reduce is a hook)")
        self._ops[unit] = opname
        self._units[unit] = inp.numel()
        try:
            self._begin(inp.device)
            step = self.step
            if n == 1:
                out.copy_(inp if factor is None else inp * factor)
                rs = ReduceStats()
                compressed = False
            elif step < self.warmup_steps or self.codec.summable:
                rs = self._dense_reduce_scatter(out, inp, op, divisor, factor)
                compressed = False
            else:
                rs = self._compressed_reduce_scatter(unit, out, inp, step, divisor, factor)
                compressed = True
        except Exception as exc:
            self._fail(exc, f"reduce-scatter of unit {unit} ({inp.numel()} elements)")
        self._account(unit, inp, rs, compressed)
        if self._end_now:
            self._end_step()

    def _dense_reduce_scatter(self, out, inp, op, divisor, factor) -> ReduceStats:
        n = self.world_size
        if isinstance(self.codec, HalfCodec) and self.step >= self.warmup_steps:
            half = inp.to(torch.float16).div_(divisor)  # divide first: the fp16 sum must not overflow
            if factor is not None:
                half.mul_(factor)
            res = torch.empty(out.numel(), dtype=torch.float16, device=out.device)
            dist.reduce_scatter_single(res, half, op=dist.ReduceOp.SUM, group=self._comm)
            out.copy_(res)
            elem = 2
        else:  # what FSDP's default does, on the state's group
            dist.reduce_scatter_single(out, inp, op=op, group=self._comm)
            elem = inp.element_size()
        payload = elem * inp.numel()
        return ReduceStats(bytes_sent=round((n - 1) / n * payload), payload_bytes=payload, messages=n - 1)

    def _compressed_reduce_scatter(self, unit, out, inp, step, divisor, factor) -> ReduceStats:
        n, s = self.world_size, out.numel()
        x = inp if inp.dtype == torch.float32 else inp.to(torch.float32)
        if self.worker_feedback:
            r = self._residual((unit, 1), x)
            if r is not None:
                x = x + r
        refit = (step - self.warmup_steps) % self.refit_every == 0
        feedback = torch.empty_like(x) if self.worker_feedback else None

        layout = self._shard_layout(unit, s)
        points = self.plans.segment_points(layout, 0, s)  # every shard has the same layout
        fixed = self.plans.fixed_size(self.codec, layout)

        def encode(j: int, lo: int, hi: int) -> torch.Tensor:
            shard = x[lo:hi]
            payload = self.plans.encode(self.codec, shard, points, (unit, 1, j),
                                        derive_key(self.seed, step, unit, self.rank, j, 1), refit)
            if feedback is not None:
                seg = decode_payload(payload, hi - lo, out=feedback[lo:hi])
                torch.sub(shard, seg, out=seg)
            return payload

        mean = out if out.dtype == torch.float32 and out.data_ptr() != inp.data_ptr() else \
            torch.empty(s, dtype=torch.float32, device=out.device)
        rs = reduce_scatter_mean([(j * s, (j + 1) * s) for j in range(n)], mean, encode, self._comm,
                                 (lambda a, b: fixed(0, b - a)) if fixed is not None else None, divisor)
        if factor is not None:
            mean.mul_(factor)
        if mean is not out:
            out.copy_(mean)
        if rs.nonfinite:
            self._step_nonfinite = True
        if feedback is not None:
            self._staged[(unit, 1)] = feedback
        return rs

    # ------------------------------------------------------------------ HSDP replica all-reduce
    def _replica_all_reduce(self, unit: int, shard: torch.Tensor) -> None:
        """FSDP's all-reduce hook: average ``shard`` (in place) over ``replicate_group``."""
        if self.replicas <= 1:
            return
        self._check_alive(unit)
        step, r = self.step, self.replicas
        try:
            if step < self.warmup_steps or self.codec.summable:
                codec = self.codec if step >= self.warmup_steps else _identity()
                buf = shard if shard.dtype == torch.float32 else shard.to(torch.float32)
                rs = allreduce_mean(buf, codec, self._rcomm)
                if buf is not shard:
                    shard.copy_(buf)
                compressed = False
            else:
                rs = self._compressed_replica(unit, shard, step)
                compressed = True
        except Exception as exc:
            self._fail(exc, f"replica all-reduce of unit {unit} ({shard.numel()} elements)")
        self._stats.record_replica(rs, 2 * (r - 1) / r * shard.element_size() * shard.numel())
        if compressed:
            self._stats.entries.setdefault(unit, {})["replica"] = {
                "collective": self.collective, "bytes_sent": rs.bytes_sent, "payload_bytes": rs.payload_bytes}

    def _compressed_replica(self, unit: int, shard: torch.Tensor, step: int) -> ReduceStats:
        x = shard if shard.dtype == torch.float32 else shard.to(torch.float32)
        if self.worker_feedback:
            res = self._residual((unit, 3), x)
            if res is not None:
                x = x + res
        refit = (step - self.warmup_steps) % self.refit_every == 0
        feedback = torch.empty_like(x) if self.worker_feedback else None
        rrank = self.replica_rank
        layout = self._shard_layout(unit, x.numel())

        def encode(j: int, lo: int, hi: int) -> torch.Tensor:
            part = x[lo:hi]
            payload = self.plans.encode(self.codec, part, self.plans.segment_points(layout, lo, hi), (unit, 3, j),
                                        derive_key(self.seed, step, unit, self.rank, j, 3), refit)
            if feedback is not None:
                seg = decode_payload(payload, hi - lo, out=feedback[lo:hi])
                torch.sub(part, seg, out=seg)
            return payload

        def reduce_encode(mean: torch.Tensor) -> torch.Tensor:
            if self.reduce_feedback:
                prev = self._residual((unit, 4), mean)
                if prev is not None:
                    mean = mean + prev
            lo, hi = shard_bounds(x.numel(), self.replicas)[rrank]
            payload = self.plans.encode(self.reduce_codec, mean, self.plans.segment_points(layout, lo, hi),
                                        (unit, 4, rrank), derive_key(self.seed, step, unit, self.rank, rrank, 4), refit)
            if self.reduce_feedback:
                self._staged[(unit, 4)] = mean - decode_payload(payload, mean.numel())
            return payload

        out = torch.empty_like(x)
        if self.collective == "allgather":
            rs = allgather_mean(x.numel(), out, encode, self._rcomm, self.plans.fixed_size(self.codec, layout))
        else:
            rs = two_phase_mean(x.numel(), out, encode, reduce_encode, self._rcomm,
                                self.plans.fixed_size(self.codec, layout),
                                self.plans.fixed_size(self.reduce_codec, layout))
        shard.copy_(out)
        if rs.nonfinite:
            self._step_nonfinite = True
        if feedback is not None:
            self._staged[(unit, 3)] = feedback
        return rs

    # ------------------------------------------------------------------ stats and checkpoints
    def _account(self, unit: int, inp: torch.Tensor, rs: ReduceStats, compressed: bool) -> None:
        n = self.world_size
        self._stats.record(rs, (n - 1) / n * inp.element_size() * inp.numel(), inp.numel() if compressed else None)
        info = {"numel": inp.numel(), "dtype": str(inp.dtype).replace("torch.", ""), "op": self._ops[unit],
                "compressed": compressed, "bytes_sent": rs.bytes_sent, "payload_bytes": rs.payload_bytes,
                "messages": rs.messages}
        if compressed:
            info["shard_payload_bytes"] = list(rs.shard_payload_bytes)
            info["phase1"] = self.plans.describe(self.codec, (unit, 1, self.rank))
        prev = self._stats.entries.get(unit, {})
        if "replica" in prev:
            info["replica"] = prev["replica"]
        self._stats.entries[unit] = info

    def stats(self) -> dict:
        """Cumulative wire statistics of this rank.

        ``bytes_sent``: bytes this rank's reduce-scatters handed to collectives for other ranks;
        ``dense_bytes``: what FSDP's default reduce-scatter sends in the reduce dtype
        (``(N-1)/N`` of the input); ``bits_per_element``: payload bits per input element over
        compressed reduce-scatters, headers and FSDP's padding included;
        ``replica_bytes_sent`` / ``replica_dense_bytes``: the same for the HSDP replica
        all-reduce (dense: a ring all-reduce, ``2 (R-1)/R``); ``messages``: nominal messages
        (``N-1`` per round); ``nonfinite_steps``: steps whose result held inf or NaN on some rank
        (their residuals were discarded); ``units``: per FSDP unit the last call's figures.
        """
        st = self._stats.counters
        return {
            "steps": self.step, "world_size": self.world_size, "replicas": self.replicas,
            "bytes_sent": st["bytes_sent"], "messages": st["messages"], "dense_bytes": st["dense_bytes"],
            "compression_ratio": self._stats.compression_ratio(),
            "bits_per_element": self._stats.bits_per_element(),
            "replica_bytes_sent": st["replica_bytes_sent"], "replica_dense_bytes": st["replica_dense_bytes"],
            "nonfinite_steps": st["nonfinite_steps"], "drift_refits": self.plans.drift_refits,
            "codec": repr(self.codec),
            "collective": "reduce_scatter" if not self.codec.summable else "dense_reduce_scatter",
            "replica_collective": self.collective if self.replicate_group is not None else None,
            "units": self._stats.entries_copy(),
        }

    def state_dict(self) -> dict:
        """This rank's checkpointable state: step, fits, residuals (by unit), statistics."""
        if self._in_step:
            raise ValueError("gradcomp.comm.fsdp: state_dict() inside a backward pass; call it between steps")
        return {
            "version": STATE_VERSION, "config": self._config(), "step": self.step,
            "rank": self.rank, "world_size": self.world_size,
            "fits": self.plans.state_dict(),
            "payload_sizes": self.plans.sizes_state_dict(),
            "residuals": {f"{u}/{p}": t.detach().clone() for (u, p), t in self._residuals.items()},
            "stats": self._stats.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict` (this rank's); the configuration and world size must match."""
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise ValueError(f"not a gradcomp FSDPCompressionState state_dict of version {STATE_VERSION}")
        if sd["config"] != self._config():
            raise ValueError(f"state_dict was saved with {sd['config']}, this state is {self._config()}")
        if sd["world_size"] != self.world_size or sd["rank"] != self.rank:
            raise ValueError(f"state_dict is rank {sd['rank']} of {sd['world_size']}, this state is rank "
                             f"{self.rank} of {self.world_size}: residuals are per rank and per shard layout")
        self.step = int(sd["step"])
        self._steps_agreed = False
        self.plans.load_state_dict(sd["fits"], sd.get("payload_sizes"))
        self._residuals = {tuple(int(t) for t in k.split("/")): v.clone() for k, v in sd["residuals"].items()}
        self._staged.clear()
        self._stats.load_state_dict(sd["stats"])


def _identity() -> Codec:
    from gradcomp.codecs.dense import IdentityCodec
    return IdentityCodec()


def _param_groups(module) -> list:
    return list(module._get_fsdp_state()._fsdp_param_groups)


def register(model: torch.nn.Module, codec: Codec, **options) -> FSDPCompressionState:
    """Compress every FSDP2 reduce-scatter of ``model`` (and, with ``replicate_group``, the HSDP
    replica all-reduce); return the state (``stats()``, ``state_dict()``).

    ``model``: a ``fully_shard``-ed model (every ``FSDPModule`` in ``model.modules()`` gets a
    :class:`CompressedReduceScatter`). ``options``: :class:`FSDPCompressionState`'s keyword
    arguments. Collective: every rank calls it, in the same order, after ``fully_shard``.
    Raises ``ValueError`` for what FSDP2 would break (see the checks below).

    Example:
        >>> state = register(model, codec=FPCodec(6), error_feedback=True)  # doctest: +SKIP
    """
    if FSDPModule is None:
        raise ValueError("gradcomp.comm.fsdp needs torch >= 2.6 (FSDP2's set_custom_reduce_scatter)")
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        raise ValueError(f"gradcomp.comm.fsdp.register needs a fully_shard-ed model; {type(model).__name__} has no "
                         "FSDPModule (call torch.distributed.fsdp.fully_shard on it first)")
    groups = []
    for m in units:
        pgs = _param_groups(m)
        if len(pgs) > 1:
            raise ValueError(f"gradcomp.comm.fsdp: {type(m).__name__} has {len(pgs)} FSDP parameter groups (a "
                             "shard_placement_fn with several meshes); FSDP2 takes one custom reduce-scatter "
                             "per module, which could not serve groups on different meshes")
        groups += [(m, g) for g in pgs]
    if not groups:
        raise ValueError("gradcomp.comm.fsdp: no FSDP module of the model holds parameters")
    replicate_group = options.get("replicate_group")
    shard_groups = set()
    for _, g in groups:
        info = g.mesh_info
        if not hasattr(info, "shard_process_group"):
            raise ValueError("gradcomp.comm.fsdp: a module is replicated without sharding (fully_shard on a "
                             "replicate-only mesh); use DDP and gradcomp.register for that")
        if hasattr(info, "replicate_process_group") and replicate_group is not None:
            raise ValueError(
                "gradcomp.comm.fsdp: replicate_group given for a model on a 2-D (HSDP) mesh: FSDP2 all-reduces "
                "the replicate dimension itself, densely, before set_all_reduce_hook runs; to compress it, "
                "fully_shard on the shard sub-mesh (mesh['shard']) and pass "
                "replicate_group=mesh.get_group('replicate')")
        if g._all_reduce_hook is not None:
            raise ValueError("gradcomp.comm.fsdp: a module already has an all-reduce hook (set_all_reduce_hook)")
        policy = g.mp_policy
        dtypes = {p.dtype for p in (fp.sharded_param for fp in g.fsdp_params) if p.requires_grad}
        for dt in dtypes:
            reduce_dtype = policy.reduce_dtype or policy.param_dtype or dt
            if reduce_dtype not in REDUCE_DTYPES:
                raise ValueError(
                    f"gradcomp.comm.fsdp: reduce dtype {reduce_dtype}; the compressed reduce-scatter takes float32 or "
                    "bfloat16 (MixedPrecisionPolicy(reduce_dtype=torch.float32 or torch.bfloat16)): FSDP "
                    "pre-divides float16 inputs against overflow, so the codecs would fit scaled values")
        if g.force_sum_reduction_for_comms and replicate_group is not None:
            raise ValueError(
                "gradcomp.comm.fsdp: set_force_sum_reduction_for_comms with replicate_group: FSDP then divides only "
                "by the shard size after the hook, so the replica all-reduce would have to sum, not average")
        if g._reduce_scatter_comm.__class__.__name__ not in ("DefaultReduceScatter", "ProcessGroupAllocReduceScatter"):
            raise ValueError(f"gradcomp.comm.fsdp: a module already has a custom reduce-scatter "
                             f"({type(g._reduce_scatter_comm).__name__})")
        shard_groups.add(g._reduce_scatter_process_group)
    if len(shard_groups) != 1:
        raise ValueError("gradcomp.comm.fsdp: the model's FSDP modules shard over different process groups; "
                         "one state serves one shard group (register each part separately)")
    options.setdefault("process_group", next(iter(shard_groups)))
    state = FSDPCompressionState(codec, **options)
    state.bind()
    for unit, (m, g) in enumerate(groups):
        layout = tuple((i, fp.padded_sharded_param_size.numel()) for i, fp in enumerate(g.fsdp_params))
        m.set_custom_reduce_scatter(CompressedReduceScatter(state, unit, layout))
        if state.replicate_group is not None:
            m.set_all_reduce_hook(functools.partial(state._replica_all_reduce, unit))
    return state
