"""The training loop over Horovod: horovodrun and gradcomp-launch --transport horovod give the run
the DDP hook path gives (same codec, seed and data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

pytest.importorskip("horovod.torch", reason="horovod.torch does not import; build it with launch/build_horovod.sh")

from distributed import train_cases  # noqa: E402
from distributed.harness import spawn  # noqa: E402

CONFIG = dict(model="resnet1d", dataset="mnist1d", width=16, codec="fp", bits=6, epochs=1, max_steps=20,
              seed=0, progress=False)


def test_horovodrun_and_launcher_match_the_ddp_hook(tmp_path):
    bin_dir = Path(sys.executable).parent
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(dict(CONFIG, transport="horovod")))
    out = tmp_path / "hvd.json"
    proc = subprocess.run([str(bin_dir / "horovodrun"), "-np", "2", "--gloo", sys.executable, "-m", "gradcomp.app.train",
                           str(cfg), "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hvd_run = json.loads(out.read_text())

    launch_out = tmp_path / "launch"
    proc = subprocess.run([str(bin_dir / "gradcomp-launch"), "--transport", "horovod", "--workers", "2", "--codec", "fp",
                           "--bits", "6", "--width", "16", "--epochs", "1", "--max-steps", "20", "--quiet",
                           "--output", str(launch_out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launched = json.loads((launch_out / "results.json").read_text())
    assert launched["launcher"]["transport"] == "horovod.ray.RayExecutor"

    ddp = spawn(2, train_cases.run_many, tmp_path, [("ddp", dict(CONFIG), None)])[0]["ddp"]
    for run in (hvd_run, launched):
        assert run["steps"] == ddp["steps"] == 20 and run["world_size"] == 2
        # Horovod sends the same payloads as the DDP hook: same bytes, same bits, same model.
        assert run["bytes_sent_per_step"] == pytest.approx(ddp["bytes_sent_per_step"], rel=1e-9)
        assert run["bits_per_element"] == pytest.approx(ddp["bits_per_element"], rel=1e-9)
        assert run["final_accuracy"] == ddp["final_accuracy"]
        assert run["final_loss"] == pytest.approx(ddp["final_loss"], rel=1e-4)
