"""Codecs: stateless compressors of gradient shards into self-describing byte payloads.

Every payload starts with the header of :mod:`gradcomp.codecs.base`, so
:func:`decode_payload` decodes any of them. Each codec declares its exact wire size
(``wire_bytes``) or, for data-dependent sizes, reports it through the payload's length.
"""

from __future__ import annotations

import torch

from .base import HEADER_BYTES, Codec, CodecTag, Header, nan_fill_if, prepare_out, read_header
from .dense import (FPCodec, FPPlan, HalfCodec, IdentityCodec, _decode_fp, _decode_half,
                    _decode_identity)
from ..error_model import fp_nmse, prune_fp_nmse, pruning_nmse
from .budget import BudgetCodec, BudgetPlan
from .sparse import PruneCodec, PruneFPCodec, PrunePlan, TopKCodec, _decode_prune, _decode_topk
from .segments import join_segments, split_segments

_DECODERS = {
    CodecTag.IDENTITY: _decode_identity,
    CodecTag.HALF: _decode_half,
    CodecTag.FP: _decode_fp,
    CodecTag.PRUNE: _decode_prune,
    CodecTag.PRUNE_FP: _decode_prune,
    CodecTag.TOPK: _decode_topk,
}


def _decode_segments(payload: torch.Tensor, header: Header, numel: int, out: torch.Tensor) -> None:
    """SEGMENTS: each segment decodes as its own payload into its slice (no nested SEGMENTS)."""
    offset = 0
    for n, sub in split_segments(payload, header, numel):
        sub_header = read_header(sub)
        if sub_header.tag == CodecTag.SEGMENTS:
            raise ValueError("corrupt SEGMENTS payload: a segment is itself a SEGMENTS payload")
        _DECODERS[sub_header.tag](sub, sub_header, n, out[offset:offset + n])
        nan_fill_if(sub_header.nonfinite, out[offset:offset + n])
        offset += n


_DECODERS[CodecTag.SEGMENTS] = _decode_segments


def decode_payload(payload: torch.Tensor, numel: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode any codec's payload of ``numel`` elements into float32 (into ``out`` if given).

    A payload whose header carries the non-finite flag decodes to all-NaN, so a non-finite
    value on any rank makes the reduced result non-finite on every rank.

    Validation: a malformed payload -- not a 1-D uint8 tensor, shorter than the header, an
    unknown tag or an impossible format in the header, shorter than the layout its header,
    count fields and ``numel`` imply, impossible counts, or a corrupt position stream -- raises
    ``ValueError``, with the same message whether the native kernels are used or not (the
    lengths and counts are checked in Python before any kernel runs). Bytes beyond the layout
    are ignored (a payload may be a prefix of a larger buffer); see each layout's size in
    :mod:`gradcomp.codecs.dense` and :mod:`gradcomp.codecs.sparse`.
    """
    header = read_header(payload)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    result = prepare_out(numel, out, payload.device)
    _DECODERS[header.tag](payload, header, numel, result)
    return nan_fill_if(header.nonfinite, result)


__all__ = [
    "BudgetCodec", "BudgetPlan", "fp_nmse", "prune_fp_nmse", "pruning_nmse",
    "Codec", "CodecTag", "FPCodec", "FPPlan", "HEADER_BYTES", "HalfCodec", "Header",
    "IdentityCodec", "decode_payload", "read_header",
    "PruneCodec", "PruneFPCodec", "PrunePlan", "TopKCodec", "join_segments", "split_segments",
]
