"""The compression hook on spawned gloo ranks: exactness, bytes, replicas, edge cases."""

import statistics

import pytest
import torch

import gradcomp
from gradcomp.collectives import expected_bytes_sent, expected_messages

from . import cases
from .harness import spawn


@pytest.mark.parametrize("world", [2, 3, 4])
def test_codecs_collectives_and_edge_buckets(world, tmp_path):
    results = spawn(world, cases.codec_cases, tmp_path)
    codecs = cases.make_codecs()
    for key, r0 in results[0].items():
        name, coll, numel = key
        codec = codecs[name]
        # Replicas: bit-identical on every rank.
        for r in range(1, world):
            assert torch.equal(results[r][key]["y"].view(torch.int32), r0["y"].view(torch.int32)), key
        xs = cases.inputs_for(world, numel)
        exact = torch.stack(xs).double().mean(0)
        y = r0["y"].double()
        assert y.shape == (numel,)
        if numel == 0:
            continue
        if name == "identity":
            # fp32 sums in any order: each element within a few float32 ulps of sum |x_i|.
            scale = torch.stack(xs).double().abs().sum(0) / world
            assert ((y - exact).abs() <= 4 * 2.0**-24 * scale).all(), key
            if coll in ("two_phase", "allgather"):  # rank-order fp32 sum, bit for bit
                acc = torch.zeros(numel)
                for x in xs:
                    acc += x
                assert torch.equal(r0["y"], acc / world), key
        else:
            # Per quantization stage, in the normal range: nearest rounding errs by at most
            # 2**-(m+1) of each value, stochastic by at most 2**-m; nothing saturates. Stages:
            # one on the all-gather path, two on the two-phase path (the reduced mean again).
            if name == "half":
                bound = 2.0**-10
            elif name in ("prune", "prune_fp", "topk", "budget"):
                bound = None  # sparse codecs: error bounded statistically (unbiasedness test)
            else:
                nearest = codec.rounding == "nearest"
                formats = [gradcomp.FPFormat.from_name(f) for f in r0["formats"]]
                assert len(formats) == (2 if r0["collective"] == "two_phase" else 1), key
                bound = sum(2.0 ** -(f.man_bits + (1 if nearest else 0)) for f in formats)
            err = ((y - exact).norm() / exact.norm()).item()
            if bound is not None:
                assert err <= bound, (key, err, bound)
            elif numel >= 1001:  # a 1-element shard pruned at 85% may legitimately be zero
                assert err < 0.9, (key, err)  # it carries most of the signal
        # Bytes handed to collectives equal the declared sizes, and the cost model within 5%
        # (headers, uneven shards).
        resolved = r0["collective"]
        fixed = codec.wire_bytes(numel) is not None
        for r in range(world):
            rr = results[r][key]
            if fixed:
                expected = cases.expected_fixed_bytes(codec, resolved, world, r, numel)
            elif resolved == "allgather":
                expected = (world - 1) * rr["bucket"]["payload_bytes"]
            else:  # two-phase: the other ranks' shards, then the reduced shard to everyone
                shards = rr["bucket"]["shard_payload_bytes"]
                expected = sum(b for j, b in enumerate(shards) if j != r) \
                    + (world - 1) * rr["bucket"]["reduce_payload_bytes"]
            # collective="auto" at N > 2 re-decides by size after the step: one small all-reduce
            probe_bytes, probe_messages = rr["bucket"].get("probe_bytes", 0), rr["bucket"].get("probe_messages", 0)
            assert ("probe_bytes" in rr["bucket"]) == (coll == "auto" and world > 2 and resolved == "two_phase"
                                                       and not fixed), key
            assert rr["bytes_sent"] == expected + probe_bytes, (key, r)
            # N-1 messages per round; variable sizes add a round that exchanges them
            variable = [codec.wire_bytes(1) is None] + ([codec.reduce_codec().wire_bytes(1) is None]
                                                        if resolved == "two_phase" else [])
            exchanged = 0 if resolved == "allreduce" else sum(variable)
            assert rr["bucket"]["messages"] == expected_messages(resolved, world, exchanged), (key, r)
            assert probe_messages == (expected_messages("allreduce", world) if probe_bytes else 0), key
        if numel >= 1001 and fixed:
            dense = 4 * numel
            payload = codec.wire_bytes(numel) if not codec.summable or resolved != "allreduce" else dense
            model = expected_bytes_sent(resolved, world, dense, payload)
            if resolved == "allreduce" and name == "half":
                model = expected_bytes_sent(resolved, world, 2 * numel, 0)
            assert abs(r0["bytes_sent"] - model) <= 0.05 * model + 64 * world, (key, r0["bytes_sent"], model)
        # auto picks by the cost model.
        if coll == "auto":
            want = "allreduce" if codec.summable else ("allgather" if world <= 2 else "two_phase")
            assert resolved == want


@pytest.mark.parametrize("world", [2, 3])
def test_nonfinite_on_one_rank_reaches_every_rank(world, tmp_path):
    results = spawn(world, cases.nonfinite_cases, tmp_path)
    for key in results[0]:
        for r in range(world):
            y = results[r][key]
            assert not torch.isfinite(y).all(), (key, r)
            assert torch.equal(y.view(torch.int32), results[0][key].view(torch.int32))


def test_stochastic_codecs_are_unbiased_through_the_collective(tmp_path):
    world, steps = 3, 300
    results = spawn(world, cases.unbiased_cases, tmp_path, steps)
    exact = torch.stack(cases.inputs_for(world, 512, sigma=0.3)).double().mean(0)
    for key, r in results[0].items():
        # Unbiased: the error of the average over `steps` independent steps is the single-step
        # error over sqrt(steps). A bias would not shrink: it would stay near the single-step error.
        single = ((r["samples"] - exact).norm(dim=1) ** 2).mean().sqrt().item()
        err = (r["avg"] - exact).norm().item()
        assert err <= 1.3 * single / steps**0.5, (key, err, single)
        assert single > 0.01 * exact.norm().item()  # the codec is lossy, the test is not vacuous


def test_checkpoint_resume_continues_exactly(tmp_path):
    results = spawn(2, cases.resume_case, tmp_path, str(tmp_path))
    for r in results:
        for a, b in zip(r["straight"], r["resumed"]):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_error_feedback_fixes_topk_bias(tmp_path):
    world, steps = 2, 200
    results = spawn(world, cases.topk_feedback_case, tmp_path, steps)
    exact = torch.stack(cases.inputs_for(world, 2000, sigma=0.5)).double().mean(0)
    err = {ef: ((avg - exact).norm() / exact.norm()).item() for ef, avg in results[0].items()}
    # Without feedback the 95% smallest entries never arrive; with it they arrive late.
    assert err[False] > 0.3, err
    assert err[True] < 0.1, err


def test_world_size_one_is_a_no_op(tmp_path):
    (r,) = spawn(1, cases.world_one_case, tmp_path)
    assert r["world"] == 1 and r["bytes_sent"] == 0
    assert torch.equal(r["x"], r["y"])


def test_hook_returns_before_communication_completes(tmp_path):
    r0 = spawn(2, cases.async_case, tmp_path)[0]
    assert r0["submit_s"] < 0.2 and not r0["done_early"], r0
    assert r0["done_s"] > 0.5, r0  # it waited for rank 1, on the worker thread


def test_reduce_side_error_feedback(tmp_path):
    world, steps = 3, 150
    results = spawn(world, cases.reduce_feedback_case, tmp_path, steps)
    exact = torch.stack(cases.inputs_for(world, 3000, sigma=0.5)).double().mean(0)
    err = {ef: ((avg - exact).norm() / exact.norm()).item() for ef, avg in results[0].items()}
    assert err[False] > 0.3, err  # TopK(0.1) of the mean drops most of it, every step
    assert err["reduce"] < 0.1, err


def test_ranks_with_different_settings_fail_at_construction(tmp_path):
    messages = spawn(2, cases.mismatch_case, tmp_path)
    for m in messages:
        assert "different settings" in m and "FPCodec(bits=6" in m and "FPCodec(bits=5" in m


def test_auto_collective_follows_payload_sizes(tmp_path):
    """At N = 4 a bucket starts two-phase and is re-decided at each refit from the sizes every
    rank measured: a pruned phase 1 whose mean is re-encoded dense sends fewer bytes by
    all-gather; PruneCodec(0.85) (its default reduce codec) and FPCodec(6) stay two-phase; a
    forced choice is never changed."""
    world = 4
    results = spawn(world, cases.auto_collective_case, tmp_path, str(tmp_path))
    r0 = results[0]
    want = {"dense_mean": "allgather", "prune85": "two_phase", "fp6": "two_phase", "forced": "two_phase"}
    for name, chosen in want.items():
        steps = r0[name]["steps"]
        assert steps[0]["collective"] == "two_phase", name
        assert [s["collective"] for s in steps[1:]] == [chosen] * 3, (name, [s["collective"] for s in steps])
        if name != "forced":
            assert r0[name]["saved_collectives"] == {0: chosen}, name
        for r in range(world):  # every rank chose the same and holds the same bits
            for s, s0 in zip(results[r][name]["steps"], steps):
                assert s["collective"] == s0["collective"]
                assert torch.equal(s["y"].view(torch.int32), s0["y"].view(torch.int32)), (name, r)
            # a restored state continues exactly, with the saved choice
            for y, s in zip(results[r][name]["resumed"], results[r][name]["steps"][2:]):
                assert torch.equal(y.view(torch.int32), s["y"].view(torch.int32)), (name, r)
        for r in range(world):
            for s in results[r][name]["steps"]:
                b = s["bucket"]
                if s["collective"] == "allgather":
                    expected = (world - 1) * b["payload_bytes"]
                    exchanged = 0 if name == "fp6" else 1
                else:
                    expected = sum(p for j, p in enumerate(b["shard_payload_bytes"]) if j != r) \
                        + (world - 1) * b["reduce_payload_bytes"]
                    exchanged = {"fp6": 0, "prune85": 2}.get(name, 1)  # FPCodec(8) phase 2: fixed
                # a step that re-decides by size adds one all-reduce of two float64 (variable sizes)
                probe = "probe_bytes" in b
                assert probe == (name in ("dense_mean", "prune85") and s is not results[r][name]["steps"][1]
                                 and s is not results[r][name]["steps"][3]), (name, r)
                assert s["bytes"] == expected + (b["probe_bytes"] if probe else 0), (name, r)
                assert s["messages"] == expected_messages(s["collective"], world, exchanged) \
                    + (expected_messages("allreduce", world) if probe else 0), (name, r)
    # The choice is the cheaper one: compare the measured bytes of the two collectives.
    ag = statistics.fmean(s["bytes"] for s in r0["dense_mean"]["steps"][1:])
    tp = r0["forced"]["steps"][1]["bytes"]
    assert ag < 0.9 * tp, (ag, tp)
