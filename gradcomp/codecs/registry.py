"""The payload registry: which function decodes which layout, and :func:`decode_payload`.

Every payload names its layout in its header's tag (:class:`~gradcomp.codecs.base.CodecTag`);
:data:`DECODERS` maps each tag to the function that writes a payload of that layout into a
float32 output (``decode_*_into(payload, header, numel, out)``), so any rank decodes any payload
without knowing the codec that made it.
"""

from __future__ import annotations

import torch

from gradcomp.codecs.base import CodecTag, Header, decode_with, nan_fill_if, read_header
from gradcomp.codecs.dense import decode_fp_into, decode_half_into, decode_identity_into
from gradcomp.codecs.segments import split_segments
from gradcomp.codecs.sparse import decode_prune_into, decode_topk_into


def decode_segments_into(payload: torch.Tensor, header: Header, numel: int, out: torch.Tensor) -> None:
    """SEGMENTS: each segment decodes as its own payload into its slice (no nested SEGMENTS)."""
    offset = 0
    for n, sub in split_segments(payload, header, numel):
        sub_header = read_header(sub)
        if sub_header.tag == CodecTag.SEGMENTS:
            raise ValueError("corrupt SEGMENTS payload: a segment is itself a SEGMENTS payload")
        DECODERS[sub_header.tag](sub, sub_header, n, out[offset:offset + n])
        nan_fill_if(sub_header.nonfinite, out[offset:offset + n])
        offset += n


DECODERS = {
    CodecTag.IDENTITY: decode_identity_into,
    CodecTag.HALF: decode_half_into,
    CodecTag.FP: decode_fp_into,
    CodecTag.PRUNE: decode_prune_into,
    CodecTag.PRUNE_FP: decode_prune_into,
    CodecTag.TOPK: decode_topk_into,
    CodecTag.SEGMENTS: decode_segments_into,
}


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
    return decode_with(DECODERS[header.tag], payload, header, numel, out)

