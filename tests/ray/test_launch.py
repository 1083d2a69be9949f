"""gradcomp-launch end to end on Ray: embedded local Ray, and a 2-node cluster with a killed worker.

Each test starts a Ray instance (about 20-60 s on 2 cores), so each covers several points.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e .[ray])")

RESULT_KEYS = {"final_accuracy", "bytes_sent_per_step", "bits_per_element", "steps", "wall_seconds",
               "config", "environment", "restarts", "resumed_from_step", "worker_nodes"}


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        if text in cmd:
            found.append(cmd)
    return found


def _launch_bin() -> str:
    exe = Path(sys.executable).with_name("gradcomp-launch")
    return str(exe) if exe.exists() else "gradcomp-launch"


def test_embedded_ray_st_prune_fp(tmp_path):
    """The README main job's configuration, shortened: embedded Ray, ST 2-bit, prune-fp hook."""
    out = tmp_path / "run"
    env = dict(os.environ, RAY_DEDUP_LOGS="1")
    proc = subprocess.run(
        [_launch_bin(), "--workers", "2", "--codec", "prune-fp", "--act-bits", "2", "--dataset", "mnist1d",
         "--model", "resnet1d", "--width", "16", "--epochs", "1", "--max-steps", "12", "--checkpoint-every", "5",
         "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the terminal shows the log's location, the progress bar and the table, and nothing of Ray's:
    # its report lines (whole JSON histories), controller messages and logger lines go to ray.log
    shown = proc.stdout + proc.stderr
    for ray_text in ("Reporting training result", "TrainingReport(", "(RayTrainWorker", "(TrainController",
                     "Started a local Ray instance"):
        assert ray_text not in shown, shown[-4000:]
    assert f"Ray's own output goes to {out / 'ray.log'}" in proc.stderr
    assert "12/12" in proc.stderr  # the bar, redrawn by the driver
    ray_log = (out / "ray.log").read_text()
    assert "Reporting training result" in ray_log and "(TrainController" in ray_log
    res = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= res.keys()
    assert res["steps"] == 12 and res["world_size"] == 2 and res["restarts"] == 0
    assert res["config"]["act_bits"] == 2 and res["config"]["codec"] == "prune-fp"
    assert res["bytes_source"] == "measured by the hook"
    assert 0 < res["bits_per_element"] < 2.5  # PruneFP(0.85, 6) on the wire, headers included
    assert res["launcher"]["address"] == "embedded"
    # hygiene: the embedded Ray's session directory is gone, and so are its processes
    assert res["launcher"]["ray_temp_dir"] and not Path(res["launcher"]["ray_temp_dir"]).exists()
    assert _processes_mentioning(res["launcher"]["ray_temp_dir"]) == []
    assert "| final accuracy" in proc.stdout and "| bits per element" in proc.stdout
    # checkpoints: ours (latest pointer, every rank's compression state) and Ray's copies
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in (out / "checkpoints" / latest).iterdir()) == [
        "compression-rank0.pt", "compression-rank1.pt", "model.pt"]
    assert any((out / "ray" / "train").glob("step-*/model.pt"))
    # metrics as JSON lines, from rank 0
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end"


def test_embedded_ray_fsdp_prune_fp(tmp_path):
    """``--strategy fsdp``: FSDP2 in the Ray Train workers, gradcomp's compressed reduce-scatter."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [_launch_bin(), "--workers", "2", "--strategy", "fsdp", "--codec", "prune-fp", "--dataset", "mnist1d",
         "--model", "resnet1d", "--width", "16", "--epochs", "1", "--max-steps", "8", "--quiet",
         "--output", str(out)],
        capture_output=True, text=True, env=dict(os.environ, RAY_DEDUP_LOGS="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 8 and res["world_size"] == 2 and res["config"]["transport"] == "fsdp"
    assert res["bytes_source"].startswith("measured by gradcomp.comm.fsdp") and res["collective"] == "reduce_scatter"
    assert 0 < res["bits_per_element"] < 2.5 and 0 <= res["final_accuracy"] <= 1
    # under a quarter of FSDP2's fp32 reduce-scatter, (N-1)/N * 4 bytes * parameters, warm-up step included
    assert 0 < res["bytes_sent_per_step"] < 0.25 * (1 / 2) * 4 * res["parameters"]
    assert sorted(p.name for p in (out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip())
                  .iterdir()) == ["compression-rank0.pt", "compression-rank1.pt", "model.pt"]


def test_two_nodes_strict_spread_survives_a_killed_worker(tmp_path, monkeypatch):
    """Two Ray nodes on this machine, one worker per node; rank 1 is SIGKILLed at step 12 and the
    group restarts from the step-10 checkpoint and finishes."""
    from ray.cluster_utils import Cluster

    from gradcomp.app.launch import main

    temp = tempfile.mkdtemp(prefix="gcrt-")  # short: Ray's socket paths have a length limit
    monkeypatch.setenv("RAY_TMPDIR", temp)  # every Ray file of this cluster goes there, then away
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        # three workers, one per node, on two nodes: bounded by --startup-timeout (Ray Train alone
        # retries placing the group every 60 s forever), exit 1 with what to check
        t0 = time.monotonic()
        rc = main(["--address", cluster.address, "--workers", "3", "--placement", "STRICT_SPREAD",
                   "--codec", "fp", "--width", "8", "--epochs", "1", "--max-steps", "5", "--quiet",
                   "--startup-timeout", "5", "--max-failures", "0", "--output", str(tmp_path / "unplaceable")])
        took = time.monotonic() - t0
        assert rc == 1 and took < 60, (rc, took)
        ray.shutdown()
        print(f"unplaceable STRICT_SPREAD: exit 1 after {took:.1f} s")
        out = tmp_path / "run"
        rc = main(["--address", cluster.address, "--workers", "2", "--placement", "STRICT_SPREAD",
                   "--codec", "fp", "--bits", "6", "--dataset", "mnist1d", "--width", "16", "--epochs", "1",
                   "--max-steps", "20", "--checkpoint-every", "5", "--inject-fault", "1:12",
                   "--max-failures", "2", "--quiet", "--output", str(out)])
        assert rc == 0
        res = json.loads((out / "results.json").read_text())
        assert len(set(res["worker_nodes"])) == 2, res["worker_nodes"]  # one worker per node
        assert res["launcher"]["address"] == cluster.address
        assert res["steps"] == 20  # finished
        assert res["restarts"] == 1  # and says that it restarted
        # it lost at most the steps since the last checkpoint (every 5 steps, killed at 12)
        assert res["resumed_from_step"] == 10
        assert res["final_accuracy"] > 0.2  # learned something (10 classes)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
