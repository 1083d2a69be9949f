"""gradcomp.comm.fsdp on spawned gloo ranks: FSDP2 reduce-scatter, HSDP, resume, failures."""

import pytest
import torch

import gradcomp
from gradcomp.comm.collectives import expected_bytes_sent, expected_messages

from . import fsdp_cases
from .cases import rank_input
from .harness import spawn

SCALE = {"avg": None, "sum": 1.0, "premul": 0.25}


def test_reduce_scatter_world_three(tmp_path):
    _check_direct(3, spawn(3, fsdp_cases.direct_cases, tmp_path, timeout=120))


def _check_feedback(world: int, results: list) -> None:
    x = [rank_input(world * 500, q) for q in range(world)]
    for r in range(world):
        rows = results[r]["feedback"]
        assert [row["steps"] for row in rows] == [1, 2, 3, 4, 5, 6]
        assert [row["compressed"] for row in rows] == [False, True, True, True, True, True]  # warm-up 1
        mine = torch.stack([q[r * 500:(r + 1) * 500] for q in x]).double()
        # the warm-up is a dense fp32 reduce-scatter: within a few float32 ulps of sum |x_i| / N
        assert ((rows[0]["y"].double() - mine.mean(0)).abs() <= 4 * 2.0**-24 * mine.abs().sum(0) / world).all()
        # Refits every 2 compressed steps: x*8 keeps the old plan once, then the refit moves the
        # power-of-two scale by exactly 3.
        assert rows[2]["scale"] == rows[1]["scale"] and rows[3]["scale"] == rows[1]["scale"] + 3
        assert rows[0]["residual"] is None and rows[1]["residual"] is not None
        assert not torch.equal(rows[3]["residual"], rows[2]["residual"])  # committed each step
        # The inf step: rank 0's shard is NaN, the others finite, every rank counts it and keeps
        # the previous step's residual (the step's own is discarded everywhere).
        assert rows[4]["nonfinite_steps"] == 1 and rows[5]["nonfinite_steps"] == 1
        assert rows[4]["y"].isnan().all() if r == 0 else rows[4]["y"].isfinite().all()
        assert torch.equal(rows[4]["residual"], rows[3]["residual"])
        assert rows[5]["y"].isfinite().all() and not torch.equal(rows[5]["residual"], rows[4]["residual"])


def _check_direct(world: int, results: list) -> None:
    _check_feedback(world, results)
    codecs = fsdp_cases._codecs()
    assert all(r["identity_equal"] for r in results)  # the dense path is FSDP's reduce-scatter
    for key in results[0]:
        if key in ("identity_equal", "feedback"):
            continue
        name, s, dtype, op = key
        codec = codecs[name]
        bf16 = dtype == str(torch.bfloat16)
        xs = torch.stack([rank_input(world * s, q).to(torch.bfloat16 if bf16 else torch.float32).double()
                          for q in range(world)])
        scale = SCALE[op] if SCALE[op] is not None else 1 / world
        for r in range(world):
            rr = results[r][key]
            y = rr["y"]
            assert y.dtype == (torch.bfloat16 if bf16 else torch.float32) and y.shape == (s,), key
            # Bytes: every shard but this rank's own went out; fixed-size codecs exactly the
            # cost model's (N-1)/N of the payload.
            shards = rr["unit"]["shard_payload_bytes"]
            assert rr["bytes"] == sum(b for j, b in enumerate(shards) if j != r), (key, r)
            assert rr["unit"]["payload_bytes"] == sum(shards)
            variable = codec.wire_bytes(1) is None
            assert rr["unit"]["messages"] == expected_messages("reduce_scatter", world, int(variable))
            if not variable:
                assert shards == [codec.wire_bytes(s)] * world
                assert rr["bytes"] == expected_bytes_sent("reduce_scatter", world, 4 * world * s, sum(shards))
            if s < 1001:
                continue
            exact = xs[:, r * s:(r + 1) * s].sum(0) * scale
            err = ((y.double() - exact).norm() / exact.norm()).item()
            fmt = rr["unit"]["phase1"].get("format")
            if name.startswith("fp"):  # one quantization stage (no re-encode), plus bf16's output rounding
                m = gradcomp.FPFormat.from_name(fmt).man_bits
                bound = 2.0 ** -(m + (1 if codec.rounding == "nearest" else 0)) + (2.0**-8 if bf16 else 0)
                assert err <= bound, (key, r, err, bound)
            else:
                assert err < 0.9, (key, r, err)  # sparse codecs: most of the signal gets through


def _check_hsdp(h: dict) -> None:
    assert h["hsdp_2d_error"] and "set_all_reduce_hook" in h["hsdp_2d_error"]
    native = h["native"]["full"]
    for name in ("native", "native_rs_fp6", "identity", "fp6", "prune_fp"):
        assert h[name]["replicas_equal"], name  # replicas of a shard hold the same bits
    assert torch.equal(h["identity"]["full"], native)  # dense replica all-reduce == FSDP's own
    for name, tol in (("native_rs_fp6", 0.02), ("fp6", 0.02), ("prune_fp", 0.2)):
        rel = ((h[name]["full"] - native).norm() / native.norm()).item()
        assert 0 < rel < tol, (name, rel)  # compressed (not bit-equal), yet close after 5 steps
    for name in ("fp6", "prune_fp"):
        st = h[name]["stats"]
        assert st["replica_collective"] == "allgather"
        for unit in st["units"].values():  # all-gather of the shard's payload to the other replica
            assert unit["replica"]["bytes_sent"] == (2 - 1) * unit["replica"]["payload_bytes"]
        assert st["replica_bytes_sent"] < st["replica_dense_bytes"] / 2
    # Each unit is one Linear; its shard (of 2) holds the padded dim-0 half of the weight, then of
    # the bias: per-tensor plans send them as two segments of one SEGMENTS payload.
    from gradcomp.codecs.segments import segments_wire_bytes

    expected = {}
    for out_f, in_f in ((37, 64), (23, 37), (10, 23)):
        half = -(-out_f // 2)
        sizes = [half * in_f, half]
        expected[2 * sum(sizes)] = segments_wire_bytes([gradcomp.codecs.FPCodec(6).wire_bytes(n) for n in sizes])
    fp6 = h["fp6"]["stats"]["units"]
    assert all(u["replica"]["payload_bytes"] == expected[u["numel"]] for u in fp6.values()), fp6
    assert h["native_rs_fp6"]["stats"]["replica_bytes_sent"] == 0  # native HSDP: FSDP's own all-reduce


def test_world_four_and_hsdp(tmp_path):
    results = spawn(4, fsdp_cases.world4_case, tmp_path, timeout=240)
    _check_direct(4, [r["direct"] for r in results])
    for r in results:
        _check_hsdp(r["hsdp"])


def test_world_two_training_resume_errors_and_stall(tmp_path):
    results = spawn(2, fsdp_cases.world2_case, tmp_path, 12, 3, 2.0, timeout=240)
    _check_direct(2, [r["direct"] for r in results])
    train = [r["train"] for r in results]
    t = train[0]
    # IdentityCodec is FSDP2's default reduce-scatter bit for bit, fp32 and bf16 reduce dtype.
    for name, ref in (("identity", "default"), ("identity_bf16", "default_bf16")):
        for r in range(2):
            assert torch.equal(train[r][name]["params"], train[r][ref]["params_short"]), name
            steps = train[r][name]["steps"]
            assert torch.equal(train[r][name]["losses"], train[r][ref]["losses"][:steps]), name
    # Compressed training ends within 1 point of FSDP2's default (the DDP tests' limit).
    assert t["default"]["acc"] > 0.93, t["default"]["acc"]
    for name in ("fp6", "prune_fp"):
        assert t[name]["acc"] >= t["default"]["acc"] - 0.01, (name, t[name]["acc"], t["default"]["acc"])
    assert t["fp6_bf16"]["acc"] >= t["default_bf16"]["acc"] - 0.01
    assert t["fp6"]["stats"]["bits_per_element"] <= 6.2 + 0.4  # FSDP's padding counts too
    assert t["prune_fp"]["stats"]["bits_per_element"] <= 3.0
    for r in range(2):
        for name, run in train[r].items():
            assert run["consistent"], (r, name)  # all-gathered parameters identical on every rank
            st = run["stats"]
            if st is not None and name.startswith(("fp6", "prune_fp")):
                dense_elem = 2 if name.endswith("bf16") else 4  # what FSDP's reduce-scatter sends per element
                assert 0 < st["bytes_sent"] < st["dense_bytes"] * 1.2 / dense_elem, (name, st["bytes_sent"])
                assert st["steps"] == run["steps"]
                if name == "fp6":  # fixed size: (N-1)/N of the payload, exactly, per unit
                    for u in st["units"].values():
                        assert u["bytes_sent"] == expected_bytes_sent("reduce_scatter", 2, 4 * u["numel"],
                                                                      u["payload_bytes"])
        assert train[r]["fp6_bf16"]["stats"]["units"][0]["dtype"] == "bfloat16"
    # Resume: 3 + 3 steps from a checkpoint (model, optimizer, gradcomp state) == 6 straight.
    for r in range(2):
        res = results[r]["resume"]
        assert res["round_trip"] and res["resumed_equal"] and res["steps"] == 6, res
        assert res["residual_keys"] == ["0/1", "1/1", "2/1"]
        assert res["ops_force_sum_False"] == ["avg"] and res["ops_force_sum_True"] == ["sum"]
        assert res["force_sum_equal"]  # sum, then FSDP's divide: the bits of the averaged path
        errors = res["errors"]
        assert all(errors[k] for k in errors), errors  # each raised ValueError
        assert "fully_shard" in errors["not_fsdp"] and "float16" in errors["fp16"]
        assert "different settings" in errors["ranks_differ"]
    # A stalled peer: rank 0's reduce-scatter fails after the state's timeout, later calls at once.
    stall = results[0]["stall"]
    assert stall["error"] and "gradcomp.comm.fsdp" in stall["error"] and "2 s" in stall["error"], stall
    assert 1.5 < stall["seconds"] < 10, stall
    assert stall["later"] and "earlier collective" in stall["later"], stall


def test_train_loop_fsdp_bytes_and_bit_exact_resume(tmp_path):
    from . import train_cases

    base = dict(model="resnet2d", dataset="digits", width=8, batch_size=32, epochs=1, lr=0.2, seed=1,
                progress=False, transport="fsdp")
    prune_fp = dict(base, codec="prune-fp", sparsity=0.85, bits=6, checkpoint_every=7)
    ck_a, ck_b = tmp_path / "a", tmp_path / "b"
    runs = [("none", dict(base, codec="none"), None),
            ("full", dict(prune_fp, checkpoint_dir=str(ck_a)), None),
            ("crash", dict(prune_fp, checkpoint_dir=str(ck_b)), 17),
            ("resumed", dict(prune_fp, checkpoint_dir=str(ck_b), resume=True), None)]
    r0, r1 = spawn(2, train_cases.run_many, tmp_path, runs, timeout=240)
    for name in ("none", "full", "resumed"):
        assert r0[name]["final_accuracy"] == r1[name]["final_accuracy"], name
        assert r0[name]["steps"] == 1437 // 64
        assert r0[name]["final_accuracy"] > 0.6, (name, r0[name]["final_accuracy"])
    none, full, res = r0["none"], r0["full"], r0["resumed"]
    assert none["bits_per_element"] == 32 and none["bytes_source"].startswith("FSDP reduce-scatter model")
    assert full["bytes_source"].startswith("measured by gradcomp.comm.fsdp")
    assert full["bits_per_element"] < 3.0 and full["bytes_sent_per_step"] < 0.25 * none["bytes_sent_per_step"]
    assert r0["crash"] == {"crashed": True} and res["resumed_from_step"] == 14 and res["restarts"] == 1
    # FSDP has no bucket rebuild: a resumed compressed run continues bit for bit (same keys, fits,
    # residuals, sharded optimizer state), so the final checkpoints are equal.
    a, b = train_cases.final_checkpoint_params(str(ck_a)), train_cases.final_checkpoint_params(str(ck_b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res["final_accuracy"] == full["final_accuracy"]


def test_killed_peer_fails_at_once(tmp_path):
    """A killed peer is noticed at once (gloo sees the connection close), long before the state's
    60 s timeout; the survivor's backward raises gradcomp's error and its process exits."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=fsdp_cases.killed_peer_rank, args=(r, 2, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    try:
        procs[0].join(90)
        assert not procs[0].is_alive(), "the surviving rank neither failed nor exited (a hang)"
        assert procs[0].exitcode == 0
        res = torch.load(tmp_path / "dead0.pt")
        assert res.get("step") == 2 and res["seconds"] < 10, res
        assert "gradcomp.comm.fsdp: reduce-scatter of unit" in res["message"] and "60 s" in res["message"], res
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
