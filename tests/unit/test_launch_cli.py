"""gradcomp-launch argument handling: bad input exits 2 with a message and no traceback, before Ray starts."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gradcomp.app.launch as launch
from gradcomp.app.launch import build_parser, config_from_args, format_table, main


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "positive integer"),
    (["--workers", "two"], "positive integer"),
    (["--codec", "zip"], "invalid choice"),
    (["--act-bits", "7"], "--act-bits must be an int in 1..4"),
    (["--bits", "1"], "--bits must be an int in 2..16"),
    (["--sparsity", "1.5"], "--sparsity must be a number in [0.0, 1.0)"),
    (["--sparsity", "nan"], "finite number"),
    (["--lr", "-1"], "--lr must be a number"),
    (["--dataset", "imagenet"], "invalid choice"),
    (["--transport", "horovod", "--codec", "powersgd"], "powersgd"),
    (["--strategy", "fsdp", "--codec", "powersgd"], "FSDP2 has no place for it"),
    (["--inject-fault", "5:3"], "--inject-fault rank 5 >= --workers 2"),
    (["--inject-fault", "x"], "RANK:STEP"),
    (["--address", " "], "--address is empty"),
])
def test_bad_arguments_exit_2_without_traceback(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--output", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_resume_without_checkpoint_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--resume", "--output", str(tmp_path)])
    assert exc.value.code == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    # the installed entry point, in a fresh interpreter: exit status 2 and one usage message
    proc = subprocess.run([sys.executable, "-m", "gradcomp.app.launch", "--codec", "gzip"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "invalid choice: 'gzip'" in proc.stderr and "Traceback" not in proc.stderr


def test_config_mapping_and_table(tmp_path):
    args = build_parser().parse_args(["--codec", "fp", "--bits", "5", "--act-bits", "2", "--epochs", "3"])
    cfg = config_from_args(args, tmp_path)
    assert (cfg.codec, cfg.bits, cfg.act_bits, cfg.epochs) == ("fp", 5, 2, 3)
    assert cfg.checkpoint_dir == str(tmp_path / "checkpoints") and cfg.device == "cpu"
    assert config_from_args(build_parser().parse_args(["--strategy", "fsdp"]), tmp_path).transport == "fsdp"
    table = format_table({"config": cfg.to_dict(), "final_accuracy": 0.9123, "world_size": 2, "steps": 10,
                          "bytes_sent_per_step": 1234.0, "bytes_source": "measured by the hook",
                          "bits_per_element": 1.25, "step_time_p50": 0.01, "step_time_p90": 0.02,
                          "wall_seconds": 3.0, "restarts": 1, "resumed_from_step": 5, "collective": "allgather"})
    assert "91.23 %" in table and "1.250" in table and "resumed from step 5" in table


def _previous_run(out):
    (out / "checkpoints" / "step-00000010").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step-00000010")
    (out / "ray" / "train").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")
    (out / "notes.txt").write_text("mine")  # not a run artifact: never deleted


def test_output_with_a_previous_run_needs_resume_or_overwrite(tmp_path, capsys):
    _previous_run(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["--output", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "holds a previous run" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "checkpoints" / "latest").is_file() and (tmp_path / "ray").is_dir()  # untouched
    with pytest.raises(SystemExit) as exc:
        main(["--output", str(tmp_path), "--resume", "--overwrite"])
    assert exc.value.code == 2 and "pass one" in capsys.readouterr().err


def test_overwrite_deletes_only_the_previous_runs_artifacts(tmp_path, monkeypatch):
    import gradcomp.app.launch as launch

    _previous_run(tmp_path)
    started = []

    def fake_run(args, output):  # stop where Ray would start
        started.append(sorted(p.name for p in output.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "run", fake_run)
    assert main(["--output", str(tmp_path), "--overwrite"]) == 130
    assert started == [["notes.txt"]]


# ---------------------------------------------------------------- issue 19: everything before Ray
INVALID = [  # (argv, what the one error line says) -- each used to fail only after Ray started, or with a traceback
    (["--codec", "fp", "--bits", "4", "--exp-bits", "4"], "exp_bits for 4 bits"),
    (["--codec", "prune-fp", "--bits", "4", "--exp-bits", "6"], "exp_bits for 4 bits"),
    (["--codec", "prune", "--sparsity", "0"], "sparsity must be a number in the open interval (0, 1)"),
    (["--codec", "prune-fp", "--sparsity", "0"], "sparsity must be a number in the open interval (0, 1)"),
    (["--codec", "prune", "--sparsity", "1"], "--sparsity must be a number in [0.0, 1.0)"),
    (["--num-train", "100"], "needs at least 128 training samples"),
    (["--num-train", "40", "--batch-size", "16", "--workers", "3"], "needs at least 48 training samples"),
    (["--dataset", "digits"], "resnet1d takes input_shape (C, L)"),
    (["--address", "foo:bar"], "the port must be a number in 1..65535"),
    (["--address", "127.0.0.1:70000"], "the port must be a number in 1..65535"),
    (["--address", "http://head:6379"], "expected HOST:PORT"),
    (["--address", ":6379"], "expected HOST:PORT"),
    (["--address", "head"], "expected HOST:PORT"),
    (["--placement", "STRICT_SPREAD"], "the embedded Ray is one node"),
    (["--timeout", "0"], "positive number of seconds"),
    (["--timeout", "nan"], "positive number of seconds"),
    (["--startup-timeout", "-1"], "positive number of seconds"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv, message", INVALID, ids=[" ".join(a) for a, _ in INVALID])
def test_invalid_arguments_exit_2_before_ray(argv, message, tmp_path, capsys, monkeypatch):
    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(launch, "run", no_ray)
    monkeypatch.setattr(launch, "_start_ray", no_ray)
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--output", str(tmp_path / "out")])
    assert time.monotonic() - t0 < 10
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("gradcomp-launch: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["under-a-file", "proc", "read-only-dir"])
def test_unusable_output_is_a_usage_error(where, tmp_path, capsys):
    if where == "under-a-file":
        (tmp_path / "f").write_text("")
        out, message = tmp_path / "f" / "out", "which is a file, not a directory"
    elif where == "proc":
        out, message = Path("/proc/gradcomp-none/out"), "cannot create anything in /proc"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0555 directory")
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        out, message = ro / "out", "cannot create anything in"
    with pytest.raises(SystemExit) as exc:
        main(["--output", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:1", "connection refused"),
    ("ray://127.0.0.1:1", "Ray client server at 127.0.0.1:1"),
    ("gradcomp-no-such-host.invalid:6379", "cannot resolve"),
])
def test_unreachable_address_fails_fast_with_what_to_check(address, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch, "run", lambda *a: pytest.fail("Ray was started"))
    t0 = time.monotonic()
    rc = main(["--address", address, "--output", str(tmp_path / "out"), "--startup-timeout", "5"])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 1 and took < 10, (rc, took)
    assert message in err and "ray status" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_probe_of_a_silent_listener_passes(tmp_path):
    # something listens: the probe lets it through (ray.init's own bound, --startup-timeout, applies then)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        launch.probe_address(f"127.0.0.1:{s.getsockname()[1]}", 2.0)


def test_timeout_maps_onto_the_config(tmp_path):
    args = build_parser().parse_args(["--timeout", "12.5"])
    cfg = config_from_args(args, tmp_path)
    if "timeout" in cfg.to_dict():
        assert cfg.timeout == 12.5
    assert build_parser().parse_args([]).timeout == 300.0


def test_resume_gets_a_fresh_ray_run_name(tmp_path):
    assert launch._ray_run_name(tmp_path, False) == "train"
    assert launch._ray_run_name(tmp_path, True) == "train-resume-1"
    (tmp_path / "ray" / "train-resume-1").mkdir(parents=True)
    assert launch._ray_run_name(tmp_path, True) == "train-resume-2"


def test_stale_temp_roots_of_dead_launchers_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(launch.tempfile, "gettempdir", lambda: str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"gcray-{dead.pid}-abc" / "session_x").mkdir(parents=True)
    (tmp_path / f"gcray-{os.getppid()}-def").mkdir()  # a live launcher's
    launch._sweep_stale_temp_roots()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"gcray-{os.getppid()}-def"]
