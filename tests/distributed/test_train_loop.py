"""The training loop on 2 spawned gloo ranks: hooks, identical results, checkpoint and resume."""

from . import train_cases
from .harness import spawn

BASE = dict(model="resnet2d", dataset="digits", width=8, batch_size=32, epochs=2, lr=0.2, seed=1,
            progress=False)


def test_two_ranks_codecs_checkpoint_resume(tmp_path):
    ck_a, ck_b, ck_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    prune_fp = dict(BASE, codec="prune-fp", sparsity=0.85, bits=6, checkpoint_every=7)
    runs = [
        ("none", dict(BASE, codec="none"), None),
        ("fp16", dict(BASE, codec="fp16"), None),
        # the same run twice: uninterrupted, and crashed at step 17 then resumed from step 14
        ("full", dict(prune_fp, checkpoint_dir=str(ck_a), metrics_path=str(tmp_path / "a.jsonl")), None),
        ("crash", dict(prune_fp, checkpoint_dir=str(ck_b)), 17),
        ("resumed", dict(prune_fp, checkpoint_dir=str(ck_b), resume=True), None),
        ("none_crash", dict(BASE, codec="none", checkpoint_every=7, checkpoint_dir=str(ck_c)), 17),
        ("none_resumed", dict(BASE, codec="none", checkpoint_every=7, checkpoint_dir=str(ck_c), resume=True), None),
    ]
    out = spawn(2, train_cases.run_many, tmp_path, runs)
    r0, r1 = out
    for name in ("none", "fp16", "full", "resumed"):
        # every rank reports the same run (DDP keeps replicas identical; eval on the full test set)
        assert r0[name]["final_accuracy"] == r1[name]["final_accuracy"], name
        assert r0[name]["steps"] == r0["none"]["steps"] == 2 * (1437 // 64)
        assert r0[name]["final_accuracy"] > 0.85, (name, r0[name]["final_accuracy"])
    assert r0["none"]["bits_per_element"] == 32 and r0["fp16"]["bits_per_element"] == 16
    full = r0["full"]
    assert full["bytes_source"] == "measured by the hook"
    assert full["bits_per_element"] < 3.0, full
    assert full["bytes_sent_per_step"] < 0.25 * r0["none"]["bytes_sent_per_step"]
    assert full["restarts"] == 0 and full["resumed_from_step"] is None
    assert r0["crash"] == {"crashed": True}
    res = r0["resumed"]
    assert res["restarts"] == 1 and res["resumed_from_step"] == 14
    # Resuming continues the data order, LR schedule, hook step, fits and random keys. Without a
    # hook the final weights equal the uninterrupted run's bit for bit:
    assert r0["none_resumed"]["resumed_from_step"] == 14
    assert r0["none_resumed"]["final_accuracy"] == r0["none"]["final_accuracy"]
    # With a hook, the first step after a restart runs on DDP's initial bucket layout (DDP
    # reorders buckets after its first step), so stochastic rounding draws differ on that step:
    # the same distribution, not the same bits.
    assert abs(res["final_accuracy"] - full["final_accuracy"]) < 0.03
    # old checkpoints are pruned to keep_checkpoints (2), the pointer names the newest
    assert len(list(ck_a.glob("step-*"))) == 2
    assert (ck_a / "latest").read_text().strip() == f"step-{full['steps']:08d}"
    assert sorted(p.name for p in (ck_a / (ck_a / "latest").read_text().strip()).iterdir()) == [
        "compression-rank0.pt", "compression-rank1.pt", "model.pt"]
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert '"event": "start"' in lines[0] and '"event": "end"' in lines[-1]
    assert sum('"event": "epoch"' in ln for ln in lines) == 2

