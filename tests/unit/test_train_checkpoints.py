"""Damaged or tampered checkpoints: one clear error naming the file, nothing changed on disk.

Table-driven: every case damages one file of a real checkpoint (``model.pt`` and the ``latest``
pointer through ``train(resume=True)``; ``compression-rank0.pt`` through ``load_checkpoint``
with a compression state, since a single process keeps none) and expects a ``CheckpointError``
(a ``ValueError``) whose message holds the damaged file's path, with every file of the
checkpoint directory unchanged afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
from pathlib import Path

import pytest
import torch

SMALL = dict(model="resnet2d", dataset="digits", width=8, batch_size=32, epochs=1, max_steps=3, lr=0.2,
             progress=False, checkpoint_every=0)
COMP = dict(codec="fp", bits=6, error_feedback="worker")


# ------------------------------------------------------------------ a real checkpoint to damage
def _new_state(cfg):
    """The CompressionState train() registers for ``cfg`` (here: without DDP, one process)."""
    from gradcomp import CompressionState
    from gradcomp.app.methods import build_codec, error_feedback

    return CompressionState(build_codec(cfg), error_feedback=error_feedback(cfg), warmup_steps=cfg.warmup_steps,
                            refit_every=cfg.refit_every, seed=cfg.seed, collective=cfg.collective,
                            timeout=getattr(cfg, "timeout", None))


def make_checkpoint(root: Path) -> Path:
    """Train 3 steps with a checkpoint, then add a compression-rank0.pt with residuals and fits."""
    from gradcomp.app.train import TrainConfig, build_model, latest_checkpoint, train
    from gradcomp.app import data

    train(TrainConfig(**SMALL, checkpoint_dir=str(root)))
    step_dir = latest_checkpoint(root)
    cfg = TrainConfig(**SMALL, **COMP, checkpoint_dir=str(root))
    model, _ = build_model(cfg, data.load_dataset(cfg.dataset, seed=cfg.seed, num_train=cfg.num_train))
    state = _new_state(cfg)
    state.bind_model(model)
    sd = state.state_dict()
    params = list(model.parameters())
    sd["residuals"] = {0: torch.full((params[0].numel(),), 1e-3), 2: torch.zeros(params[2].numel())}
    sd["fits"] = {"0/1/0/0": [-6.0, 1.5, 100.0, 0.25]}
    sd["payload_sizes"] = {"0/1/0": 120}
    sd["step"] = 3
    torch.save({"format": 1, "world_size": 1, "hook": sd}, step_dir / "compression-rank0.pt")
    state.close()
    return step_dir


def _edit(name: str, fn):
    """A tampering that loads ``name`` (weights_only), changes it with ``fn`` and saves it back."""
    def tamper(step_dir: Path, root: Path) -> Path:
        path = step_dir / name
        obj = torch.load(path, weights_only=True)
        obj = fn(obj)
        torch.save(obj, path)
        return path
    return tamper


def _bytes(name: str, fn):
    def tamper(step_dir: Path, root: Path) -> Path:
        path = step_dir / name
        path.write_bytes(fn(path.read_bytes()))
        return path
    return tamper


def _pointer(text):
    def tamper(step_dir: Path, root: Path) -> Path:
        (root / "latest").write_bytes(text(step_dir, root) if callable(text) else text)
        return root / "latest"
    return tamper


def _set(*keys, value):
    def fn(obj):
        d = obj
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value(d[keys[-1]]) if callable(value) else value
        return obj
    return fn


def _drop(*keys):
    def fn(obj):
        d = obj
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
        return obj
    return fn


def _first_weight(obj):
    return next(k for k, v in obj["model"].items() if v.is_floating_point() and v.dim() > 1)


def _nan_weight(obj):
    obj["model"][_first_weight(obj)][0].view(-1)[0] = float("nan")
    return obj


def _reshape_weight(obj):
    k = _first_weight(obj)
    obj["model"][k] = obj["model"][k].reshape(-1)
    return obj


def _rename_weight(obj):
    k = _first_weight(obj)
    obj["model"][k + "_renamed"] = obj["model"].pop(k)
    return obj


def _inf_momentum(obj):
    st = next(iter(obj["optimizer"]["state"].values()))
    st["momentum_buffer"].view(-1)[0] = float("inf")
    return obj


def _momentum_shape(obj):
    st = next(iter(obj["optimizer"]["state"].values()))
    st["momentum_buffer"] = torch.zeros(7)
    return obj


def _symlinked_model(step_dir: Path, root: Path) -> Path:
    outside = root.parent / "outside-model.pt"
    (step_dir / "model.pt").rename(outside)
    (step_dir / "model.pt").symlink_to(outside)
    return step_dir / "model.pt"


def _symlinked_step_dir(step_dir: Path, root: Path) -> Path:
    import shutil

    outside = root.parent / "elsewhere"
    shutil.copytree(step_dir, outside)
    (root / "step-link").symlink_to(outside, target_is_directory=True)
    (root / "latest").write_text("step-link\n")
    return root / "latest"


def _symlinked_pointer(step_dir: Path, root: Path) -> Path:
    outside = root.parent / "pointer-elsewhere"
    outside.write_text(step_dir.name + "\n")
    (root / "latest").unlink()
    (root / "latest").symlink_to(outside)
    return root / "latest"


def _pointer_is_dir(step_dir: Path, root: Path) -> Path:
    (root / "latest").unlink()
    (root / "latest").mkdir()
    return root / "latest"


def _dotdot_with_copy(step_dir: Path, root: Path) -> Path:
    import shutil

    shutil.copytree(step_dir, root.parent / "x")  # a real checkpoint there: tempting, still refused
    (root / "latest").write_text("../x\n")
    return root / "latest"


# (name, tamper(step_dir, root) -> the file an error must name)
MAIN_CASES = [
    ("model truncated", _bytes("model.pt", lambda b: b[:len(b) // 2])),
    ("model zero bytes", _bytes("model.pt", lambda b: b"")),
    ("model random bytes", _bytes("model.pt", lambda b: os.urandom(4096))),
    ("model random bytes in zip", _bytes("model.pt", lambda b: b[:64] + os.urandom(len(b) - 128) + b[-64:])),
    ("model not a dict", _edit("model.pt", lambda o: [1, 2, 3])),
    ("model arbitrary pickle", _edit("model.pt", lambda o: argparse.Namespace(a=1))),
    ("model missing 'model'", _edit("model.pt", _drop("model"))),
    ("model missing 'progress'", _edit("model.pt", _drop("progress"))),
    ("model wrong format", _edit("model.pt", _set("format", value=99))),
    ("model format a string", _edit("model.pt", _set("format", value="1"))),
    ("model 'model' a list", _edit("model.pt", _set("model", value=[]))),
    ("model NaN weight", _edit("model.pt", _nan_weight)),
    ("model wrong-shape weight", _edit("model.pt", _reshape_weight)),
    ("model renamed weight", _edit("model.pt", _rename_weight)),
    ("model weight a list", _edit("model.pt", lambda o: _set("model", _first_weight(o), value=[0.0])(o))),
    ("optimizer missing state", _edit("model.pt", _drop("optimizer", "state"))),
    ("optimizer no param groups", _edit("model.pt", _set("optimizer", "param_groups", value=[]))),
    ("optimizer bad param index", _edit("model.pt", lambda o: _set("optimizer", "param_groups", 0, "params",
                                                               value=lambda p: [99999] + p[1:])(o))),
    ("optimizer inf momentum", _edit("model.pt", _inf_momentum)),
    ("optimizer wrong-shape momentum", _edit("model.pt", _momentum_shape)),
    ("progress negative step", _edit("model.pt", _set("progress", "step", value=-5))),
    ("progress step a string", _edit("model.pt", _set("progress", "step", value="7"))),
    ("progress step a float", _edit("model.pt", _set("progress", "step", value=3.5))),
    ("progress huge step", _edit("model.pt", _set("progress", "step", value=10**30))),
    ("progress negative batch", _edit("model.pt", _set("progress", "batch", value=-1))),
    ("progress missing epoch", _edit("model.pt", _drop("progress", "epoch"))),
    ("progress a list", _edit("model.pt", _set("progress", value=[3, 0, 3]))),
    ("progress history a dict", _edit("model.pt", _set("progress", "history", value={"a": 1}))),
    ("gradquant_steps a string", _edit("model.pt", _set("gradquant_steps", value="x"))),
    ("config another width", _edit("model.pt", _set("config", "width", value=16))),
    ("config another model", _edit("model.pt", _set("config", "model", value="mlp"))),
    ("config a string", _edit("model.pt", _set("config", value="resnet2d"))),
    ("world_size a string", _edit("model.pt", _set("world_size", value="2"))),
    ("model.pt deleted", lambda s, r: ((s / "model.pt").unlink(), r / "latest")[1]),
    ("model.pt symlink out", _symlinked_model),
    ("latest -> ../x", _dotdot_with_copy),
    ("latest -> /etc", _pointer(b"/etc\n")),
    ("latest -> absolute step dir", _pointer(lambda s, r: str(s.resolve()).encode())),
    ("latest -> missing dir", _pointer(b"step-99999999\n")),
    ("latest -> .", _pointer(b".\n")),
    ("latest -> sub/dir", _pointer(lambda s, r: f"{s.name}/../{s.name}".encode())),
    ("latest empty", _pointer(b"")),
    ("latest binary", _pointer(b"\xff\xfe\x00garbage")),
    ("latest huge", _pointer(b"step-" * 100000)),
    ("latest symlink out", _symlinked_pointer),
    ("latest a directory", _pointer_is_dir),
    ("step dir symlink out", _symlinked_step_dir),
]

CR = "compression-rank0.pt"


def _hook_set(*keys, value):
    return _edit(CR, _set("hook", *keys, value=value))


COMP_CASES = [
    ("comp truncated", _bytes(CR, lambda b: b[:len(b) // 2])),
    ("comp zero bytes", _bytes(CR, lambda b: b"")),
    ("comp random bytes", _bytes(CR, lambda b: os.urandom(2048))),
    ("comp not a dict", _edit(CR, lambda o: (1, 2))),
    ("comp missing 'hook'", _edit(CR, _drop("hook"))),
    ("comp wrong format", _edit(CR, _set("format", value=0))),
    ("comp world_size a string", _edit(CR, _set("world_size", value="1"))),
    ("comp world_size zero", _edit(CR, _set("world_size", value=0))),
    ("comp hook a list", _edit(CR, _set("hook", value=[1]))),
    ("comp hook wrong version", _hook_set("version", value=7)),
    ("comp hook negative step", _hook_set("step", value=-1)),
    ("comp hook step a string", _hook_set("step", value="3")),
    ("comp hook step a float", _hook_set("step", value=float("inf"))),
    ("comp hook missing residuals", _edit(CR, _drop("hook", "residuals"))),
    ("comp residual wrong shape", _hook_set("residuals", 0, value=lambda t: t[:-1])),
    ("comp residual 2-d", _hook_set("residuals", 0, value=lambda t: t.view(1, -1))),
    ("comp residual NaN", _hook_set("residuals", 0, value=lambda t: t.clone().fill_(math.nan))),
    ("comp residual bad index", _hook_set("residuals", value=lambda r: {10**6: r[0]})),
    ("comp residual not a tensor", _hook_set("residuals", 0, value=lambda t: t.tolist())),
    ("comp fits bad key", _hook_set("fits", value={"a/b": [0.0, 1.0, 1.0, 1.0]})),
    ("comp fits bad value", _hook_set("fits", "0/1/0/0", value=[0.0, "x"])),
    ("comp fits NaN", _hook_set("fits", "0/1/0/0", value=[math.nan, 1.0, 1.0, 1.0])),
    ("comp payload size bad key", _hook_set("payload_sizes", value={"0/1": 120})),
    ("comp payload size zero", _hook_set("payload_sizes", "0/1/0", value=0)),
    ("comp payload size a float", _hook_set("payload_sizes", "0/1/0", value=1.5)),
    ("comp stats a string", _hook_set("stats", "bytes_sent", value="many")),
    ("comp stats missing", _edit(CR, _drop("hook", "stats"))),
    ("comp hook config differs", _hook_set("config", "codec", value="FPCodec(bits=5)")),
    ("comp reduce residual no layout", _hook_set("reduce_residuals", value={0: torch.zeros(4)})),
]


# ------------------------------------------------------------------------------------ running
def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def run_case(tmp_path: Path, kind: str, tamper):
    """Damage a fresh checkpoint, resume; return (exception or None, file that should be named, root)."""
    from gradcomp.app import data
    from gradcomp.app.checkpoint import load_checkpoint
    from gradcomp.app.distributed import DistContext
    from gradcomp.app.methods import CommHook
    from gradcomp.app.train import TrainConfig, _optimizer, build_model, train

    root = tmp_path / "ck"
    step_dir = make_checkpoint(root)
    named = tamper(step_dir, root)
    before = _snapshot(root)
    err = None
    try:
        if kind == "main":
            train(TrainConfig(**SMALL, checkpoint_dir=str(root), resume=True))
        else:
            cfg = TrainConfig(**SMALL, **COMP, checkpoint_dir=str(root))
            model, gq = build_model(cfg, data.load_dataset(cfg.dataset, seed=cfg.seed, num_train=cfg.num_train))
            hook = CommHook(cfg, None, model, 1)
            hook.state = _new_state(cfg)
            hook.state.bind_model(model)
            try:
                load_checkpoint(step_dir, DistContext(), model, _optimizer(cfg, model), hook, gq)
            finally:
                hook.close()
    except Exception as exc:  # noqa: BLE001 - classified by the caller
        err = exc
    return err, named, before, _snapshot(root)


@pytest.mark.parametrize("kind, name, tamper", [("main", *c) for c in MAIN_CASES] + [("comp", *c) for c in COMP_CASES],
                         ids=[c[0] for c in MAIN_CASES + COMP_CASES])
def test_damaged_checkpoint_gives_one_clear_error(kind, name, tamper, tmp_path):
    from gradcomp.app.train import CheckpointError

    err, named, before, after = run_case(tmp_path, kind, tamper)
    assert err is not None, f"{name}: accepted silently"
    assert isinstance(err, CheckpointError) and isinstance(err, ValueError), f"{name}: {type(err).__name__}: {err}"
    assert str(named) in str(err) and err.path == named, f"{name}: error does not name {named}: {err}"
    assert after == before, f"{name}: the checkpoint directory changed"
    assert len(str(err)) < 2000, str(err)


def test_intact_checkpoint_with_compression_state_loads(tmp_path):
    """The undamaged fixture loads: residuals, fits and step arrive in the state."""
    err, *_ = run_case(tmp_path, "comp", lambda s, r: s / CR)
    assert err is None, err
    err, *_ = run_case(tmp_path / "2", "main", lambda s, r: s / "model.pt")
    assert err is None, err


def test_plan_cache_drift_baselines_are_checked_apart_from_fits(tmp_path):
    """Fits have 4-part keys; payload-size baselines live in 'payload_sizes' (3-part keys) and
    may be absent (a state saved before they existed)."""
    from gradcomp.app.checkpoint import CheckpointError, _check_fit_entry, _check_payload_sizes

    path = tmp_path / "compression-rank0.pt"
    _check_fit_entry("0/1/0/0", [], path)
    _check_payload_sizes({}, path)
    _check_payload_sizes({"payload_sizes": {"0/1/0": 1234}}, path)
    with pytest.raises(CheckpointError, match="'hook'\\['fits'\\]"):
        _check_fit_entry("0/1/0", [1234.0], path)
    for sizes in ({"0/1/0": -1}, {"0/1/0": 1.5}, {"0/1": 3}, {"0/1/0": True}, [1]):
        with pytest.raises(CheckpointError, match="payload_sizes"):
            _check_payload_sizes({"payload_sizes": sizes}, path)
