"""gradcomp's hook under trainers: Lightning (GradcompDDPStrategy), Accelerate, torchrun.

Each training runs as its own script on 2 CPU ranks (gloo), the way a user launches it; every
rank saves its hook statistics, final parameters and losses, and the test compares the ranks:
the hook ran and sent bytes on every rank, the replicas are bit-identical, the loss fell. Every
launch runs in its own session with a timeout, and a launch that overruns is killed with all
its ranks, so a hang fails the test instead of blocking the suite. About 10 s per launch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
LIGHTNING_SCRIPT = Path(__file__).with_name("lightning_ddp_script.py")
LAUNCH_TIMEOUT_S = 120


def run_launch(cmd: list[str], env_extra: dict[str, str] | None = None,
               timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a new session; on timeout kill the session (launcher and every rank) and fail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd} ran over {timeout} s and was killed; output:\n{out[-6000:]}")
    finally:
        try:  # ranks left behind by a launcher that exited early
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}; output:\n{out[-6000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def need(module: str) -> None:
    """Skip without the optional extra, except in CI (``CI`` set), where run.sh installs every
    extra and a missing one must fail rather than hide the test."""
    if os.environ.get("CI"):
        __import__(module)
    else:
        pytest.importorskip(module, reason=f"pip install -e .[{module}]")


def load_ranks(outdir: Path, prefix: str = "", world: int = 2) -> list[dict]:
    files = [outdir / f"{prefix}rank{r}.pt" for r in range(world)]
    missing = [str(f) for f in files if not f.exists()]
    assert not missing, f"ranks wrote no results: {missing}"
    return [torch.load(f, weights_only=False) for f in files]


def check_compressed_training(ranks: list[dict], steps: int) -> None:
    """The hook ran on every rank, the replicas agree bit for bit, and the loss fell."""
    for r, res in enumerate(ranks):
        st = res["stats"]
        assert st["steps"] == steps, (r, st["steps"])
        assert st["world_size"] == 2, (r, st["world_size"])
        assert st["bytes_sent"] > 0 and st["compression_ratio"] > 1, (r, st)
        assert len(res["losses"]) == steps
    for r, res in enumerate(ranks[1:], 1):
        assert torch.equal(res["params"], ranks[0]["params"]), f"rank {r}'s replica differs from rank 0's"
    first = sum(sum(res["losses"][:5]) for res in ranks) / (5 * len(ranks))
    last = sum(sum(res["losses"][-5:]) for res in ranks) / (5 * len(ranks))
    assert last < 0.8 * first, (first, last)


# ------------------------------------------------------------------------------------ Lightning


def test_lightning_gradcomp_strategy_on_cpu(tmp_path):
    need("lightning")
    run_launch([sys.executable, str(LIGHTNING_SCRIPT), str(tmp_path), "gradcomp"])
    check_compressed_training(load_ranks(tmp_path, "gradcomp-"), steps=30)


def test_lightning_own_ddp_strategy_skips_the_hook_on_cpu(tmp_path):
    """Why GradcompDDPStrategy exists: Lightning's DDPStrategy registers comm hooks on CUDA only."""
    need("lightning")
    run_launch([sys.executable, str(LIGHTNING_SCRIPT), str(tmp_path), "plain"])
    for res in load_ranks(tmp_path, "plain-"):
        assert res["stats"]["steps"] == 0 and res["stats"]["bytes_sent"] == 0
        assert len(res["losses"]) == 30  # it trained, with plain fp32 all-reduce


def test_lightning_strategy_arguments():
    need("lightning")
    import gradcomp
    from gradcomp.codecs import FPCodec
    from gradcomp.integrations.lightning import GradcompDDPStrategy

    s = GradcompDDPStrategy(codec=FPCodec(6), error_feedback=True, refit_every=5, find_unused_parameters=True)
    assert isinstance(s.state, gradcomp.CompressionState)
    assert s.state.worker_feedback and s.state.refit_every == 5
    assert s._ddp_kwargs == {"find_unused_parameters": True}  # the rest went to DDP
    assert s.stats()["steps"] == 0
    s = GradcompDDPStrategy(codec=FPCodec(6), timeout=timedelta(seconds=45))
    assert s._timeout == timedelta(seconds=45)  # Lightning's group timeout, which the hook inherits
    state = gradcomp.CompressionState(FPCodec(4))
    assert GradcompDDPStrategy(state=state).state is state
    for kwargs, match in [
        ({}, "exactly one of"),
        ({"codec": FPCodec(6), "state": state}, "exactly one of"),
        ({"codec": "fp6"}, "must be a gradcomp.codecs.Codec"),
        ({"state": FPCodec(6)}, "must be a gradcomp.CompressionState"),
        ({"state": state, "seed": 3}, "CompressionState options"),
        ({"codec": FPCodec(6), "process_group": None}, "process_group"),
        ({"codec": FPCodec(6), "ddp_comm_hook": gradcomp.compression_hook}, "ddp_comm_hook"),
        ({"codec": FPCodec(6), "warmup_steps": -1}, "warmup_steps"),  # CompressionState's check
    ]:
        with pytest.raises(ValueError, match=match):
            GradcompDDPStrategy(**kwargs)


def test_lightning_module_without_lightning_says_how_to_install():
    code = ("import sys; sys.modules['lightning'] = None\n"  # None: `import lightning` fails
            "try:\n    import gradcomp.integrations.lightning\n"
            "except ImportError as e:\n    print(e)\nelse:\n    raise SystemExit('imported')\n"
            "import gradcomp, gradcomp.integrations  # these never need lightning\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pip install gradcomp[lightning]" in proc.stdout


# ------------------------------------------------------------------------- Accelerate, torchrun


def test_accelerate_example_on_two_cpu_processes(tmp_path):
    need("accelerate")
    out = tmp_path / "out"
    # --multi_gpu is accelerate's torchrun launcher; ACCELERATE_USE_CPU=1 makes the ranks gloo/CPU.
    # HF_HOME in tmp: no accelerate config of this machine's user is read.
    proc = run_launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_port", "0", str(EXAMPLES / "accelerate_ddp.py"), str(out)],
                      env_extra={"ACCELERATE_USE_CPU": "1", "HF_HOME": str(tmp_path / "hf")})
    check_compressed_training(load_ranks(out), steps=30)
    assert "rank 0: 30 steps" in proc.stdout and "rank 1: 30 steps" in proc.stdout


def test_torchrun_example_on_two_cpu_processes(tmp_path):
    out = tmp_path / "out"
    proc = run_launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       str(EXAMPLES / "torchrun_ddp.py"), str(out)])
    check_compressed_training(load_ranks(out), steps=30)
    assert "rank 0: 30 steps" in proc.stdout and "rank 1: 30 steps" in proc.stdout
