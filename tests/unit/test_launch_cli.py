"""gradcomp-launch argument handling: bad input exits 2 with a message and no traceback."""

import subprocess
import sys

import pytest

from gradcomp.launch import build_parser, config_from_args, format_table, main


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
    proc = subprocess.run([sys.executable, "-m", "gradcomp.launch", "--codec", "gzip"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "invalid choice: 'gzip'" in proc.stderr and "Traceback" not in proc.stderr


def test_config_mapping_and_table(tmp_path):
    args = build_parser().parse_args(["--codec", "fp", "--bits", "5", "--act-bits", "2", "--epochs", "3"])
    cfg = config_from_args(args, tmp_path)
    assert (cfg.codec, cfg.bits, cfg.act_bits, cfg.epochs) == ("fp", 5, 2, 3)
    assert cfg.checkpoint_dir == str(tmp_path / "checkpoints") and cfg.device == "cpu"
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
    import gradcomp.launch as launch

    _previous_run(tmp_path)
    started = []

    def fake_run(args, output):  # stop where Ray would start
        started.append(sorted(p.name for p in output.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "run", fake_run)
    assert main(["--output", str(tmp_path), "--overwrite"]) == 130
    assert started == [["notes.txt"]]
