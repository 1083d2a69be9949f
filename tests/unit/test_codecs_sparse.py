import math
import struct

import pytest
import torch

from gradcomp.numerics import lognormal
from gradcomp.codecs import (PruneCodec, PruneFPCodec, PrunePlan, TopKCodec,
                             decode_payload, read_header)
from gradcomp.codecs.base import HEADER_BYTES, CodecTag
from gradcomp.codecs.dense import FPPlan, min_scale_exp
from gradcomp.codecs.sparse import (MAX_RICE_K, PRUNE_FIXED_BYTES, TOPK_FIXED_BYTES,
                                    prune_fp_wire_bytes, pruning_fractions, rice_expected_bits,
                                    rice_parameter, tail_fp_plan, threshold_plan_alpha,
                                    truncated_log_moments)
from gradcomp.numerics.error_model import relative_errors
from gradcomp.numerics.packing import packed_size

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BIG = 1_000_000


def signed_lognormal(n, sigma=2.0, mu=-7.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mag = torch.randn(n, generator=g, dtype=torch.float64).mul_(sigma).add_(mu).exp_()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (mag * sign).to(torch.float32).to(device)


def prune_fields(payload):
    return struct.unpack("<fiiiB", bytes(payload[HEADER_BYTES:HEADER_BYTES + PRUNE_FIXED_BYTES].tolist()))


def positions_unary_bits(idx, k):
    gaps = torch.diff(idx, prepend=idx.new_full((1,), -1)) - 1
    return int(((gaps >> k) + 1).sum())


@pytest.fixture(scope="module")
def big():
    """1M signed lognormal samples (sigma 2) with their fit and one payload per prune codec."""
    x = signed_lognormal(BIG)
    fit = lognormal.fit(x)
    out = {"x": x, "fit": fit}
    for name, codec in (("prune", PruneCodec(0.85)), ("prune_fp", PruneFPCodec(0.85, 6))):
        plan = codec.plan(fit)
        payload = codec.encode(x, key=11, plan=plan)
        out[name] = (codec, plan, payload, decode_payload(payload, BIG))
    return out


# ---------------------------------------------------------------------------------------------
# round trips and structure


@pytest.mark.parametrize("device", DEVICES)
def test_prune_round_trip_structure(device):
    x = signed_lognormal(50_000, seed=1, device=device).view(100, 500)
    codec = PruneCodec(0.85)
    plan = codec.plan(lognormal.fit(x))
    y = codec.decode(codec.encode(x, key=3, plan=plan), x.numel())
    assert y.shape == (x.numel(),) and y.dtype == torch.float32 and y.device == x.reshape(-1).device
    xf, a = x.reshape(-1), plan.alpha
    kept = xf.abs() > a
    assert torch.equal(y[kept], xf[kept])  # exact
    rest = y[~kept]
    assert bool(((rest == 0) | (rest.abs() == a)).all())
    at_a = rest != 0
    assert torch.equal(torch.sign(rest[at_a]), torch.sign(xf[~kept][at_a]))
    assert 0 < int(at_a.sum()) < int((~kept).sum())


@pytest.mark.parametrize("device", DEVICES)
def test_prune_fp_round_trip_structure(device):
    x = signed_lognormal(50_000, seed=2, device=device)
    codec = PruneFPCodec(0.85, 6)
    plan = codec.plan(lognormal.fit(x))
    payload = codec.encode(x, key=4, plan=plan)
    header = read_header(payload)
    assert header.tag == CodecTag.PRUNE_FP and header.fmt == plan.values.fmt
    y = decode_payload(payload, x.numel())
    a = plan.alpha
    kept = x.abs() > a
    # Pruning noise and rounding noise come from different sub-keys: the +-alpha / zero
    # pattern is PruneCodec's for the same key.
    ref = PruneCodec(0.85).decode(PruneCodec(0.85).encode(x, key=4, plan=PrunePlan(a, 0.85)), x.numel())
    assert torch.equal(y[~kept], ref[~kept])
    # Kept values: stochastically rounded within one grid step of the format (scale included).
    fmt, k = header.fmt, header.scale_exp
    step = torch.ldexp(torch.ones_like(x[kept]),
                       (torch.floor(torch.log2(x[kept].abs() * 2.0**-k)).clamp(min=fmt.min_exponent)
                        - fmt.man_bits + k).to(torch.int32))
    assert bool(((y[kept] - x[kept]).abs() <= step * (1 + 1e-6)).all())
    assert bool((torch.sign(y[kept]) * torch.sign(x[kept]) >= 0).all())


def test_topk_keeps_exactly_the_top_entries():
    x = torch.randperm(10_000, generator=torch.Generator().manual_seed(0)).float().sub(5000.0).mul(1e-3)
    codec = TopKCodec(0.01)
    payload = codec.encode(x)
    y = decode_payload(payload, x.numel())
    n = codec.count(x.numel())
    assert n == 100
    top = torch.topk(x.abs(), n).indices
    expect = torch.zeros_like(x)
    expect[top] = x[top]
    assert torch.equal(y, expect)
    # layout: header, fixed fields, fp32 values, Rice remainders, unary stream
    nn, unary_bits, k = struct.unpack("<iiB", bytes(payload[HEADER_BYTES:HEADER_BYTES + TOPK_FIXED_BYTES].tolist()))
    idx = torch.nonzero(y).reshape(-1)
    assert nn == n and unary_bits == positions_unary_bits(idx, k)
    assert payload.numel() == (HEADER_BYTES + TOPK_FIXED_BYTES + 4 * n + (packed_size(n, k) if k else 0)
                               + packed_size(unary_bits, 1))


@pytest.mark.parametrize("ratio,numel,expected", [(0.01, 100, 1), (0.07, 100, 7), (0.5, 3, 2),
                                                  (1.0, 5, 5), (1e-9, 10, 1), (0.3, 0, 0)])
def test_topk_count(ratio, numel, expected):
    assert TopKCodec(ratio).count(numel) == expected


@pytest.mark.parametrize("device", DEVICES)
def test_topk_round_trip_lognormal_and_wire(device):
    x = signed_lognormal(200_000, seed=5, device=device)
    codec = TopKCodec(0.01)
    payload = codec.encode(x)
    y = decode_payload(payload, x.numel())
    kept = y != 0
    assert int(kept.sum()) == 2000 and torch.equal(y[kept], x[kept])
    assert float(x[~kept].abs().max()) <= float(x[kept].abs().min())
    expected = codec.expected_wire_bytes(x.numel())
    assert abs(payload.numel() - expected) / expected < 0.01


# ---------------------------------------------------------------------------------------------
# sparsity, payload size, wire target


@pytest.mark.parametrize("name", ["prune", "prune_fp"])
def test_measured_sparsity_on_1m(big, name):
    _, plan, _, y = big[name]
    measured = float((y == 0).double().mean())
    assert abs(measured - 0.85) <= 0.01, measured
    nonzero, kept = pruning_fractions(big["fit"], plan.alpha)
    assert abs((1 - measured) - nonzero) < 0.01
    if name == "prune":
        assert abs(float((y.abs() > plan.alpha).double().mean()) - kept) < 0.002


@pytest.mark.parametrize("name", ["prune", "prune_fp"])
def test_payload_size_matches_layout(big, name):
    codec, plan, payload, y = big[name]
    alpha, n, n_kept, unary_bits, k = prune_fields(payload)
    assert alpha == plan.alpha and 0 <= k <= MAX_RICE_K
    x = big["x"]
    if name == "prune":  # fp32 values: the decoded shard shows the counts directly
        idx = torch.nonzero(y).reshape(-1)
        assert n == idx.numel() and n_kept == int((y.abs() > alpha).sum())
        assert unary_bits == positions_unary_bits(idx, k)
    else:  # kept values were rounded (possibly to 0); the +-alpha pattern is PruneCodec's
        assert n_kept == int((x.abs() > alpha).sum())
        assert n == prune_fields(big["prune"][2])[1]
    vb = 32 if name == "prune" else codec.bits
    size = (HEADER_BYTES + PRUNE_FIXED_BYTES + packed_size(n_kept * vb, 1) + packed_size(n, 1)
            + packed_size(n - n_kept, 1) + (packed_size(n, k) if k else 0) + packed_size(unary_bits, 1))
    assert payload.numel() == size


@pytest.mark.parametrize("name", ["prune", "prune_fp"])
def test_expected_wire_bytes_matches(big, name):
    codec, _, payload, _ = big[name]
    expected = codec.expected_wire_bytes(BIG, big["fit"])
    assert abs(payload.numel() - expected) / expected < 0.005


def test_wire_target_bits_per_element(big):
    bits_fp = 8 * big["prune_fp"][2].numel() / BIG
    bits_prune = 8 * big["prune"][2].numel() / BIG
    print(f"\nPruneFPCodec(0.85, 6): {bits_fp:.4f} bits/element; PruneCodec(0.85): {bits_prune:.4f}"
          f" (1M elements, sigma {big['fit'].sigma:.3f}, header included)")
    assert bits_fp <= 2.5
    assert bits_fp <= 1.25 and bits_prune <= 2.55  # what the Rice-coded layout reaches


def test_prune_fp_error_is_small(big):
    x, y = big["x"], big["prune_fp"][3]
    y32 = big["prune"][3]
    nmse = float(((y - x) ** 2).sum() / (x ** 2).sum())
    nmse32 = float(((y32 - x) ** 2).sum() / (x ** 2).sum())
    # The no-saturation scale keeps the energy-carrying top of the tail; a saturating format
    # would lose most of it (NMSE about 0.7 here).
    assert nmse < 0.1 and nmse32 < 0.05


# ---------------------------------------------------------------------------------------------
# unbiasedness


@pytest.mark.parametrize("codec", [PruneCodec(0.7), PruneFPCodec(0.7, 4), PruneFPCodec(0.85, 6)])
def test_unbiased_over_keys(codec):
    x = signed_lognormal(48, sigma=1.5, seed=9)
    x[0] = 0.0
    plan = codec.plan(lognormal.fit(x))
    reps = 2000
    ys = torch.stack([decode_payload(codec.encode(x, key=k, plan=plan), x.numel()) for k in range(reps)]).double()
    mean, se = ys.mean(0), ys.std(0) / math.sqrt(reps)
    assert bool(((mean - x.double()).abs() <= 4 * se + 1e-7 * x.abs().double()).all())
    assert float(se.max()) > 0  # something was random


def test_scale_guard_prevents_saturation():
    x = signed_lognormal(20_000, sigma=1.0, seed=3)
    codec = PruneFPCodec(0.5, 6)
    plan = codec.plan(lognormal.fit(x))
    low = PrunePlan(plan.alpha, plan.sparsity, FPPlan(plan.values.fmt, plan.values.scale_exp - 6))
    payload = codec.encode(x, key=1, plan=low)
    header = read_header(payload)
    top = float(x.abs().max())
    assert header.scale_exp == min_scale_exp(top, header.fmt) > low.values.scale_exp
    y = decode_payload(payload, x.numel())
    i = int(x.abs().argmax())
    ulp = 2.0 ** (math.floor(math.log2(top)) - header.fmt.man_bits)
    assert abs(float(y[i]) - float(x[i])) <= ulp  # rounded, not saturated


# ---------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("codec", [PruneCodec(), PruneFPCodec(), TopKCodec()])
@pytest.mark.parametrize("numel", [0, 1, 7])
def test_zero_empty_tiny(codec, numel):
    z = torch.zeros(numel)
    p = codec.encode(z, key=1)
    assert torch.equal(decode_payload(p, numel), z)
    if numel:
        x = torch.full((numel,), -0.75)
        y = decode_payload(codec.encode(x, key=2), numel)
        # The fit is a point mass, alpha = e^mu / (1 - S) > |x|: pruning gives 0 or -alpha;
        # top-k keeps one entry exactly.
        assert y.shape == (numel,) and bool((y <= 0).all())
        if isinstance(codec, TopKCodec):
            assert int((y == -0.75).sum()) == 1
    if isinstance(codec, (PruneCodec, PruneFPCodec)):
        assert codec.plan(None).alpha == math.inf
        assert p.numel() == HEADER_BYTES + PRUNE_FIXED_BYTES == codec.expected_wire_bytes(numel, None)


@pytest.mark.parametrize("codec", [PruneCodec(), PruneFPCodec(), TopKCodec()])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_decodes_to_nan(codec, bad):
    x = signed_lognormal(1000, seed=4)
    x[17] = bad
    p = codec.encode(x, key=5)
    assert read_header(p).nonfinite
    assert bool(torch.isnan(decode_payload(p, x.numel())).all())
    if codec.uses_fit:  # the fit ignores non-finite entries
        clean = torch.cat([x[:17], x[18:]])
        assert codec.plan(lognormal.fit(x)) == codec.plan(lognormal.fit(clean))


@pytest.mark.parametrize("codec", [PruneCodec(), PruneFPCodec(), TopKCodec()])
def test_only_nonfinite_shard(codec):
    x = torch.tensor([math.nan, 0.0, math.inf])
    p = codec.encode(x, key=1)
    assert bool(torch.isnan(decode_payload(p, 3)).all())


@pytest.mark.parametrize("codec", [PruneCodec(), PruneFPCodec(), TopKCodec(0.1)])
def test_misaligned_slice_and_trailing_bytes_decode(codec):
    x = signed_lognormal(3001, seed=6)
    p = codec.encode(x, key=7)
    ref = decode_payload(p, x.numel())
    buf = torch.cat([torch.zeros(1, dtype=torch.uint8), p, torch.full((5,), 255, dtype=torch.uint8)])
    assert torch.equal(decode_payload(buf[1:1 + p.numel()], x.numel()), ref)
    assert torch.equal(decode_payload(buf[1:], x.numel()), ref)  # trailing bytes ignored


@pytest.mark.parametrize("codec", [PruneCodec(), PruneFPCodec(), TopKCodec(0.1)])
def test_deterministic_per_key_and_truncated_payload(codec):
    x = signed_lognormal(5000, seed=8)
    p1, p2 = codec.encode(x, key=9), codec.encode(x, key=9)
    assert torch.equal(p1, p2)
    if codec.stochastic:
        assert not torch.equal(p1, codec.encode(x, key=10))
    with pytest.raises(ValueError, match="truncated|corrupt"):
        decode_payload(p1[:-3], x.numel())


def test_clustered_positions_cost_at_most_a_bitmap():
    # All survivors in one block: Rice k = 0 (the bitmap) or better is chosen from exact costs.
    x = torch.zeros(100_000)
    x[:5000] = 1.0
    p = TopKCodec(0.05).encode(x)
    nn, unary_bits, k = struct.unpack("<iiB", bytes(p[HEADER_BYTES:HEADER_BYTES + TOPK_FIXED_BYTES].tolist()))
    assert nn == 5000 and unary_bits + nn * k <= 5000 + 1
    assert torch.equal(decode_payload(p, x.numel()), x)


# ---------------------------------------------------------------------------------------------
# helpers, plans, arguments


def test_rice_model_matches_bernoulli_positions():
    g = torch.Generator().manual_seed(1)
    for p in (0.003, 0.05, 0.15, 0.6):
        idx = torch.nonzero(torch.rand(BIG, generator=g) < p).reshape(-1)
        k = rice_parameter(idx.numel(), BIG)
        measured = positions_unary_bits(idx, k) + k * idx.numel()
        assert abs(measured - rice_expected_bits(BIG, idx.numel() / BIG, k)) / measured < 0.005
    assert rice_parameter(150_000, BIG) == 2 and rice_parameter(0, 10) == 0
    assert abs(rice_expected_bits(BIG, 0.15) / BIG - 0.6138) < 1e-3


def test_prune_fp_wire_bits_function():
    b = prune_fp_wire_bytes(BIG, 0.15, 0.05, 6)
    assert abs(8 * b / BIG - 1.164) < 0.002
    assert prune_fp_wire_bytes(BIG, 0.15, 0.05, 32) > b
    assert prune_fp_wire_bytes(0, 0.0, 0.0, 6) == HEADER_BYTES + PRUNE_FIXED_BYTES
    for args in [(BIG, 0.1, 0.2, 6), (BIG, 1.5, 0.2, 6), (BIG, 0.2, 0.1, 0), (-1, 0.2, 0.1, 6)]:
        with pytest.raises(ValueError):
            prune_fp_wire_bytes(*args)


def test_plans_and_describe():
    fit = lognormal.LognormalFit(mu=-7.0, sigma=2.0, count=BIG)
    plan = PruneFPCodec(0.85, 6).plan(fit)
    assert plan.alpha == struct.unpack("<f", struct.pack("<f", plan.alpha))[0]
    assert abs(lognormal.sparsity_for_threshold(plan.alpha, -7.0, 2.0) - 0.85) < 1e-6
    assert plan.values.fmt.bits == 6
    assert plan.alpha == threshold_plan_alpha(0.85, fit) == PruneCodec(0.85).plan(fit).alpha
    assert PruneCodec(0.85).plan(fit).values is None
    d = PruneFPCodec(0.85, 6).describe(plan)
    assert d["format"] == plan.values.fmt.name and d["sparsity"] == 0.85 and d["alpha"] == plan.alpha
    assert PruneCodec().describe(PruneCodec().plan(fit))["format"] == "float32"
    assert TopKCodec(0.01).describe(None) == {"format": "float32", "ratio": 0.01}
    m, s = truncated_log_moments(0.0, 1.0, 1.0)
    assert abs(m - 0.797885) < 1e-5 and abs(s - 0.602810) < 1e-5
    fixed = tail_fp_plan(6, 2, "stochastic", fit, plan.alpha)
    assert fixed.fmt.exp_bits == 2
    # its error is the mean relative error over the kept tail, cut 8 sigma above
    upper = math.exp(max(fit.mu, math.log(plan.alpha)) + 8.0 * fit.sigma)
    mean = relative_errors(fixed.fmt, fit.mu, fit.sigma, fixed.scale_exp, "stochastic", plan.alpha, upper)[0]
    assert fixed.expected_error == pytest.approx(mean, rel=1e-12)
    for c in (PruneCodec(), PruneFPCodec(), TopKCodec()):
        assert c.wire_bytes(1000) is None


def test_reduce_codecs():
    # The reduce side prunes the mean's nonzeros (its zeros are phase 1's pruning): count_zeros=False.
    assert PruneFPCodec(0.85, 6).reduce_codec() == PruneFPCodec(0.3, 8, count_zeros=False)
    assert PruneFPCodec(0.9, 5, exp_bits=2, rounding="nearest").reduce_codec() == PruneFPCodec(
        0.3, 8, None, "nearest", count_zeros=False)
    assert PruneFPCodec(0.2, 10, exp_bits=5).reduce_codec() == PruneFPCodec(0.2, 10, 5, count_zeros=False)
    assert PruneCodec(0.85).reduce_codec() == PruneFPCodec(0.3, 8, count_zeros=False)
    assert TopKCodec(0.01).reduce_codec() == TopKCodec(1.0)


def test_topk_reduce_codec_is_lossless_on_sparse_means():
    x = signed_lognormal(20_000, seed=12)
    codec = TopKCodec(0.01)
    mean = sum(decode_payload(codec.encode(x * (1 + 0.1 * r)), x.numel()) for r in range(4)) / 4
    p = codec.reduce_codec().encode(mean)
    assert torch.equal(decode_payload(p, x.numel()), mean)
    nn = struct.unpack("<i", bytes(p[HEADER_BYTES:HEADER_BYTES + 4].tolist()))[0]
    assert nn == int((mean != 0).sum()) < x.numel()  # zeros are never sent


@pytest.mark.parametrize("make", [
    lambda: PruneCodec(0.0), lambda: PruneCodec(1.0), lambda: PruneCodec(-0.2), lambda: PruneCodec(math.nan),
    lambda: PruneCodec("0.5"), lambda: PruneCodec(True),
    lambda: PruneFPCodec(0.85, 1), lambda: PruneFPCodec(0.85, 17), lambda: PruneFPCodec(0.85, 6.0),
    lambda: PruneFPCodec(0.85, 6, exp_bits=6), lambda: PruneFPCodec(0.85, 6, rounding="up"),
    lambda: PruneFPCodec(1.2),
    lambda: TopKCodec(0.0), lambda: TopKCodec(1.5), lambda: TopKCodec(math.nan), lambda: TopKCodec(None),
])
def test_bad_arguments(make):
    with pytest.raises(ValueError):
        make()


def test_bad_encode_arguments():
    x = torch.ones(10)
    for codec in (PruneCodec(), PruneFPCodec()):
        with pytest.raises(ValueError, match="key"):
            codec.encode(x, key=-1)
        with pytest.raises(ValueError, match="key"):
            codec.encode(x, key=True)
        with pytest.raises(ValueError, match="floating-point"):
            codec.encode(torch.ones(10, dtype=torch.int64))
    fit = lognormal.fit(x)
    with pytest.raises(ValueError, match="PrunePlan"):
        PruneCodec().encode(x, plan=PruneFPCodec().plan(fit))
    with pytest.raises(ValueError, match="PrunePlan"):
        PruneFPCodec().encode(x, plan=PruneCodec().plan(fit))
    with pytest.raises(ValueError, match="PrunePlan"):
        PruneFPCodec().encode(x, plan="plan")
    for alpha in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            PruneCodec().encode(x, plan=PrunePlan(alpha, 0.5))


def test_plan_alpha_is_rounded_to_float32():
    x = signed_lognormal(5000, seed=13)
    alpha = 0.1  # not a float32
    p = PruneCodec().encode(x, key=2, plan=PrunePlan(alpha, 0.5))
    a32 = struct.unpack("<f", struct.pack("<f", alpha))[0]
    assert prune_fields(p)[0] == a32
    y = decode_payload(p, x.numel())
    small = (x.abs() <= a32) & (y != 0)
    assert bool((y[small].abs() == a32).all()) and torch.equal(y[x.abs() > a32], x[x.abs() > a32])
