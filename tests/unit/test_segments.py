"""SEGMENTS payloads, segment boundaries, zero-aware pruning and budgets split over segments."""

import math

import pytest
import torch

from gradcomp.numerics import lognormal
from gradcomp.codecs import (BudgetCodec, CodecTag, FPCodec, PruneCodec, PruneFPCodec, TopKCodec,
                             decode_payload, join_segments, read_header)
from gradcomp.codecs.base import FLAG_NONFINITE, fit_or_none
from gradcomp.codecs.segments import segments_wire_bytes, split_points
from gradcomp.codecs.sparse import usable_sparsity
from gradcomp.comm.collectives import _sum_in_rank_order, decode_mean




def _lognormal(n, seed, scale=1.0, sigma=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).mul(sigma).exp() * scale
    return x * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)


CODECS = [FPCodec(6), FPCodec(4, rounding="nearest"), PruneCodec(0.85), PruneFPCodec(0.85, 6),
          BudgetCodec(1.5), TopKCodec(0.1)]


def _segmented(x, sizes, codecs, key=7):
    parts, offset = [], 0
    for s, (n, codec) in enumerate(zip(sizes, codecs)):
        parts.append(codec.encode(x[offset:offset + n], key=key + s))
        offset += n
    return parts, join_segments(parts, sizes)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_segments_decode_as_their_parts(codec):
    sizes = [1000, 3, 0, 64, 2500]
    x = torch.cat([_lognormal(n, i, scale=10.0 ** -i) for i, n in enumerate(sizes)])
    parts, payload = _segmented(x, sizes, [codec] * len(sizes))
    assert read_header(payload).tag == CodecTag.SEGMENTS
    assert payload.numel() == segments_wire_bytes([p.numel() for p in parts])
    y = decode_payload(payload, x.numel())
    offset = 0
    for n, p in zip(sizes, parts):
        assert torch.equal(y[offset:offset + n].view(torch.int32), decode_payload(p, n).view(torch.int32))
        offset += n


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_decode_mean_of_segments_is_the_rank_order_sum(codec):
    sizes = [700, 50, 1300]
    payloads = []
    for r in range(3):
        x = torch.cat([_lognormal(n, 10 * r + i, scale=10.0 ** -(2 * i)) for i, n in enumerate(sizes)])
        payloads.append(_segmented(x, sizes, [codec] * 3, key=100 * r)[1])
    numel = sum(sizes)
    fast = decode_mean(payloads, numel, torch.empty(numel), 3)
    slow = _sum_in_rank_order(payloads, numel, torch.empty(numel)).div_(3)
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))


def test_a_flagged_segment_poisons_the_whole_shard_on_every_path():
    codec = FPCodec(6)
    x = torch.cat([_lognormal(100, 0), _lognormal(50, 1)])
    x[120] = float("inf")
    _, payload = _segmented(x, [100, 50], [codec, codec])
    assert payload[1].item() & FLAG_NONFINITE
    assert torch.isnan(decode_payload(payload, 150)).all()
    clean = _segmented(_lognormal(150, 2), [100, 50], [codec, codec])[1]
    assert torch.isnan(decode_mean([clean, payload], 150, torch.empty(150), 2)).all()


def test_segments_validation():
    codec = FPCodec(6)
    x = _lognormal(150, 0)
    _, payload = _segmented(x, [100, 50], [codec, codec])
    for bad, numel in [(payload[:10], 150), (payload[:-1], 150), (payload, 151), (payload, 149)]:
        with pytest.raises(ValueError):
            decode_payload(bad, numel)
    zero_count = payload.clone()
    zero_count[8:12] = 0
    with pytest.raises(ValueError, match="segments"):
        decode_payload(zero_count, 150)
    nested = join_segments([payload, codec.encode(x[:10])], [150, 10])
    with pytest.raises(ValueError, match="itself a SEGMENTS"):
        decode_payload(nested, 160)
    with pytest.raises(ValueError):
        join_segments([], [])


@pytest.mark.parametrize("numels,start,stop,expect", [
    ([10, 2, 3, 10], 5, 25, [0, 5, 10, 20]),   # tiny parts merge into one run
    ([100], 0, 100, [0, 100]),
    ([50, 50], 25, 75, [0, 25, 50]),          # a shard cutting both tensors
    ([2, 2, 2], 0, 6, [0, 6]),                # only tiny tensors: one segment
    ([100, 2, 100], 0, 202, [0, 100, 102, 202]),
    ([10], 0, 15, [0, 10, 15]),              # a buffer longer than its tensors
])
def test_split_points(numels, start, stop, expect):
    assert split_points(numels, start, stop, min_numel=4) == expect


def test_pruning_counts_exact_zeros_toward_the_sparsity():
    """70 % exact zeros, target 0.85: the shard as a whole ends near 0.85 zeros (not 0.955),
    unbiased; count_zeros=False keeps the old meaning (the usable entries pruned at 0.85)."""
    n = 200_000
    g = torch.Generator().manual_seed(3)
    x = _lognormal(n, 4) * (torch.rand(n, generator=g) < 0.3)
    fit = fit_or_none(x)
    assert usable_sparsity(0.85, fit, n) == pytest.approx(0.5, abs=0.01)
    for codec, want in [(PruneFPCodec(0.85, 6), 0.85), (PruneFPCodec(0.85, 6, count_zeros=False), 0.955)]:
        plan = codec.plan(fit, n)
        y = decode_payload(codec.encode(x, key=1, plan=plan), n)
        assert float((y == 0).double().mean()) == pytest.approx(want, abs=0.01), codec
    # zeros alone beyond the target: nothing usable is pruned
    plan = PruneCodec(0.6).plan(fit, n)
    y = decode_payload(PruneCodec(0.6).encode(x, key=2, plan=plan), n)
    assert torch.equal(y, x)
    with pytest.raises(ValueError):
        PruneCodec(0.6, count_zeros=1)
    with pytest.raises(ValueError):
        PruneCodec(0.6).plan(fit, -1)


def test_budget_segments_share_one_budget():
    """Segments of very different sizes (a 64-element bias next to large weights) planned
    together stay within the shard's budget in expectation, fixed bytes included."""
    codec = BudgetCodec(1.5)
    sizes = [40_000, 64, 128, 20_000, 64]
    xs = [_lognormal(n, i, scale=10.0 ** -i) for i, n in enumerate(sizes)]
    fits = [fit_or_none(x) for x in xs]
    plans = codec.plan_segments(fits, sizes)
    expected = segments_wire_bytes([p.expected_bits * n / 8 for p, n in zip(plans, sizes)])
    assert 8 * expected / sum(sizes) <= 1.5 + 1e-9
    alone = [codec.plan(f, n) for f, n in zip(fits, sizes)]
    assert not all(p.within_budget for p in alone)  # a 64-element segment cannot afford its header alone
    payload = join_segments([codec.encode(x, key=s, plan=p) for s, (x, p) in enumerate(zip(xs, plans))], sizes)
    assert 8 * payload.numel() / sum(sizes) <= 1.5 * 1.03


def test_every_codec_takes_plan_fit_numel():
    fit = lognormal.LognormalFit(mu=-7.0, sigma=2.0, count=900)
    for codec in CODECS:
        codec.plan(fit, 1000)
        codec.plan(None, 0)
        assert math.isfinite(codec.expected_wire_bytes(1000, fit))


def _gauss(n, seed, scale=1.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def _zero_share(codec, x, plan, key=1):
    y = decode_payload(codec.encode(x, key=key, plan=plan), x.numel())
    return float((y == 0).double().mean())


def test_the_fit_sample_sets_the_threshold_where_the_lognormal_misses():
    """Gaussian gradients are not lognormal: the closed form misses the sparsity, the sample hits it."""
    from gradcomp.numerics.lognormal import LognormalFit

    x = _gauss(200_000, 1)
    fit = fit_or_none(x)
    assert 0 < len(fit.sample) <= 512 and list(fit.sample) == sorted(fit.sample)
    codec = PruneFPCodec(0.85, 6)
    with_sample = abs(_zero_share(codec, x, codec.plan(fit, x.numel())) - 0.85)
    closed_form = abs(_zero_share(codec, x, codec.plan(LognormalFit(fit.mu, fit.sigma, fit.count), x.numel())) - 0.85)
    assert with_sample < 0.01 and with_sample < closed_form / 2, (with_sample, closed_form)


@pytest.mark.parametrize("threshold", ["shard", "tensor"])
def test_segments_share_one_threshold_or_each_reach_the_sparsity(threshold):
    codec = PruneFPCodec(0.85, 6, threshold=threshold)
    xs = [_gauss(60_000, 2), _gauss(40_000, 3, scale=1e-3)]
    fits = [fit_or_none(x) for x in xs]
    plans = codec.plan_segments(fits, [x.numel() for x in xs])
    shares = [_zero_share(codec, x, p, key=k) for k, (x, p) in enumerate(zip(xs, plans))]
    if threshold == "shard":
        assert plans[0].alpha == plans[1].alpha
        total = (shares[0] * 60_000 + shares[1] * 40_000) / 100_000
        assert total == pytest.approx(0.85, abs=0.01)
        assert shares[1] > 0.99  # the small-scale tensor carries little energy: pruned hardest
    else:
        assert shares == pytest.approx([0.85, 0.85], abs=0.01)
    with pytest.raises(ValueError):
        PruneFPCodec(0.85, 6, threshold="layer")


@pytest.mark.parametrize("bits", [1.5, 3.0])
def test_budget_meets_its_budget_on_gaussian_gradients(bits):
    """A Gaussian shard (no lognormal tail: the model's threshold would keep too much) planned from
    its fit's sample stays within the budget, and the plan's expected bits say so."""
    codec = BudgetCodec(bits)
    x = _gauss(200_000, 4)
    plan = codec.plan(fit_or_none(x), x.numel())
    sent = 8 * codec.encode(x, key=3, plan=plan).numel() / x.numel()
    assert sent <= bits * 1.01, (sent, plan)
    assert plan.expected_bits == pytest.approx(sent, rel=0.03)


def _drift_cache_step(cache, codec, x, refit, key=5):
    return cache.encode(codec, x, [0, x.numel() // 2, x.numel()], (0, 1, 0), key=key, refit=refit)


@pytest.mark.parametrize("codec", [PruneFPCodec(0.85, 6), PruneCodec(0.85), BudgetCodec(1.5)], ids=repr)
def test_plan_cache_refits_a_shard_whose_payload_drifts(codec):
    """Gradients shrinking 30x between periodic refits would make a cached threshold prune nearly
    everything: the payload's size leaves the band, the shard is refitted at once and the sparsity
    stays near the requested one. Growing gradients likewise. A resumed cache (state_dict) makes
    the same decisions as the uninterrupted one."""
    from gradcomp.comm.plans import PlanCache

    x = torch.cat([_lognormal(30_000, 1), _lognormal(30_000, 2, scale=1e-2)])
    cache = PlanCache()
    first = _drift_cache_step(cache, codec, x, refit=True)
    same = _drift_cache_step(cache, codec, x * 1.01, refit=False)
    assert cache.drift_refits == 0
    assert abs(same.numel() - first.numel()) < 0.1 * first.numel()
    copy = PlanCache()
    copy.load_state_dict(cache.state_dict(), cache.sizes_state_dict())
    sent = []
    for c in (cache, copy):
        shrunk = _drift_cache_step(c, codec, x / 30, refit=False)
        assert c.drift_refits == 1
        assert abs(shrunk.numel() - first.numel()) < 0.1 * first.numel()
        grown = _drift_cache_step(c, codec, x * 3, refit=False)
        assert c.drift_refits == 2
        assert abs(grown.numel() - first.numel()) < 0.1 * first.numel()
        sent.append((shrunk, grown))
    assert all(torch.equal(a, b) for a, b in zip(*sent))  # the resumed cache sent the same bytes


def test_plan_cache_never_refits_fixed_size_codecs_on_drift():
    from gradcomp.comm.plans import PlanCache

    cache, codec = PlanCache(), FPCodec(6)
    x = _lognormal(10_000, 3)
    _drift_cache_step(cache, codec, x, refit=True)
    _drift_cache_step(cache, codec, x / 1000, refit=False)
    assert cache.drift_refits == 0 and cache.sizes == {}
    with pytest.raises(ValueError, match="payload size"):
        cache.load_state_dict({}, {"0/1": 3})


def test_plan_cache_with_error_feedback_holds_thresholds_on_growth():
    """follow_growth=False (the hook with error feedback): a growing input keeps its threshold
    until the periodic refit; a shrinking one is still refitted."""
    from gradcomp.comm.plans import PlanCache

    codec, x = PruneFPCodec(0.85, 6), _lognormal(40_000, 5)
    cache = PlanCache(follow_growth=False)
    first = _drift_cache_step(cache, codec, x, refit=True)
    grown = _drift_cache_step(cache, codec, x * 3, refit=False)
    assert cache.drift_refits == 0 and grown.numel() > 1.5 * first.numel()
    _drift_cache_step(cache, codec, x / 30, refit=False)
    assert cache.drift_refits == 1


@pytest.mark.parametrize("codec", [FPCodec(6), PruneFPCodec(0.85, 6), BudgetCodec(1.5)], ids=repr)
def test_plan_cache_refits_a_segment_planned_without_data(codec):
    """A tensor that was all zeros at the refit (an unused parameter that step) and has data the
    next step is refitted at once: a plan without a fit would prune all of it away."""
    from gradcomp.comm.plans import PlanCache

    x = _lognormal(20_000, 6)
    cache = PlanCache()
    _drift_cache_step(cache, codec, torch.cat([x[:10_000], torch.zeros(10_000)]), refit=True)
    y = decode_payload(_drift_cache_step(cache, codec, x, refit=False), x.numel())
    assert float((y[10_000:] != 0).double().mean()) > 0.1
    assert float(((y - x)[10_000:] ** 2).sum() / (x[10_000:] ** 2).sum()) < 1.0


@pytest.mark.parametrize("codec", [FPCodec(6), PruneFPCodec(0.85, 6), BudgetCodec(1.5)], ids=repr)
def test_plan_cache_ignores_the_fits_of_a_non_finite_step(codec):
    """A refit on a step whose shard holds inf (GradScaler's overflow step) is undone: the next
    step encodes exactly as if the poisoned step had not refitted."""
    from gradcomp.comm.plans import PlanCache

    x = _lognormal(20_000, 7)
    poisoned = x.clone()
    poisoned[:10_000] = math.inf
    clean, hit = PlanCache(), PlanCache()
    for c in (clean, hit):
        _drift_cache_step(c, codec, x, refit=True)
    payload = _drift_cache_step(hit, codec, poisoned, refit=True)
    assert read_header(payload).nonfinite
    assert torch.equal(_drift_cache_step(clean, codec, x * 0.9, refit=False),
                       _drift_cache_step(hit, codec, x * 0.9, refit=False))
