"""The training loop in one process and under torchrun; TrainConfig validation."""

import json
import subprocess
import sys

import pytest
import torch

from gradcomp.app.train import TrainConfig, latest_checkpoint, train

SMALL = dict(model="resnet2d", dataset="digits", width=8, batch_size=32, epochs=2, lr=0.2, progress=False)


@pytest.mark.parametrize("field, value, message", [
    ("model", "vgg", "TrainConfig.model must be one of"),
    ("dataset", "cifar", "TrainConfig.dataset must be one of"),
    ("codec", "zstd", "TrainConfig.codec must be one of"),
    ("bits", 1, "TrainConfig.bits must be an int in 2..16"),
    ("bits", True, "TrainConfig.bits must be an int"),
    ("act_bits", 5, "TrainConfig.act_bits must be an int in 1..4"),
    ("sparsity", 1.0, "TrainConfig.sparsity must be a number in [0.0, 1.0)"),
    ("lr", float("nan"), "TrainConfig.lr must be a number"),
    ("lr", 0.0, "TrainConfig.lr must be a number"),
    ("batch_size", 0, "TrainConfig.batch_size must be an int >= 1"),
    ("max_steps", 0, "TrainConfig.max_steps must be an int >= 1 or None"),
    ("progress", "yes", "TrainConfig.progress must be a bool"),
    ("checkpoint_dir", "", "TrainConfig.checkpoint_dir must be a non-empty path"),
])
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{field: value})


def test_config_combinations_and_round_trip():
    with pytest.raises(ValueError, match="resume needs checkpoint_dir"):
        TrainConfig(resume=True)
    with pytest.raises(ValueError, match="summable payload"):
        TrainConfig(codec="prune-fp", collective="allreduce")
    with pytest.raises(ValueError, match="no Horovod transport"):
        TrainConfig(codec="powersgd", transport="horovod")
    with pytest.raises(ValueError, match="FSDP2 has no place for it"):
        TrainConfig(codec="powersgd", transport="fsdp")
    cfg = TrainConfig(codec="fp", bits=5, act_bits=2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"modle": "mlp"})
    with pytest.raises(ValueError, match="needs a TrainConfig"):
        train({"model": "mlp"})


def test_single_process_trains_checkpoints_and_resumes_exactly(tmp_path):
    ck_a, ck_b = tmp_path / "a", tmp_path / "b"
    full = train(TrainConfig(**SMALL, checkpoint_dir=str(ck_a), checkpoint_every=10,
                             metrics_path=str(tmp_path / "m.jsonl")))
    assert full["world_size"] == 1 and full["bytes_sent_per_step"] == 0.0 and full["bits_per_element"] is None
    assert full["steps"] == 2 * (1437 // 32) and full["epochs"] == 2
    assert full["final_accuracy"] > 0.9, full["final_accuracy"]
    assert [h["epoch"] for h in full["history"]] == [1, 2]
    assert full["history"][-1]["test_accuracy"] == full["final_accuracy"]
    assert full["step_time_p50"] > 0 and full["step_time_p90"] >= full["step_time_p50"]
    events = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "epoch", "epoch", "end"]

    # interrupt after step 25 (checkpoint at 20), then resume: bit-identical weights
    class Stop(Exception):
        pass

    def stop_at_25(step):
        if step == 25:
            raise Stop

    with pytest.raises(Stop):
        train(TrainConfig(**SMALL, checkpoint_dir=str(ck_b), checkpoint_every=10), on_step=stop_at_25)
    assert latest_checkpoint(ck_b).name == "step-00000020"
    resumed = train(TrainConfig(**SMALL, checkpoint_dir=str(ck_b), checkpoint_every=10, resume=True))
    assert resumed["resumed_from_step"] == 20 and resumed["restarts"] == 1
    a = torch.load(latest_checkpoint(ck_a) / "model.pt", weights_only=True)
    b = torch.load(latest_checkpoint(ck_b) / "model.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert resumed["final_accuracy"] == full["final_accuracy"]
    # a pointer to a missing checkpoint is an error, not a silent fresh start
    (ck_b / "latest").write_text("step-99999999\n")
    with pytest.raises(ValueError, match="has no model.pt"):
        train(TrainConfig(**SMALL, checkpoint_dir=str(ck_b), resume=True))


def test_st_and_gradquant_models_train(tmp_path):
    res = train(TrainConfig(model="resnet1d", dataset="mnist1d", width=8, act_bits=2, gradquant_bits=6,
                            gradquant_sparsity=0.5, batch_size=64, epochs=1, max_steps=25, lr=0.1, progress=False))
    assert res["steps"] == 25 and res["final_loss"] < 2.3  # below chance level's ln(10)


def test_torchrun_two_ranks(tmp_path):
    """The env:// contract: torchrun starts 2 gloo ranks on a free port, train() joins them."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(dict(SMALL, codec="fp", bits=6, epochs=1, max_steps=10)))
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "gradcomp.app.train", str(cfg), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and res["steps"] == 10
    assert res["bytes_source"] == "measured by the hook" and 5.9 < res["bits_per_element"] < 6.2


def test_cli_rejects_bad_config_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "resnet1d", "bits": 99}))
    proc = subprocess.run([sys.executable, "-m", "gradcomp.app.train", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "TrainConfig.bits must be an int in 2..16" in proc.stderr
    assert "Traceback" not in proc.stderr
