"""Codecs: stateless compressors of gradient shards into self-describing byte payloads.

Every payload starts with the header of :mod:`gradcomp.codecs.base`, so
:func:`decode_payload` (:mod:`gradcomp.codecs.registry`) decodes any of them. Each codec
declares its exact wire size (``wire_bytes``) or, for data-dependent sizes, its expectation
(``expected_wire_bytes``) and reports the real one through the payload's length.
"""

from __future__ import annotations

from gradcomp.codecs.base import HEADER_BYTES, Codec, CodecTag, Header, read_header
from gradcomp.codecs.budget import BudgetCodec, BudgetPlan
from gradcomp.codecs.dense import FPCodec, FPPlan, HalfCodec, IdentityCodec
from gradcomp.codecs.registry import decode_payload
from gradcomp.codecs.segments import join_segments, split_segments
from gradcomp.codecs.sparse import PruneCodec, PruneFPCodec, PrunePlan, TopKCodec
from gradcomp.numerics.error_model import fp_nmse, prune_fp_nmse, pruning_nmse

__all__ = [
    "BudgetCodec", "BudgetPlan", "fp_nmse", "prune_fp_nmse", "pruning_nmse",
    "Codec", "CodecTag", "FPCodec", "FPPlan", "HEADER_BYTES", "HalfCodec", "Header",
    "IdentityCodec", "decode_payload", "read_header",
    "PruneCodec", "PruneFPCodec", "PrunePlan", "TopKCodec", "join_segments", "split_segments",
]
