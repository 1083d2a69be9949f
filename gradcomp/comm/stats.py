"""Wire statistics of a compressing collective: cumulative counters and per-bucket figures.

A :class:`WireStats` holds what one rank's compressed collectives did so far: bytes handed to
collectives for other ranks (``bytes_sent``), what a dense fp32 reduction would have sent
(``dense_bytes``), the bytes and elements of the compressed payloads (for bits per element),
nominal messages (``N-1`` per round), steps with a non-finite result, and per bucket (or FSDP
unit) the figures of its last reduction (``entries``). The DDP hook's and Horovod's
:class:`~gradcomp.comm.hook.CompressionState` and the FSDP2 state keep one each; the owner
serialises access (a ``WireStats`` takes no lock of its own).

Units: bytes; ``bits_per_element`` is payload bits per gradient element, headers included.
The counters are checkpointed by :meth:`WireStats.state_dict` (numbers only, in the order the
owner named them) and restored by :meth:`WireStats.load_state_dict`; ``entries`` are not saved.

Example:
    >>> from gradcomp.comm.collectives import ReduceStats
    >>> stats = WireStats()
    >>> stats.record(ReduceStats(bytes_sent=300, payload_bytes=200, messages=3), dense_bytes=3000.0, elements=400)
    >>> stats.entries[0] = {"numel": 400, "collective": "two_phase"}
    >>> stats.compression_ratio(), stats.bits_per_element()
    (10.0, 4.0)
    >>> stats.state_dict()
    {'bytes_sent': 300, 'dense_bytes': 3000.0, 'payload_bytes': 200, 'payload_elements': 400,
     'messages': 3, 'nonfinite_steps': 0}
    >>> summary = stats.summary(steps=1, drift_refits=0, world_size=4, collective="two_phase", codec="FPCodec(6)")
    >>> summary["bits_per_element"], summary["buckets"][0]["numel"]
    (4.0, 400)
"""

from __future__ import annotations

from collections.abc import Iterable

from gradcomp.comm.collectives import ReduceStats

# Every counter a WireStats may hold, with its type (float: accumulates fractional cost-model bytes).
COUNTER_TYPES: dict[str, type] = {
    "bytes_sent": int, "dense_bytes": float, "payload_bytes": int, "payload_elements": int,
    "messages": int, "nonfinite_steps": int, "replica_bytes_sent": int, "replica_dense_bytes": float,
}
# The DDP hook's counters, in its state_dict's order.
HOOK_COUNTERS = ("bytes_sent", "dense_bytes", "payload_bytes", "payload_elements", "messages", "nonfinite_steps")
# The FSDP2 state's counters (reduce-scatter and HSDP replica all-reduce), in its state_dict's order.
FSDP_COUNTERS = ("bytes_sent", "messages", "dense_bytes", "payload_bytes", "payload_elements",
                 "replica_bytes_sent", "replica_dense_bytes", "nonfinite_steps")


class WireStats:
    """Cumulative wire counters of one rank and the last figures per bucket (see the module docstring).

    Args:
        counters: the counter names to keep, in :meth:`state_dict` order (names of
            ``COUNTER_TYPES``; default: the DDP hook's, ``HOOK_COUNTERS``).

    Attributes:
        counters: name -> value (int, or float for the ``*dense_bytes`` ones), all 0 at first.
        entries: bucket (or unit) index -> dict of its last reduction's figures, filled by the owner.
    """

    def __init__(self, counters: Iterable[str] = HOOK_COUNTERS):
        names = tuple(counters)
        unknown = [n for n in names if n not in COUNTER_TYPES]
        if unknown:
            raise ValueError(f"unknown wire counters {unknown}; known: {sorted(COUNTER_TYPES)}")
        self.counters: dict[str, float] = {n: COUNTER_TYPES[n]() for n in names}
        self.entries: dict[int, dict] = {}

    # ---- updates
    def record(self, rs: ReduceStats, dense_bytes: float, elements: int | None = None) -> None:
        """Add one reduction: ``rs``'s bytes and messages, ``dense_bytes`` (what a dense reduction
        would have sent) and, for a compressed one, its payload bytes over ``elements`` gradient
        elements (``None``: not compressed, no payload counted)."""
        c = self.counters
        c["bytes_sent"] += rs.bytes_sent
        c["messages"] += rs.messages
        c["dense_bytes"] += dense_bytes
        if elements is not None:
            c["payload_bytes"] += rs.payload_bytes
            c["payload_elements"] += elements

    def record_replica(self, rs: ReduceStats, dense_bytes: float) -> None:
        """Add one HSDP replica all-reduce (its own byte counters; messages are shared)."""
        c = self.counters
        c["replica_bytes_sent"] += rs.bytes_sent
        c["replica_dense_bytes"] += dense_bytes
        c["messages"] += rs.messages

    def count_nonfinite_step(self) -> None:
        """Count a step whose result carried inf or NaN (its residuals were discarded)."""
        self.counters["nonfinite_steps"] += 1

    # ---- derived figures
    def compression_ratio(self) -> float | None:
        """``dense_bytes / bytes_sent``, or ``None`` before anything was sent."""
        c = self.counters
        return c["dense_bytes"] / c["bytes_sent"] if c["bytes_sent"] else None

    def bits_per_element(self) -> float | None:
        """Payload bits per element over compressed reductions, or ``None`` before the first."""
        c = self.counters
        return 8 * c["payload_bytes"] / c["payload_elements"] if c["payload_elements"] else None

    def entries_copy(self) -> dict[int, dict]:
        """``entries`` with every figure dict copied (safe to hand out)."""
        return {k: dict(v) for k, v in self.entries.items()}

    def summary(self, *, steps: int, drift_refits: int, world_size: int, collective: str, codec: str) -> dict:
        """The DDP hook's ``stats()`` dict (:meth:`gradcomp.comm.hook.CompressionState.stats`
        documents its keys); ``entries`` appear as ``buckets``."""
        c = self.counters
        return {
            "steps": steps,
            "bytes_sent": c["bytes_sent"],
            "messages": c["messages"],
            "nonfinite_steps": c["nonfinite_steps"],
            "drift_refits": drift_refits,
            "dense_bytes": c["dense_bytes"],
            "compression_ratio": self.compression_ratio(),
            "bits_per_element": self.bits_per_element(),
            "world_size": world_size,
            "collective": collective,
            "codec": codec,
            "buckets": self.entries_copy(),
        }

    # ---- checkpoints
    def state_dict(self) -> dict[str, float]:
        """The counters (a copy, numbers only); ``entries`` are not saved."""
        return dict(self.counters)

    def load_state_dict(self, sd: dict, required: Iterable[str] = ()) -> None:
        """Set the counters found in ``sd`` (converted to their types; unknown keys ignored).

        Counters missing from ``sd`` keep their values; a name in ``required`` that is missing
        raises ``KeyError``. Nothing changes unless every value converts.
        """
        missing = [name for name in required if name not in sd]
        if missing:
            raise KeyError(missing[0])
        new = {k: COUNTER_TYPES[k](v) for k, v in sd.items() if k in self.counters}
        self.counters.update(new)
