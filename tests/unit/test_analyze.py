"""`python -m gradcomp analyze`: the seed's KS table on a tiny model, end to end."""

import json
import math

import pytest

from gradcomp.app import analyze
from gradcomp.__main__ import main


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADCOMP_CACHE", str(tmp_path / "cache"))

TINY = ["--model", "resnet2d", "--dataset", "digits", "--width", "4", "--steps", "8",
        "--checkpoints", "2", "--samples", "400", "--batch-size", "32", "--quiet"]


def test_analyze_end_to_end(tmp_path, capsys):
    out = tmp_path / "ks"
    assert main(["analyze", *TINY, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Normal |" in printed and "| Lognormal |" in printed
    assert {p.name for p in out.iterdir()} == {"ks_analysis.json", "ks_analysis.md", "ks_analysis.png"}
    assert (out / "ks_analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Distribution | Weight gradients | Neural gradients |" in (out / "ks_analysis.md").read_text()

    r = json.loads((out / "ks_analysis.json").read_text())
    assert r["checkpoint_steps"] == [4, 8]
    layers = r["model"]["layers"]
    assert len(layers) == 10 and layers[0] == "stem" and layers[-1] == "fc"
    # Every layer sampled at both checkpoints, both kinds; the classifier's output gradient
    # (the loss gradient) is recorded but kept out of the table.
    assert len(r["layers"]) == 2 * 2 * len(layers)
    excluded = [x for x in r["layers"] if not x["in_table"]]
    assert {(x["kind"], x["layer"]) for x in excluded} == {("neural", "fc")}
    for rec in r["layers"]:
        assert 0 < rec["numel"] <= 400
        assert rec["ks_lognormal"] is not None and 0 <= rec["ks_lognormal"] <= 1
    agg = r["aggregate"]
    assert agg["neural"]["count"] == 2 * 9 and agg["weight"]["count"] == 2 * 10
    for kind in analyze.KINDS:
        for dist in ("normal", "lognormal"):
            a = agg[kind][dist]
            assert math.isfinite(a["mean"]) and a["std"] >= 0 and 0 <= a["median_p"] <= 1
    # The seed's finding, already visible after a few steps of a tiny model.
    assert agg["neural"]["lognormal"]["mean"] < agg["neural"]["normal"]["mean"]
    assert r["training"]["test_accuracy"] >= 0 and r["config"]["model"] == "resnet2d"


def test_analyze_is_deterministic_and_library_callable():
    cfg = analyze.AnalyzeConfig(model="mlp", dataset="synthetic", width=8, steps=4, checkpoints=1,
                                samples=200, batch_size=16, num_train=64)
    a, b = analyze.analyze(cfg), analyze.analyze(cfg)
    assert a["layers"] == b["layers"] and a["training"]["loss_last"] == b["training"]["loss_last"]
    assert a["model"]["layers"] == ["fc1", "fc2", "fc3"]


@pytest.mark.parametrize("args", [
    ["--model", "vgg"], ["--dataset", "cifar"], ["--steps", "0"], ["--samples", "5"],
    ["--checkpoints", "9", "--steps", "3"], ["--lr", "-1"], ["--momentum", "1.5"],
    ["--model", "resnet1d", "--dataset", "digits"],   # (C, H, W) data for a 1-D model
    ["--model", "mlp", "--act-bits", "2"], ["--batch-size", "5000", "--dataset", "digits"],
    ["--steps", "x"],
])
def test_bad_arguments_exit_2_without_traceback(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_output_that_is_a_file_is_rejected(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit) as exc:
        analyze.main([*TINY, "--output", str(f)])
    assert exc.value.code == 2 and "not a directory" in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(ValueError):
        analyze.AnalyzeConfig(steps=True)
    with pytest.raises(ValueError):
        analyze.AnalyzeConfig(num_train=0)
    assert analyze.AnalyzeConfig(steps=300, checkpoints=3).checkpoint_steps == [100, 200, 300]


def test_analyze_st_model_samples_the_same_layers():
    cfg = analyze.AnalyzeConfig(model="resnet2d", dataset="digits", width=4, act_bits=2, steps=3,
                                checkpoints=1, samples=200, batch_size=32)
    r = analyze.analyze(cfg)
    assert len(r["model"]["layers"]) == 10 and all(".st." not in n for n in r["model"]["layers"])
    assert r["aggregate"]["neural"]["count"] == 9
