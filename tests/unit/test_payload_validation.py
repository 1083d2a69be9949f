"""Malformed payloads: every decoder raises ValueError, with the same message natively and eagerly.

Exhaustive truncation (every length from 0 to full - 1) of every codec's payload, too-long
payloads (trailing bytes are ignored, documented in the decoders), single-byte corruptions and a
bounded random-bytes fuzz, each in both kernel modes (``GRADCOMP_KERNELS=native`` / ``eager``),
plus the fused paths (``collectives.decode_mean``, ``sum_prune_payloads``, the kernels' own
entry points, ``gradcomp.unpack``).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from gradcomp.comm import collectives
from gradcomp.numerics import kernels, packing
from gradcomp.codecs import (HEADER_BYTES, BudgetCodec, FPCodec, HalfCodec, IdentityCodec,
                             PruneCodec, PruneFPCodec, TopKCodec, decode_payload, read_header)
from gradcomp.codecs.sparse import sum_prune_payloads
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.quant import decode_table

NUMEL = 37  # not a multiple of 8: every bit field ends in a partial byte

needs_native = pytest.mark.skipif(not kernels.warmup(), reason="native kernels unavailable")


def _data(n: int = NUMEL, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).mul(2).exp() * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x[::7] = 0.0
    return x


def _payloads() -> list[tuple[str, torch.Tensor]]:
    x = _data()
    bad = x.clone()
    bad[3] = math.inf
    out = [
        ("identity", IdentityCodec().encode(x)),
        ("half", HalfCodec().encode(x)),
        ("fp6", FPCodec(6).encode(x, key=1)),
        ("fp12", FPCodec(12).encode(x, key=1)),
        ("prune", PruneCodec(0.5).encode(x, key=2)),
        ("prune_fp", PruneFPCodec(0.5, 6).encode(x, key=3)),
        ("prune_empty", PruneCodec(0.5).encode(torch.zeros(NUMEL), key=3)),
        ("prune_flagged", PruneCodec(0.5).encode(bad, key=2)),
        ("prune_fp_flagged", PruneFPCodec(0.5, 6).encode(bad, key=2)),
        ("topk", TopKCodec(0.3).encode(x)),
        ("topk_flagged", TopKCodec(0.3).encode(bad)),
        ("budget", BudgetCodec(3.0).encode(x, key=4)),
        ("fp_flagged", FPCodec(6).encode(bad, key=1)),
    ]
    return out


PAYLOADS = _payloads()


def _outcome(fn):
    """``("ok", bytes of the float32 result)`` or ``("error", type name, message)``."""
    try:
        y = fn()
    except Exception as exc:  # noqa: BLE001 - the type is what is asserted
        return ("error", type(exc).__name__, str(exc))
    return ("ok", bytes(y.contiguous().view(torch.uint8).tolist()))


def _both_modes(monkeypatch, fn):
    results = []
    for mode in ("native", "eager"):
        monkeypatch.setenv("GRADCOMP_KERNELS", mode)
        results.append(_outcome(fn))
    monkeypatch.delenv("GRADCOMP_KERNELS")
    return results


@needs_native
@pytest.mark.parametrize("name,payload", PAYLOADS, ids=[n for n, _ in PAYLOADS])
def test_every_truncation_raises_the_same_value_error(monkeypatch, name, payload):
    for length in range(payload.numel()):
        native, eager = _both_modes(monkeypatch, lambda: decode_payload(payload[:length], NUMEL))
        assert native[:2] == ("error", "ValueError"), (name, length, native)
        assert native == eager, (name, length)


@needs_native
@pytest.mark.parametrize("name,payload", PAYLOADS, ids=[n for n, _ in PAYLOADS])
def test_trailing_bytes_are_ignored(monkeypatch, name, payload):
    ref = _both_modes(monkeypatch, lambda: decode_payload(payload, NUMEL))
    assert ref[0][0] == "ok" and ref[0] == ref[1]
    for extra in (1, 3, 8):
        longer = torch.cat([payload, torch.full((extra,), 0xA5, dtype=torch.uint8)])
        assert _both_modes(monkeypatch, lambda: decode_payload(longer, NUMEL)) == ref
        # ... and a payload at an odd offset of a larger buffer decodes the same.
        buf = torch.cat([torch.zeros(1, dtype=torch.uint8), longer])
        assert _both_modes(monkeypatch, lambda: decode_payload(buf[1:], NUMEL)) == ref


@needs_native
@pytest.mark.parametrize("name,payload", PAYLOADS, ids=[n for n, _ in PAYLOADS])
def test_decoding_more_elements_than_encoded_raises(monkeypatch, name, payload):
    native, eager = _both_modes(monkeypatch, lambda: decode_payload(payload, NUMEL + 64))
    if name.startswith(("prune", "topk")):  # sparse: positions < numel stay valid
        assert native[0] == "ok" and native == eager
    else:
        assert native[:2] == ("error", "ValueError") and native == eager


def test_truncated_identity_and_half_do_not_broadcast():
    """The failure this guards against: header + one value decoded as that value everywhere."""
    for codec, width in ((IdentityCodec(), 4), (HalfCodec(), 2)):
        p = codec.encode(_data())
        with pytest.raises(ValueError, match=r"truncated (IDENTITY|HALF) payload"):
            decode_payload(p[:HEADER_BYTES + width], NUMEL)


@needs_native
def test_single_byte_corruptions_agree(monkeypatch):
    """Every byte of every payload replaced by a few values: ValueError or a successful decode,
    the same (bytes or message) natively and eagerly."""
    rng = random.Random(0)
    cases = 0
    for name, payload in PAYLOADS:
        for i in range(payload.numel()):
            for v in {0, 255, payload[i].item() ^ 1, rng.randrange(256)}:
                p = payload.clone()
                p[i] = v
                native, eager = _both_modes(monkeypatch, lambda: decode_payload(p, NUMEL))
                assert native[0] == "ok" or native[1] == "ValueError", (name, i, v, native)
                assert native == eager, (name, i, v)
                cases += 1
    assert cases > 3000


@needs_native
def test_random_bytes_fuzz(monkeypatch):
    """Bounded random payloads: a valid tag and header, random fields and lengths."""
    rng = random.Random(1)
    for _ in range(1500):
        numel = rng.choice([0, 1, 7, 37, 100])
        length = rng.choice([0, 3, 8, 9, 17, 25, 26, 40, 80, 200, rng.randrange(400)])
        p = torch.tensor([rng.randrange(256) for _ in range(length)], dtype=torch.uint8)
        if length >= HEADER_BYTES:
            p[0] = rng.randrange(1, 8)  # mostly valid tags (7: unknown)
            p[1] = rng.choice([0, 0, 1, 2])
            p[2] = rng.choice([0, 1, 2, 3, 4, 5, 8, rng.randrange(256)])
            p[3] = rng.choice([0, 1, 2, 3, 5, 10, rng.randrange(256)])
            if rng.random() < 0.7:
                p[5] = rng.choice([0, 255])  # small scale exponents mostly
            if rng.random() < 0.8 and length >= 25:
                # sparse count fields small enough to be plausible
                for off in range(8, min(length, 25)):
                    if rng.random() < 0.6:
                        p[off] = rng.choice([0, 1, 2, 5, 37])
        native, eager = _both_modes(monkeypatch, lambda: decode_payload(p, numel))
        assert native[0] == "ok" or native[1] == "ValueError", (p.tolist(), numel, native)
        assert native == eager, (p.tolist(), numel)


# ---- the fused paths


@needs_native
@pytest.mark.parametrize("codec", [FPCodec(6), PruneFPCodec(0.5, 6), PruneCodec(0.5)], ids=repr)
def test_collectives_decode_mean_truncated(monkeypatch, codec):
    """The fused mean (native decode_mean for FP, sum_prune_payloads for pruning)."""
    x = _data()
    ps = [codec.encode(x, key=k) for k in range(3)]
    ok = _both_modes(monkeypatch, lambda: collectives.decode_mean(ps, NUMEL, torch.empty(NUMEL), 3))
    assert ok[0][0] == "ok" and ok[0] == ok[1]
    for length in range(ps[1].numel()):
        bad = [ps[0], ps[1][:length], ps[2]]
        native, eager = _both_modes(
            monkeypatch, lambda: collectives.decode_mean(bad, NUMEL, torch.empty(NUMEL), 3))
        assert native[:2] == ("error", "ValueError") and native == eager, length


@needs_native
def test_sum_prune_payloads_truncated(monkeypatch):
    monkeypatch.setenv("GRADCOMP_KERNELS", "native")
    x = _data()
    ps = [PruneFPCodec(0.5, 6).encode(x, key=k) for k in range(2)]
    headers = [read_header(p) for p in ps]
    assert sum_prune_payloads(ps, headers, NUMEL, torch.empty(NUMEL))
    for length in range(HEADER_BYTES, ps[1].numel()):
        with pytest.raises(ValueError, match="truncated PRUNE_FP payload"):
            sum_prune_payloads([ps[0], ps[1][:length]], headers, NUMEL, torch.empty(NUMEL))


@needs_native
def test_kernel_entry_points_raise_value_error():
    mod = kernels.native()
    fmt = FPFormat(3, 2)
    table = decode_table(fmt)
    out = torch.empty(NUMEL)
    short = torch.zeros(packing.packed_size(NUMEL, fmt.bits) - 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="need 28 bytes, got 27"):
        kernels.unpack_decode(short, table, fmt.bits, out)
    with pytest.raises(ValueError, match="need 28 bytes, got 27"):
        kernels.decode_mean([short], [table], [fmt.bits], 1, out)
    with pytest.raises(ValueError, match="need 28 bytes, got 27"):
        packing.unpack(short, fmt.bits, NUMEL)
    # The kernels themselves (called past the Python checks) raise ValueError too.
    with pytest.raises(ValueError, match="wrong packed size"):
        mod.unpack_decode(short, table, fmt.bits, out)
    with pytest.raises(ValueError, match="wrong packed size"):
        mod.decode_mean([short], [table], [fmt.bits], 1.0, out)
    with pytest.raises(ValueError, match="wrong packed size"):
        mod.unpack_codes(short, fmt.bits, NUMEL)
    empty = torch.empty(0, dtype=torch.uint8)
    with pytest.raises(ValueError, match="shorter than their lengths"):
        mod.rice_decode(empty, empty, 9, 0, 1, NUMEL)
    with pytest.raises(ValueError, match="shorter than their lengths"):
        mod.prune_scatter(torch.empty(0), empty, empty, empty, empty, 9, 0, 1, 1.0, out, False)
