"""DDP compatibility: every DDP mode x every compressing codec, at world sizes 2 and 3.

Each (world, codec) is one spawn that runs every mode with the codec and the mode's fp32 (no
hook) reference, under a timeout (a hang fails the test; it never blocks CI). Every cell:
replicas bit-identical, the hook ran every step, and the loss falls like the fp32 run's.
GradScaler cells inject inf on rank 1: both ranks skip exactly those steps, and with error
feedback the hook discards those steps' residuals (``nonfinite_steps``) and keeps learning.
"""

import math

import pytest

from . import compat_cases as cc
from .harness import spawn


def _final(losses: list[float]) -> float:
    tail = [v for v in losses[-3:] if math.isfinite(v)]
    return sum(tail) / len(tail)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("codec", cc.CODECS)
def test_every_ddp_mode(world, codec, tmp_path):
    cells = [(mode, name) for mode in cc.MODES for name in (None, codec)]
    results = spawn(world, cc.run_cells, tmp_path, cells, timeout=420)
    failures = []
    for mode in cc.MODES:
        ref, got = results[0][(mode, None)], results[0][(mode, codec)]
        cell = f"{mode} x {codec} @ {world}"
        hashes = {r[(mode, codec)]["hash"] for r in results}
        if len(hashes) != 1:
            failures.append(f"{cell}: replicas differ")
        for r, rr in enumerate(results):
            st = rr[(mode, codec)]["stats"]
            steps = len(rr[(mode, codec)]["losses"])
            if st["steps"] != max(len(x[(mode, codec)]["losses"]) for x in results):
                failures.append(f"{cell}: rank {r} hook ran {st['steps']} steps, trained {steps}")
        l0 = ref["losses"][0]
        drop_ref, drop = l0 - _final(ref["losses"]), l0 - _final(got["losses"])
        if not drop_ref > 0.5:
            failures.append(f"{cell}: the fp32 reference did not learn ({ref['losses']})")
        elif drop < 0.6 * drop_ref:
            failures.append(f"{cell}: loss {l0:.3f} -> {_final(got['losses']):.3f}, "
                            f"fp32 -> {_final(ref['losses']):.3f}")
        if mode.startswith("amp_inf"):
            for r, rr in enumerate(results):
                if rr[(mode, codec)]["skipped"] != list(cc.INJECT):
                    failures.append(f"{cell}: rank {r} skipped {rr[(mode, codec)]['skipped']}, "
                                    f"injected {list(cc.INJECT)}")
                if rr[(mode, codec)]["stats"]["nonfinite_steps"] != len(cc.INJECT):
                    failures.append(f"{cell}: rank {r} nonfinite_steps "
                                    f"{rr[(mode, codec)]['stats']['nonfinite_steps']}")
    seconds = {m: round(results[0][(m, codec)]["seconds"], 2) for m in cc.MODES}
    assert not failures, "\n".join(failures) + f"\nseconds per cell: {seconds}"
    finals = ", ".join(f"{m} {_final(results[0][(m, None)]['losses']):.3f}/"
                       f"{_final(results[0][(m, codec)]['losses']):.3f}" for m in cc.MODES)
    print(f"\n{codec} @ {world} (final loss fp32/codec, from {results[0][(cc.MODES[0], None)]['losses'][0]:.3f}): "
          f"{finals}; seconds per cell {seconds}")


@pytest.mark.parametrize("how,hook_timeout,within", [("kill", 60.0, 10.0), ("stop", 4.0, 15.0)])
def test_dead_or_stalled_peer_fails_in_bounded_time(how, hook_timeout, within, tmp_path):
    """A killed peer is noticed at once (gloo sees the connection close); a stopped one after the
    hook's ``timeout``. The survivor's ``backward()`` raises an error that names the cause, and
    its process exits: the hook's worker thread does not keep it alive."""
    import signal
    import time

    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=cc.dead_peer_rank, args=(r, 2, str(tmp_path), how, hook_timeout))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        procs[0].join(hook_timeout + within + 30)  # start-up, 3 steps, then the failure
        assert not procs[0].is_alive(), "the surviving rank neither failed nor exited (a hang)"
        assert procs[0].exitcode == 0
        res = torch.load(tmp_path / "dead0.pt")
        assert "message" in res, res
        assert res["step"] == 3
        assert res["seconds"] < (within if how == "kill" else hook_timeout + within), res
        if how == "stop":
            assert res["seconds"] >= hook_timeout * 0.9, res  # it was the hook group's timeout
        assert "gradcomp: reducing bucket" in res["message"] and "timeout" in res["message"], res
        print(f"\n{how}: the survivor's backward raised after {res['seconds']:.2f} s: {res['message'][:300]}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)


@pytest.mark.parametrize("world", [2, 3])
def test_error_feedback_keeps_residuals_across_a_nonfinite_step(world, tmp_path):
    results = spawn(world, cc.nonfinite_feedback_case, tmp_path, timeout=180)
    for r, rr in enumerate(results):
        for name, res in rr.items():
            assert res == {"result_nan": True, "kept": True, "finite": True,
                           "updated_later": True, "nonfinite_steps": 1}, (r, name, res)


def test_ranks_at_different_hook_steps_fail_on_every_rank(tmp_path):
    results = spawn(2, cc.mismatched_step_case, tmp_path, timeout=120)
    for r, res in enumerate(results):
        assert res["error"] and "different hook steps [5, 0]" in res["error"], (r, res)


def test_hook_errors_under_ddp_are_clear_and_do_not_abort(tmp_path):
    # spawn() fails if a rank dies or aborts (e.g. "terminate called" at exit): none may.
    results = spawn(2, cc.hook_error_case, tmp_path, timeout=120)
    for r, res in enumerate(results):
        kind, msg = res["settings"]
        assert kind == "ValueError" and "different settings" in msg and "FPCodec" in msg, (r, res)
        kind, msg = res["steps"]
        assert kind == "RuntimeError" and "ValueError: gradcomp: ranks are at different hook steps [3, 0]" in msg, (r, res)
        assert "Unable to cast" not in msg
        assert res["failure"] == "ValueError"
