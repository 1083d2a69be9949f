"""Faults around train() on 2 gloo ranks: a stalled rank, ranks that disagree on the resume point."""

from __future__ import annotations

import socket
import time

import pytest

from . import train_cases
from .harness import spawn

BASE = dict(model="resnet2d", dataset="digits", width=8, batch_size=32, lr=0.2, seed=1, progress=False,
            device="cpu")


def test_ranks_agree_on_the_resume_point(tmp_path):
    """A resume with rank 1's compression-rank1.pt deleted (then truncated) raises a
    CheckpointError naming that file on every rank, before training and without touching the
    checkpoint; with the file back, the same resume works."""
    ck = tmp_path / "ck"
    cfg = dict(BASE, codec="prune-fp", sparsity=0.85, bits=6, epochs=1, max_steps=10, checkpoint_every=4,
               checkpoint_dir=str(ck))
    t = time.perf_counter()
    r0, r1 = spawn(2, train_cases.resume_disagreement, tmp_path, cfg, 9, timeout=240)
    print(f"\nresume agreement: {time.perf_counter() - t:.1f} s")
    victim = r0["victim"]
    assert victim.endswith("step-00000008/compression-rank1.pt")
    for r, res in enumerate((r0, r1)):
        assert res["crash"] == {"crashed": True}
        for attempt in ("missing", "truncated"):
            e = res[attempt]
            assert not e["ok"], (r, attempt, e)
            assert e["type"] == "CheckpointError" and e["is_value_error"], (r, attempt, e)
            assert victim in e["message"], (r, attempt, e["message"])
            assert e["unchanged"], (r, attempt)
        assert "is missing" in res["missing"]["message"], res["missing"]["message"]
        assert "cannot be loaded" in res["truncated"]["message"], res["truncated"]["message"]
        assert res["intact"] == {"ok": True, "resumed_from_step": 8, "steps": 10}, (r, res["intact"])
    assert "rank 1 cannot resume from it" in r0["truncated"]["message"]
    print("missing:", r0["missing"]["message"][:400])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode, codec, model", [("owned", "none", "resnet2d"), ("owned", "fp", "resnet2d"),
                                               ("external", "fp", "resnet2d"), ("external", "fp", "mlp")])
def test_stalled_rank_fails_the_others_within_the_timeout(mode, codec, model, tmp_path):
    """Rank 1 stops itself (SIGSTOP) after step 3; rank 0's train() raises about
    ``TrainConfig.timeout`` later, naming the step, the rank and the timeout, and its process
    exits. ``owned``: train() made the group with init_process_group(timeout=...); ``external``:
    the default group was created elsewhere with torch's 30-minute default, and train()'s own
    group (DDP's buffer broadcast and all-reduce) and the hook's group give up instead. The
    ``mlp`` has no buffers, so DDP broadcasts nothing in forward and it is the hook's own
    collective that times out (the message says so)."""
    import torch
    import torch.multiprocessing as mp

    timeout, slack = 5.0, 10.0
    cfg = dict(BASE, model=model, codec=codec, epochs=1, max_steps=40, timeout=timeout)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=train_cases.stall_rank, args=(r, 2, str(tmp_path), mode, cfg, port, 3))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        procs[0].join(90 + timeout + slack)
        assert not procs[0].is_alive(), "rank 0 neither failed nor exited (a hang)"
        assert procs[0].exitcode == 0
        res = torch.load(tmp_path / "stall0.pt")
        print(f"\n{mode}/{codec}/{model}: rank 0 raised {res.get('seconds', float('nan')):.2f} s after its step 3: "
              f"{(res['error'] or '')[:400]}")
        assert res["error"] is not None, res
        assert res["last_step"] == 3, res
        assert timeout * 0.9 <= res["seconds"] < timeout + slack, res
        msg = res["error"]
        assert msg.startswith("RuntimeError: gradcomp.app.train: step 4 failed on rank 0 of 2"), msg
        assert "TrainConfig.timeout=5 s" in msg and "stalled" in msg, msg
        if model == "mlp":
            assert "gradcomp: reducing bucket" in msg and "timeout, 5 s" in msg, msg  # the hook's group
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
