"""SEGMENTS payloads: one shard coded as consecutive segments, each with a plan of its own.

A DDP bucket carries tensors whose gradient scales differ by orders of magnitude; one plan per
shard would set the scale (or pruning threshold) by the largest tensor and drown a small-scale
tensor in the subnormals (or below the threshold): unbiased, but with an error many times its own
norm. A SEGMENTS payload carries one ordinary payload per segment (a tensor's part of the shard),
each encoded with its own plan.

Layout (little-endian)::

    header       8 bytes: tag SEGMENTS; flags bit 0 = any segment's payload is flagged
                 non-finite (then the whole shard decodes to NaN, as for any payload); no format
    count        uint32 S (>= 1)
    table        S x (uint32 numel_s, uint32 bytes_s), sum(numel_s) == numel
    payloads     S payloads of any codec except SEGMENTS, back to back, bytes_s each

Numerics: segment ``s`` decodes exactly as its own payload would, into its slice; nothing is
rounded again. The wire cost over one payload per shard is ``4 + 16 S`` bytes (table entry plus
the segment's own header), which is why the hook gives segments only to tensors, not to
smaller pieces, and merges runs of tiny tensors (see :func:`split_points`).

Example:
    >>> from gradcomp.codecs import FPCodec, decode_payload
    >>> x = torch.cat([torch.full((100,), 1e-6), torch.full((50,), 3.0)])
    >>> codec = FPCodec(6)
    >>> parts = [codec.encode(x[:100], key=1), codec.encode(x[100:], key=2)]
    >>> y = decode_payload(join_segments(parts, [100, 50]), 150)
    >>> bool(torch.allclose(y, x, rtol=0.3))
    True
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch

from gradcomp.codecs.base import FLAG_NONFINITE, HEADER_BYTES, CodecTag, Header

_COUNT = struct.Struct("<I")
_ENTRY = struct.Struct("<II")
TABLE_ENTRY_BYTES = _ENTRY.size  # 8
_U32_MAX = 2**32 - 1


def join_segments(payloads: Sequence[torch.Tensor], numels: Sequence[int]) -> torch.Tensor:
    """Return the SEGMENTS payload of ``payloads`` (one per segment, ``numels[s]`` elements each).

    The non-finite flag is the OR of the segments' flags, computed on the device (no host sync).
    """
    if not payloads or len(payloads) != len(numels):
        raise ValueError(f"join_segments: need one payload per segment, got {len(payloads)} "
                         f"payloads for {len(numels)} segments")
    device = payloads[0].device
    table = _COUNT.pack(len(payloads)) + b"".join(
        _ENTRY.pack(int(n), int(p.numel())) for n, p in zip(numels, payloads))
    flags = torch.stack([p[1] for p in payloads]).bitwise_and(FLAG_NONFINITE).amax().view(1)
    static = torch.tensor([int(CodecTag.SEGMENTS), 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8, device=device)
    fixed = torch.frombuffer(bytearray(table), dtype=torch.uint8).to(device)
    return torch.cat([static[:1], flags, static[2:], fixed, *payloads])


def segments_wire_bytes(sizes: Sequence[int]) -> int:
    """Bytes of a SEGMENTS payload around segments of ``sizes`` bytes: header, count, table."""
    return HEADER_BYTES + _COUNT.size + TABLE_ENTRY_BYTES * len(sizes) + sum(sizes)


def split_segments(payload: torch.Tensor, header: Header, numel: int) -> list[tuple[int, torch.Tensor]]:
    """``[(numel_s, payload_s), ...]`` of a SEGMENTS payload of ``numel`` elements (views).

    Validation: a count of 0 (for ``numel > 0``) or above ``numel``, a table or a segment past
    the payload's end, segment sizes that do not sum to ``numel``, or a segment shorter than a
    header raise ``ValueError``. Each segment's own layout is validated by its decoder.
    """
    del header
    start = HEADER_BYTES + _COUNT.size
    if payload.numel() < start:
        raise ValueError(f"truncated SEGMENTS payload: {payload.numel()} bytes, need at least {start}")
    (count,) = _COUNT.unpack(bytes(payload[HEADER_BYTES:start].tolist()))
    if count > max(1, numel) or (numel > 0 and count == 0):
        raise ValueError(f"corrupt SEGMENTS payload: {count} segments for {numel} elements")
    end = start + TABLE_ENTRY_BYTES * count
    if payload.numel() < end:
        raise ValueError(f"truncated SEGMENTS payload: its table of {count} segments needs {end} "
                         f"bytes, got {payload.numel()}")
    raw = bytes(payload[start:end].tolist())
    entries = [_ENTRY.unpack_from(raw, TABLE_ENTRY_BYTES * s) for s in range(count)]
    if sum(n for n, _ in entries) != numel:
        raise ValueError(f"corrupt SEGMENTS payload: segments of {[n for n, _ in entries]} "
                         f"elements do not add up to {numel}")
    out, offset = [], end
    for n, size in entries:
        if size < HEADER_BYTES or offset + size > payload.numel():
            raise ValueError(f"corrupt SEGMENTS payload: a segment of {size} bytes at byte {offset} "
                             f"does not fit the payload's {payload.numel()} bytes")
        out.append((n, payload[offset:offset + size]))
        offset += size
    return out


def split_points(numels: Sequence[int], start: int, stop: int, min_numel: int) -> list[int]:
    """Segment boundaries of the range ``[start, stop)`` of a flat buffer of tensors of ``numels``.

    Every tensor's part of the range is one segment, except that consecutive parts smaller than
    ``min_numel`` are merged into one (a segment costs 16 bytes of table and header; tiny
    tensors such as a classifier's bias are not worth that). Returns the boundaries relative to
    ``start``: ``[0, ..., stop - start]``.

    Example:
        >>> split_points([10, 2, 3, 10], 5, 25, min_numel=4)
        [0, 5, 10, 20]
    """
    points = [0]
    small = False  # the last segment is a run of parts below min_numel
    offset = 0
    for n in numels:
        a, b = max(offset, start), min(offset + n, stop)
        offset += n
        if a >= b:
            continue
        tiny = b - a < min_numel
        if tiny and small:
            points[-1] = b - start  # extend the run of tiny parts
        else:
            points.append(b - start)
        small = tiny
    if points[-1] != stop - start:  # a range past the tensors' end: one trailing segment
        points.append(stop - start)
    return points
