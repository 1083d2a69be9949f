"""Compressed all-reduce over torch.distributed: two-phase, all-gather, and plain all-reduce.

Cost model, bytes one rank puts on the wire for a bucket of ``S`` bytes of fp32 (``N`` ranks,
compressed size ``S_c``):

* ``allreduce`` (summable payloads: fp32, fp16): ring all-reduce, ``2 (N-1)/N * S``.
* ``allgather``: every rank sends its whole payload to the other ``N-1``: ``(N-1) * S_c``.
  One round, and no second quantization (every rank sums the N decoded payloads).
* ``two_phase``: the bucket is split in ``N`` shards; ``all_to_all`` sends shard ``j`` to rank
  ``j`` (``(N-1)/N * S_c``), rank ``j`` decodes the N copies of its shard, sums them in fp32 in
  rank order, re-encodes the mean with ``codec.reduce_codec()`` and sends it to everyone
  (``(N-1)/N * S_c``): ``2 (N-1)/N * S_c`` in all, the ring optimum for the compressed size.

``choose_collective("auto", ...)`` picks ``allreduce`` for summable codecs, ``allgather`` for
``N <= 2`` (same bytes as two-phase at N = 2, one round fewer, no reduce-side error) and
``two_phase`` otherwise. The choice is static on purpose: for sparse codecs the reduced mean
is denser than each rank's share (the union of N supports), so a two-phase payload ``R`` can
approach ``S_c`` and an all-gather looks cheaper on paper. Deciding per bucket from measured
sizes was tried and rejected: an all-gather payload encodes the whole bucket under one fit and
is not the sum of the two-phase shards' payloads, and with plans reused between refits it
spiked (one rank sent 1.2 MB for a 1M-element bucket); on the benchmark it sent up to 3x the
two-phase bytes. Two-phase sends ``(N-1)/N`` of a spike instead of ``N-1`` times it.

Messages: every collective call here is one round in which a rank sends one message to each of
the ``N-1`` others (an exchange of sizes is a round of its own). ``ReduceStats.messages``
counts them, nominally: a backend may add rounds of its own (Horovod's ``alltoall`` exchanges
its splits internally). On a real link each message costs a few hundred bytes of framing
(TCP/IP headers, acknowledgements, the backend's own header) on top of its payload, which is
what a wire-level cost model adds (``benchmarks/bandwidth_accuracy.py`` measures it).

Variable-size payloads (pruning) are exchanged without padding: the sizes go first (one small
``all_to_all`` of int64), then ``all_to_all_single`` with uneven splits (gloo's ``all_gather``
needs equal sizes; an all-gather is an all_to_all whose chunks are all the same payload).

Every rank decodes the same bytes in the same order, so all ranks end with bit-identical
results.

Transports: the algorithms move bytes only through a :class:`Transport` (an uneven all-to-all,
an all-gather of per-rank payloads, an in-place sum all-reduce). The ``group`` argument of the
functions below is either a ``torch.distributed`` process group (or ``None`` for the default
group: :class:`TorchTransport`, the DDP hook's path) or a :class:`Transport` instance, such as
:class:`gradcomp.comm.horovod.HorovodTransport`, so the same payloads cross Horovod's
``alltoall``/``allgather`` without a second copy of the algorithms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gradcomp.codecs import HEADER_BYTES, Codec, CodecTag, HalfCodec, decode_payload, read_header
from gradcomp.codecs.base import FLAG_NONFINITE
from gradcomp.codecs.segments import split_segments
from gradcomp.codecs.sparse import sum_prune_payloads
from gradcomp.numerics import kernels
from gradcomp.numerics.packing import packed_size
from gradcomp.numerics.quant import decode_table

COLLECTIVES = ("auto", "two_phase", "allgather", "allreduce")


def choose_collective(collective: str, codec: Codec, world_size: int) -> str:
    """Resolve ``collective`` ("auto" or a forced choice) for ``codec`` at ``world_size``."""
    if collective not in COLLECTIVES:
        raise ValueError(f"collective must be one of {COLLECTIVES}, got {collective!r}")
    if collective == "allreduce" and not codec.summable:
        raise ValueError(
            f"collective='allreduce' needs a summable payload, but {type(codec).__name__} sends "
            "packed codes, which no all_reduce can add; use 'two_phase' or 'allgather'"
        )
    if collective != "auto":
        return collective
    if codec.summable:
        return "allreduce"
    return "allgather" if world_size <= 2 else "two_phase"


def expected_bytes_sent(collective: str, world_size: int, dense_bytes: int, payload_bytes: int) -> float:
    """Cost-model bytes one rank sends for one bucket (see the module docstring).

    ``collective`` may also be ``"reduce_scatter"`` (phase 1 alone, as FSDP's reduce-scatter:
    ``(N-1)/N * payload_bytes``).
    """
    n = world_size
    if n <= 1:
        return 0.0
    if collective == "allreduce":
        return 2 * (n - 1) / n * dense_bytes
    if collective == "allgather":
        return (n - 1) * payload_bytes
    if collective == "reduce_scatter":  # one phase: each rank keeps 1/N of its payload
        return (n - 1) / n * payload_bytes
    return 2 * (n - 1) / n * payload_bytes


def expected_messages(collective: str, world_size: int, sizes_exchanged: int = 0) -> int:
    """Nominal messages one rank sends for one bucket: ``N-1`` per round (see the module docstring).

    Rounds: ``allreduce`` 2 (a ring's reduce-scatter and all-gather, counted as one round each),
    ``allgather`` 1, ``two_phase`` 2, plus ``sizes_exchanged`` rounds that exchange the sizes of
    variable-size payloads (0, 1 or 2).
    """
    n = world_size
    if n <= 1:
        return 0
    rounds = {"allreduce": 2, "allgather": 1, "two_phase": 2, "reduce_scatter": 1}[collective]
    return (n - 1) * (rounds + sizes_exchanged)


def shard_bounds(numel: int, world_size: int) -> list[tuple[int, int]]:
    """Split ``numel`` into ``world_size`` contiguous shards; the first ``numel % N`` get one more."""
    base, extra = divmod(numel, world_size)
    bounds, start = [], 0
    for j in range(world_size):
        size = base + (1 if j < extra else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


@dataclass
class ExchangeResult:
    received: list[torch.Tensor]
    bytes_sent: int
    messages: int = 0  # nominal messages this rank sent: N-1 per round, size exchange included


class Transport:
    """The three operations the compressed collectives need from a communication backend.

    ``rank`` and ``world_size`` describe this process in the group. Every method is blocking
    and must be called by every rank of the group in the same order (the algorithms do).
    Subclasses implement :meth:`all_to_all` and :meth:`all_reduce_sum_`; :meth:`all_gather`
    defaults to an all-to-all whose chunks are all the same payload, and
    :meth:`all_gather_object` (small text: settings checks) to an all-gather of its UTF-8 bytes.
    A :class:`gradcomp.comm.hook.CompressionState` runs on any subclass (``transport=``).
    """

    rank: int = 0
    world_size: int = 1

    def all_to_all(self, chunks: list[torch.Tensor], recv_sizes: list[int] | None = None) -> ExchangeResult:
        """Send ``chunks[j]`` (1-D uint8) to rank ``j``; return what each rank sent here, in rank order.

        ``recv_sizes``, when given, are the sizes this rank will receive (known locally for
        fixed-size codecs), which lets a transport skip its size exchange.
        """
        raise NotImplementedError

    def all_gather(self, payload: torch.Tensor, recv_sizes: list[int] | None = None) -> ExchangeResult:
        """Send ``payload`` (1-D uint8) to every rank; return every rank's payload, in rank order."""
        return self.all_to_all([payload] * self.world_size, recv_sizes)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` by its elementwise sum over ranks (fp32 or fp16)."""
        raise NotImplementedError

    def all_gather_object(self, text: str) -> list[str]:
        """Every rank's ``text``, in rank order (small metadata such as a settings check).

        Default: :meth:`all_gather` of the UTF-8 bytes (sizes exchanged first).
        """
        data = torch.tensor(list(text.encode()), dtype=torch.uint8)
        return [bytes(t.tolist()).decode() for t in self.all_gather(data).received]


class TorchTransport(Transport):
    """:class:`Transport` over a ``torch.distributed`` process group (``None``: the default group).

    Variable sizes go first (one small ``all_to_all_single`` of int64), then one
    ``all_to_all_single`` with uneven splits; gloo's ``all_gather`` needs equal sizes, so an
    all-gather is an all-to-all of the same payload.
    """

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

    def all_to_all(self, chunks: list[torch.Tensor], recv_sizes: list[int] | None = None) -> ExchangeResult:
        group, rank, n = self.group, self.rank, self.world_size
        device = chunks[0].device
        send_sizes = [int(c.numel()) for c in chunks]
        rounds = 1
        if recv_sizes is None:
            rounds = 2
            sizes_in = torch.tensor(send_sizes, dtype=torch.int64, device=device)
            sizes_out = torch.empty(n, dtype=torch.int64, device=device)
            dist.all_to_all_single(sizes_out, sizes_in, group=group)
            recv_sizes = sizes_out.tolist()
        send = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8, device=device)
        recv = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
        dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes,
                               input_split_sizes=send_sizes, group=group)
        received = list(torch.split(recv, recv_sizes))
        return ExchangeResult(received, sum(s for j, s in enumerate(send_sizes) if j != rank),
                              rounds * (n - 1))

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, group=self.group)

    def all_gather_object(self, text: str) -> list[str]:
        """Every rank's ``text``, in rank order: ``dist.all_gather_object`` on the group."""
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, text, group=self.group)
        return everyone


def as_transport(group) -> Transport:
    """Return ``group`` if it is a :class:`Transport`, else a :class:`TorchTransport` over it."""
    return group if isinstance(group, Transport) else TorchTransport(group)


def exchange(chunks: list[torch.Tensor], group, recv_sizes: list[int] | None = None) -> ExchangeResult:
    """Send ``chunks[j]`` (1-D uint8) to rank ``j``; return what each rank sent here, in rank order.

    ``group``: a process group, ``None`` or a :class:`Transport`. ``recv_sizes`` may be given
    when the sizes are known locally (fixed-size codecs); otherwise they are exchanged first.
    Blocking; call from the state's worker thread.
    """
    return as_transport(group).all_to_all(chunks, recv_sizes)


@dataclass
class ReduceStats:
    """What one compressed all-reduce of one bucket did on this rank."""

    bytes_sent: int = 0
    payload_bytes: int = 0  # bytes of this rank's phase-1 payloads (all shards, headers included)
    reduce_payload_bytes: int = 0  # bytes of the re-encoded reduced shard (two-phase only)
    shard_payload_bytes: tuple = ()  # phase-1 payload size per shard (two-phase)
    messages: int = 0  # nominal messages sent (N-1 per round; see the module docstring)
    # The result carries a non-finite value: some rank's input held inf or NaN (its payload's
    # header flag), so the decoded mean is NaN there. The same on every rank (the same bytes).
    nonfinite: bool = False


def _any_flagged(payloads: list[torch.Tensor]) -> bool:
    """Whether any payload's header carries the non-finite flag (one small gather, one read:
    the decoders below parse the full headers themselves)."""
    flags = [p[1:2] for p in payloads if p.numel() >= HEADER_BYTES]
    return bool(flags) and bool((torch.cat(flags) & FLAG_NONFINITE).any())


def _sum_in_rank_order(payloads: list[torch.Tensor], numel: int, out: torch.Tensor) -> torch.Tensor:
    """Decode ``payloads`` and sum them into ``out`` in fp32, in rank order (the same bits on
    every rank); the first decodes straight into ``out``, so no accumulator is zeroed or copied."""
    if not payloads:
        return out.zero_()
    decode_payload(payloads[0], numel, out=out)
    if len(payloads) > 1:
        tmp = torch.empty_like(out)
        for p in payloads[1:]:
            out.add_(decode_payload(p, numel, out=tmp))
    return out


def decode_mean(payloads: list[torch.Tensor], numel: int, out: torch.Tensor, divisor: int) -> torch.Tensor:
    """Write ``(decode(p_0) + ... + decode(p_last)) / divisor`` into ``out``, in fp32, in rank order.

    Dense FP payloads take the fused native kernel (one pass over ``out`` instead of one decode
    per payload, an add per payload and a divide; the same operations in the same order, so the
    same bits: ``tests/unit/test_codec_kernels.py``); pruned payloads are added at their nonzero
    positions only (:func:`gradcomp.codecs.sparse.sum_prune_payloads`, the same bits too);
    anything else decodes payload by payload.
    """
    if not payloads or not numel:
        return _sum_in_rank_order(payloads, numel, out).div_(divisor)
    headers = [read_header(p) for p in payloads]
    if all(h.tag == CodecTag.SEGMENTS for h in headers):
        parts = [split_segments(p, h, numel) for p, h in zip(payloads, headers)]
        sizes = [n for n, _ in parts[0]]
        if all([n for n, _ in q] == sizes for q in parts[1:]):
            # Same segmentation on every rank (the hook's): reduce segment by segment, so each
            # keeps its fast path; the same sums in the same order as payload by payload.
            offset = 0
            for s, n in enumerate(sizes):
                subs = [q[s][1] for q in parts]
                sub_headers = [read_header(p) for p in subs]
                if any(h.tag == CodecTag.SEGMENTS for h in sub_headers):
                    raise ValueError("corrupt SEGMENTS payload: a segment is itself a SEGMENTS payload")
                _decode_mean_read(subs, sub_headers, n, out[offset:offset + n], divisor)
                offset += n
            if any(h.nonfinite for h in headers):
                out.fill_(float("nan"))
            return out
    return _decode_mean_read(payloads, headers, numel, out, divisor)


def _decode_mean_read(payloads: list[torch.Tensor], headers: list, numel: int, out: torch.Tensor,
                      divisor: int) -> torch.Tensor:
    """:func:`decode_mean` of payloads whose headers are already read (each read once: a host
    sync per header on a GPU)."""
    if numel:
        fmts = [h.fmt for h in headers if h.tag == CodecTag.FP and h.fmt is not None and not h.nonfinite]
        if len(fmts) == len(headers):
            sizes = [packed_size(numel, f.bits) for f in fmts]
            if all(p.numel() >= HEADER_BYTES + s for p, s in zip(payloads, sizes)):
                packed = [p[HEADER_BYTES:HEADER_BYTES + s] for p, s in zip(payloads, sizes)]
                tables = [decode_table(f, p.device, h.scale_exp) for f, h, p in zip(fmts, headers, payloads)]
                if kernels.decode_mean(packed, tables, [f.bits for f in fmts], divisor, out):
                    return out
        elif sum_prune_payloads(payloads, headers, numel, out):
            return out.div_(divisor)
    return _sum_in_rank_order(payloads, numel, out).div_(divisor)


Encoder = Callable[[int, int, int], torch.Tensor]  # (shard j, start, stop) -> payload of x[start:stop]
FixedSize = Callable[[int, int], int]  # (start, stop) -> payload bytes of x[start:stop]


def allreduce_mean(buffer: torch.Tensor, codec: Codec, group) -> ReduceStats:
    """Average ``buffer`` in place with a plain all-reduce (fp32, or fp16 for a HalfCodec)."""
    transport = as_transport(group)
    n = transport.world_size
    if isinstance(codec, HalfCodec):
        half = buffer.to(torch.float16).div_(n)  # divide first: the fp16 sum must not overflow
        transport.all_reduce_sum_(half)
        buffer.copy_(half)
        payload = 2 * buffer.numel()
    else:
        transport.all_reduce_sum_(buffer)
        buffer.div_(n)
        payload = 4 * buffer.numel()
    return ReduceStats(bytes_sent=round(2 * (n - 1) / n * payload), payload_bytes=payload,
                       messages=expected_messages("allreduce", n))


def allgather_mean(numel: int, out: torch.Tensor, encode: Encoder, group,
                   fixed_size: FixedSize | None) -> ReduceStats:
    """Write the mean over ranks into ``out``: all-gather every rank's payload of the whole bucket.

    ``encode(0, 0, numel)`` encodes this rank's bucket; every rank decodes the N payloads and
    sums them in fp32 in rank order. ``fixed_size(0, numel)`` is the payload size of a
    fixed-size codec (no size exchange), else ``fixed_size`` is ``None``.
    """
    transport = as_transport(group)
    n = transport.world_size
    payload = encode(0, 0, numel)
    res = transport.all_gather(payload, [fixed_size(0, numel)] * n if fixed_size is not None else None)
    decode_mean(res.received, numel, out, n)  # the payload is encoded: out is free
    return ReduceStats(bytes_sent=res.bytes_sent, payload_bytes=payload.numel(), messages=res.messages,
                       nonfinite=_any_flagged(res.received))


def two_phase_mean(
    numel: int,
    out: torch.Tensor,
    encode: Encoder,
    reduce_encode: Callable[[torch.Tensor], torch.Tensor],
    group,
    fixed_size: FixedSize | None,
    reduce_fixed_size: FixedSize | None,
) -> ReduceStats:
    """Write the mean over ranks into ``out`` with the two-phase compressed all-reduce.

    ``encode(j, start, stop)`` encodes this rank's shard ``j`` for phase 1; ``reduce_encode(mean)``
    re-encodes the mean of this rank's own shard for phase 2. ``fixed_size(start, stop)`` and
    ``reduce_fixed_size(start, stop)`` give the payload sizes of the shard ``[start, stop)`` for
    fixed-size codecs (which skips a size exchange), else they are ``None``. ``out`` may be the
    tensor ``encode`` reads: every shard is encoded before anything is written.
    """
    transport = as_transport(group)
    rank, n = transport.rank, transport.world_size
    bounds = shard_bounds(numel, n)
    own_numel = bounds[rank][1] - bounds[rank][0]
    mean = torch.empty(own_numel, dtype=torch.float32, device=out.device)
    rs1 = reduce_scatter_mean(bounds, mean, encode, transport, fixed_size, n)
    reduced = reduce_encode(mean)

    recv2 = [reduce_fixed_size(a, b) for a, b in bounds] if reduce_fixed_size is not None else None
    res2 = transport.all_gather(reduced, recv2)
    for (a, b), p in zip(bounds, res2.received):
        decode_payload(p, b - a, out=out[a:b])
    return ReduceStats(bytes_sent=rs1.bytes_sent + res2.bytes_sent,
                       payload_bytes=rs1.payload_bytes,
                       reduce_payload_bytes=reduced.numel(),
                       shard_payload_bytes=rs1.shard_payload_bytes,
                       messages=rs1.messages + res2.messages,
                       nonfinite=_any_flagged(res2.received))


def reduce_scatter_mean(
    bounds: list[tuple[int, int]],
    out: torch.Tensor,
    encode: Encoder,
    group,
    fixed_size: FixedSize | None,
    divisor: int,
) -> ReduceStats:
    """Compressed reduce-scatter (phase 1 of :func:`two_phase_mean`): this rank's shard of the sum.

    ``bounds[j]`` is shard ``j``'s ``(start, stop)``; ``encode(j, start, stop)`` encodes this
    rank's shard ``j``, which goes to rank ``j`` (one ``all_to_all``); ``fixed_size(start, stop)``
    is a fixed-size codec's payload size (no size exchange), else ``fixed_size`` is ``None``. ``out`` (fp32, the size of
    this rank's shard) receives ``(decode(p_0) + ... + decode(p_last)) / divisor``, summed in fp32
    in rank order (:func:`decode_mean`). Bytes on the wire: the ``N-1`` shards sent to the other
    ranks, ``(N-1)/N`` of the payload for equal shards (``expected_bytes_sent("reduce_scatter",
    ...)``). ``nonfinite`` reports a flagged payload among those *this rank* received (its shard
    only: other ranks may see finite shards).
    """
    transport = as_transport(group)
    rank, n = transport.rank, transport.world_size
    payloads = [encode(j, a, b) for j, (a, b) in enumerate(bounds)]
    own_numel = bounds[rank][1] - bounds[rank][0]
    recv = [fixed_size(*bounds[rank])] * n if fixed_size is not None else None
    res = transport.all_to_all(payloads, recv)
    decode_mean(res.received, own_numel, out, divisor)
    return ReduceStats(bytes_sent=res.bytes_sent, payload_bytes=sum(p.numel() for p in payloads),
                       shard_payload_bytes=tuple(p.numel() for p in payloads), messages=res.messages,
                       nonfinite=_any_flagged(res.received))
