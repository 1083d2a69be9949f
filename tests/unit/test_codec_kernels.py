"""The native codec kernels (sparse codecs, FPCodec with its fused max, decode-mean) are bit-identical to the eager path.

Every case encodes and decodes twice, with ``GRADCOMP_KERNELS=eager`` and with the native
kernels, and compares payload bytes and decoded bits (through integer views, so -0.0 and NaN
payloads count).
"""

import math

import pytest
import torch

from gradcomp.numerics import kernels
from gradcomp.codecs import (BudgetCodec, FPCodec, PruneCodec, PruneFPCodec, TopKCodec,
                             decode_payload)
from gradcomp.codecs.sparse import _rice_decode, _rice_encode
from gradcomp.comm.collectives import decode_mean
from gradcomp.numerics.lognormal import fit

pytestmark = pytest.mark.skipif(kernels.kernel_mode() == "eager", reason="GRADCOMP_KERNELS=eager")


@pytest.fixture(scope="module", autouse=True)
def native():
    mod = kernels.native()
    if mod is None and kernels.kernel_mode() == "auto":
        pytest.skip("native kernels could not be built here (warning says why)")
    return mod


def _both(monkeypatch, fn):
    """``(eager result, native result)`` of ``fn()``."""
    with monkeypatch.context() as m:
        m.setenv("GRADCOMP_KERNELS", "eager")
        ref = fn()
    return ref, fn()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _lognormal(n: int, seed: int, sigma: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return torch.randn(n, generator=g).mul(sigma).sub(7).exp() * sign


def _with_edges(x: torch.Tensor, alpha: float) -> torch.Tensor:
    edge = torch.tensor([0.0, -0.0, alpha, -alpha, math.nextafter(alpha, 0), math.nextafter(alpha, 1),
                         2.0**-149, -(2.0**-149), 3.4e38, -3.4e38, 1e-30, alpha * 0.5, -alpha * 0.999])
    return torch.cat([edge, x, torch.zeros(1000), edge])


SPARSE_CODECS = [PruneCodec(0.85), PruneCodec(0.5), PruneFPCodec(0.85, 6), PruneFPCodec(0.95, 4),
                 PruneFPCodec(0.85, 8, rounding="nearest"), PruneFPCodec(0.3, 8)]


@pytest.mark.parametrize("codec", SPARSE_CODECS, ids=repr)
def test_sparse_payloads_and_decodes_match_eager(monkeypatch, codec):
    for seed, n in ((0, 1), (1, 100), (2, 70_003), (3, 300_001)):
        x = _lognormal(n, seed)
        plan = codec.plan(fit(x))
        x = _with_edges(x, plan.alpha)
        for key in (0, 12345, 2**62 + 7):
            ref, got = _both(monkeypatch, lambda: codec.encode(x, key=key, plan=plan))
            assert torch.equal(ref, got), (codec, n, key)
            dref, dgot = _both(monkeypatch, lambda: decode_payload(got, x.numel()))
            assert torch.equal(_bits(dref), _bits(dgot)), (codec, n, key)


def test_scale_raise_and_unplanned_encode_match_eager(monkeypatch):
    # A plan fitted to small values: the shard's large kept values force a higher scale.
    codec = PruneFPCodec(0.85, 6)
    plan = codec.plan(fit(_lognormal(10_000, 5, sigma=0.5)))
    x = _lognormal(50_000, 6, sigma=3.0)
    ref, got = _both(monkeypatch, lambda: codec.encode(x, key=3, plan=plan))
    assert torch.equal(ref, got)
    ref, got = _both(monkeypatch, lambda: codec.encode(x, key=4))
    assert torch.equal(ref, got)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_nonfinite_input_matches_eager_and_decodes_to_nan(monkeypatch, bad):
    for codec in (PruneCodec(0.85), PruneFPCodec(0.85, 6)):
        x = _lognormal(10_000, 7)
        plan = codec.plan(fit(x))
        x[1234] = bad
        ref, got = _both(monkeypatch, lambda: codec.encode(x, key=9, plan=plan))
        assert torch.equal(ref, got)
        assert bool(decode_payload(got, x.numel()).isnan().all())


def test_budget_and_topk_payloads_match_eager(monkeypatch):
    x = _lognormal(200_003, 8)
    for codec in (BudgetCodec(1.5), BudgetCodec(0.8), TopKCodec(0.01), TopKCodec(1.0)):
        ref, got = _both(monkeypatch, lambda: codec.encode(x, key=11))
        assert torch.equal(ref, got), codec
        dref, dgot = _both(monkeypatch, lambda: decode_payload(got, x.numel()))
        assert torch.equal(_bits(dref), _bits(dgot)), codec


def test_result_does_not_depend_on_thread_count():
    codec = PruneFPCodec(0.85, 6)
    x = _lognormal(1_000_003, 9)
    plan = codec.plan(fit(x))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = codec.encode(x, key=5, plan=plan)
        torch.set_num_threads(2)
        two = codec.encode(x, key=5, plan=plan)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("numel", [1, 17, 100_000, 3_000_000])
def test_rice_roundtrip_matches_eager(monkeypatch, numel):
    g = torch.Generator().manual_seed(numel)
    cases = [torch.tensor([0]), torch.tensor([numel - 1]), torch.arange(numel)]
    for p in (0.5, 0.01, 1e-5):
        m = torch.rand(numel, generator=g) < p
        cases.append(torch.nonzero(m).reshape(-1))
    # Clustered positions: whole runs kept, long runs skipped (exercises 64-bit unary scans).
    runs = torch.zeros(numel, dtype=torch.bool)
    runs[numel // 3: numel // 3 + 50] = True
    runs[-5:] = True
    cases.append(torch.nonzero(runs).reshape(-1))
    for idx in cases:
        for dtype in (torch.int64, torch.int32):
            ref, got = _both(monkeypatch, lambda: _rice_encode(idx.to(dtype), numel))
            assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(ref, got))
            rem, unary, ubits, k = got
            dref, dgot = _both(monkeypatch, lambda: _rice_decode(rem, unary, ubits, k, idx.numel(), numel))
            assert torch.equal(dref, dgot) and torch.equal(dgot, idx.to(torch.int64))


def test_corrupt_sparse_payloads_raise_the_eager_errors(monkeypatch):
    codec = PruneFPCodec(0.85, 6)
    x = _lognormal(50_000, 10)
    payload = codec.encode(x, key=1)
    header_and_fixed = 8 + 17
    cases = {
        "fewer elements than the positions need": (payload, 1000),
        "a unary stream cut short": (torch.cat([payload[:-3], torch.zeros(3, dtype=torch.uint8)]), 50_000),
        # Bit 0 of the last byte is inside the unary stream: one terminating one more or less.
        "a toggled unary bit": (torch.cat([payload[:-1], payload[-1:] ^ 1]), 50_000),
        "flipped kept flags": (payload.clone(), 50_000),
    }
    n_kept = int(payload[header_and_fixed - 9: header_and_fixed - 5].view(torch.int32))
    flags_at = header_and_fixed + (n_kept * 6 + 7) // 8
    cases["flipped kept flags"][0][flags_at] ^= 0xFF
    for what, (p, numel) in cases.items():
        errors = []
        for mode in ("eager", "auto"):
            with monkeypatch.context() as m:
                m.setenv("GRADCOMP_KERNELS", mode)
                with pytest.raises(ValueError) as info:
                    decode_payload(p, numel)
                errors.append(str(info.value))
        assert errors[0] == errors[1] and "corrupt sparse payload" in errors[0], (what, errors)


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_fused_decode_mean_matches_eager(monkeypatch, ranks):
    numel = 100_003
    payloads = []
    for r in range(ranks):
        x = _lognormal(numel, 20 + r, sigma=1.0 + r)
        codec = FPCodec(bits=(6, 8, 4, 5)[r], rounding=("stochastic", "nearest")[r % 2])
        payloads.append(codec.encode(x, key=r))
    ref, got = _both(monkeypatch, lambda: decode_mean(payloads, numel, torch.empty(numel), ranks))
    assert torch.equal(_bits(ref), _bits(got))


def test_decode_mean_with_a_flagged_or_sparse_payload_falls_back(monkeypatch):
    numel = 10_000
    x = _lognormal(numel, 30)
    bad = x.clone()
    bad[3] = math.nan
    payloads = [FPCodec(6).encode(x, key=1), FPCodec(6).encode(bad, key=2), PruneCodec(0.85).encode(x, key=3)]
    ref, got = _both(monkeypatch, lambda: decode_mean(payloads, numel, torch.empty(numel), 3))
    assert bool(got.isnan().all()) and bool(ref.isnan().all())
    mixed = [payloads[0], payloads[2]]
    ref, got = _both(monkeypatch, lambda: decode_mean(mixed, numel, torch.empty(numel), 2))
    assert torch.equal(_bits(ref), _bits(got))


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_sparse_decode_mean_matches_eager(monkeypatch, ranks):
    numel = 100_003
    codecs = [PruneFPCodec(0.85, 6), PruneCodec(0.85), PruneFPCodec(0.3, 8), BudgetCodec(1.5)]
    payloads = []
    for r in range(ranks):
        x = _lognormal(numel, 40 + r, sigma=1.0 + r)
        if r == 2:
            x[: numel // 2] = 0.0  # an empty half: positions far apart
        payloads.append(codecs[r].encode(x, key=r))
    ref, got = _both(monkeypatch, lambda: decode_mean(payloads, numel, torch.empty(numel), ranks))
    assert torch.equal(_bits(ref), _bits(got))


def test_sparse_decode_mean_with_negative_zeros_matches_eager(monkeypatch):
    # A scale fitted to large values makes small kept values round to +-0 (nearest rounding):
    # -0.0 entries, whose sum with +0.0 the scatter-add must not get wrong.
    numel = 50_000
    codec = PruneFPCodec(0.5, 4, rounding="nearest")
    payloads = []
    for r in range(2):
        x = _lognormal(numel, 50 + r, sigma=4.0)
        plan = codec.plan(fit(x * 1e6))
        payloads.append(codec.encode(x, key=r, plan=plan))
    decoded = decode_payload(payloads[0], numel)
    assert bool(((decoded == 0) & torch.signbit(decoded)).any())  # the case is exercised
    ref, got = _both(monkeypatch, lambda: decode_mean(payloads, numel, torch.empty(numel), 2))
    assert torch.equal(_bits(ref), _bits(got))


@pytest.mark.parametrize("codec", [FPCodec(6), FPCodec(8, rounding="nearest"), FPCodec(4, exp_bits=2)],
                         ids=repr)
def test_fp_codec_payloads_match_eager(monkeypatch, codec):
    x = _with_edges(_lognormal(100_003, 60), 1e-3)
    small = _lognormal(10_000, 61, sigma=0.5) * 1e-6
    for plan in (codec.plan(fit(x)), codec.plan(fit(small)), None):  # fitted, must raise, unplanned
        for key in (0, 99):
            ref, got = _both(monkeypatch, lambda: codec.encode(x, key=key, plan=plan))
            assert torch.equal(ref, got), (plan, key)
    raised = codec.encode(x, key=1, plan=codec.plan(fit(small)))
    assert raised[4:6].view(torch.int16).item() > codec.plan(fit(small)).scale_exp  # scale was raised
    for bad in (math.inf, math.nan):
        y = x.clone()
        y[77] = bad
        ref, got = _both(monkeypatch, lambda: codec.encode(y, key=3, plan=codec.plan(fit(x))))
        assert torch.equal(ref, got) and got[1].item() == 1  # the non-finite flag
