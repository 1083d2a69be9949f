"""Checkpoints of a training run: write, find, read, validate, apply, and agree on resuming.

A checkpoint is a ``step-XXXXXXXX`` directory inside ``checkpoint_dir``: ``model.pt`` (rank 0:
model, optimizer, LR-schedule progress, GradQuant steps, the config) and one
``compression-rankN.pt`` per rank (each rank's compression state: residuals differ per rank).
:func:`save_checkpoint` writes a fresh directory and publishes it by an atomic rename of the
``latest`` pointer, which :func:`latest_checkpoint` follows. Reading is all or nothing:
:func:`read_checkpoint` loads every file of this rank with ``torch.load(weights_only=True)`` and
validates it (structure, types, ranges, finite weights, shapes against this model, the saved
config) before :func:`apply_checkpoint` changes anything; anything wrong raises
:class:`CheckpointError` naming the file. :func:`agree_on_resume` then makes every rank resume
from the same point or every rank fail.

Example:
    >>> import tempfile
    >>> latest_checkpoint(tempfile.mkdtemp()) is None  # no ``latest`` pointer yet
    True
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcomp.app.config import TrainConfig, is_int, is_real
from gradcomp.app.distributed import DistContext, all_gather_object, barrier
from gradcomp.app.methods import CommHook

CHECKPOINT_FORMAT = 1

def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: damaged, tampered with, or from another run.

    ``path`` is the file (or ``latest`` pointer) at fault; the message starts with it; ``reason``
    is the rest. A ``ValueError``, so callers that catch those keep working. Pickles intact (Ray
    hands a worker's exception to the driver that way).

    >>> import pickle
    >>> str(pickle.loads(pickle.dumps(CheckpointError("ck/latest", "is empty"))))
    'checkpoint file ck/latest: is empty'
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"checkpoint file {self.path}: {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.reason)


# Fields a resumed run must share with the run that wrote the checkpoint (they fix the model's
# tensors or what its optimizer state means); the rest (epochs, lr, codec, ...) may change.
RESUME_MUST_MATCH = ("model", "dataset", "width", "num_train", "act_bits", "gradquant_bits",
                     "gradquant_sparsity", "gradquant_exp_offset", "optimizer")
_POINTER_MAX_BYTES = 4096


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies in ``root`` (symlinks resolved)."""
    try:
        path.resolve(strict=False).relative_to(root.resolve(strict=False))
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """Return the directory ``checkpoint_dir/latest`` points to, or ``None`` if there is none.

    The pointer must be a small text file naming one directory directly inside
    ``checkpoint_dir`` (no absolute path, no ``..``, no separator, no symlink leading out);
    anything else raises :class:`CheckpointError` naming the pointer.
    """
    root = Path(checkpoint_dir)
    pointer = root / "latest"
    if pointer.is_symlink():
        raise CheckpointError(pointer, "is a symlink; the pointer is a plain file written by save_checkpoint")
    if not pointer.exists():
        return None
    if not pointer.is_file():
        raise CheckpointError(pointer, "is not a regular file")
    try:
        with open(pointer, "rb") as f:
            raw = f.read(_POINTER_MAX_BYTES + 1)
        if len(raw) > _POINTER_MAX_BYTES:
            raise CheckpointError(pointer, f"is over {_POINTER_MAX_BYTES} bytes; not a checkpoint pointer")
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(pointer, "is not UTF-8 text; not a checkpoint pointer") from None
    except OSError as exc:
        raise CheckpointError(pointer, f"cannot be read ({exc})") from exc
    if not name:
        raise CheckpointError(pointer, "is empty; it should name a step-XXXXXXXX directory")
    bad = (name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or os.sep in name
           or (os.altsep is not None and os.altsep in name) or Path(name).is_absolute()
           or any(c in name for c in "\r\n") or name.startswith("."))
    if bad:
        raise CheckpointError(pointer, f"names {name!r}; it must name a directory directly inside {root} "
                                       "(no absolute path, '..' or separator)")
    target = root / name
    if not _inside(target, root) or target.resolve().parent != root.resolve():
        raise CheckpointError(pointer, f"names {target}, which leads outside {root} (a symlink)")
    if not (target / "model.pt").is_file():
        raise CheckpointError(pointer, f"names {target}, which has no model.pt")
    return target


def save_checkpoint(checkpoint_dir: Path, d: DistContext, model: nn.Module, optimizer, hook: CommHook,
                    progress: dict, gradquant: list, keep: int, config: TrainConfig | None = None) -> Path:
    """Write one checkpoint (every rank writes its compression state) and publish it atomically."""
    step_dir = checkpoint_dir / f"step-{progress['step']:08d}"
    if d.rank == 0:
        step_dir.mkdir(parents=True, exist_ok=True)
    barrier(d)
    step_dir.mkdir(parents=True, exist_ok=True)  # a non-shared file system: each node has its own
    _atomic_save({"format": CHECKPOINT_FORMAT, "world_size": d.world_size, "hook": hook.state_dict()},
                 step_dir / f"compression-rank{d.rank}.pt")
    model_sd, optim_sd = _full_state(model, optimizer)  # FSDP: every rank all-gathers the shards
    if d.rank == 0:
        main = {"format": CHECKPOINT_FORMAT, "model": model_sd, "optimizer": optim_sd,
                "progress": dict(progress), "gradquant_steps": [g.step for g in gradquant],
                "world_size": d.world_size}
        if config is not None:
            main["config"] = config.to_dict()
        _atomic_save(main, step_dir / "model.pt")
    barrier(d)
    if d.rank == 0:
        tmp = checkpoint_dir / f".latest.tmp-{os.getpid()}"
        tmp.write_text(step_dir.name + "\n")
        os.replace(tmp, checkpoint_dir / "latest")
        old = sorted(p for p in checkpoint_dir.glob("step-*") if p.is_dir() and p != step_dir)
        for p in old[:max(len(old) - (keep - 1), 0)]:
            shutil.rmtree(p, ignore_errors=True)
    return step_dir


# ---- reading and validating (nothing is applied until every file of this rank checked out)
def _read(path: Path, step_dir: Path):
    """``torch.load(weights_only=True)`` of a checkpoint file; every failure names the file."""
    if path.is_symlink() and not _inside(path, step_dir):
        raise CheckpointError(path, f"is a symlink leading outside {step_dir}")
    if not path.is_file():
        raise CheckpointError(path, "is missing" if not path.exists() else "is not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes): an interrupted or damaged write")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, OSError, UnpicklingError, ...
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(path, f"cannot be loaded ({type(exc).__name__}: {detail}); the file is damaged "
                                    "or not a gradcomp checkpoint") from exc


def _check_fit_entry(k, v, path: Path) -> None:
    """One fit of a saved plan cache (:meth:`gradcomp.comm.plans.PlanCache.state_dict`): key
    ``bucket/phase/shard/segment``; value ``[]`` or ``[mu, sigma >= 0, count >= 0, max_abs >= 0,
    *sample]`` with the sample ascending, positive and finite (at most SAMPLE_SIZE)."""
    from gradcomp.codecs.base import SAMPLE_SIZE

    parts = k.split("/") if isinstance(k, str) else []
    _need(len(parts) == 4 and all(x.isdigit() for x in parts), path, f"'hook'['fits'] has key {k!r}")
    sample = v[4:] if isinstance(v, list) else []
    ok = isinstance(v, list) and (not v or (
        4 <= len(v) <= 4 + SAMPLE_SIZE
        and all((is_int(x) or isinstance(x, float)) and not math.isnan(x) for x in v)
        and math.isfinite(v[0]) and math.isfinite(v[1]) and v[1] >= 0 and v[2] >= 0 and v[3] >= 0
        and all(0 < a < math.inf for a in sample) and all(a <= b for a, b in zip(sample, sample[1:]))))
    _need(ok, path, f"'hook'['fits'][{k!r}] is {v!r:.200}; a fit is [mu, sigma >= 0, count, max_abs, "
          "*ascending positive sample] or []")


def _check_payload_sizes(sd: dict, path: Path) -> None:
    """Drift baselines (optional; :meth:`gradcomp.comm.plans.PlanCache.sizes_state_dict`):
    ``"bucket/phase/shard" -> payload bytes >= 1``."""
    for k, v in _need_dict(sd.get("payload_sizes", {}), path, "'hook'['payload_sizes']").items():
        parts = k.split("/") if isinstance(k, str) else []
        _need(len(parts) == 3 and all(x.isdigit() for x in parts) and is_int(v) and v >= 1, path,
              f"'hook'['payload_sizes'] has {k!r}: {v!r}; an entry is 'bucket/phase/shard': bytes >= 1")


def _need(cond: bool, path: str | os.PathLike, reason: str) -> None:
    if not cond:
        raise CheckpointError(path, reason)


def _need_dict(obj, path: Path, what: str, keys=()) -> dict:
    _need(isinstance(obj, dict), path, f"{what} is a {type(obj).__name__}, not a dict")
    missing = [k for k in keys if k not in obj]
    _need(not missing, path, f"{what} lacks {', '.join(map(repr, missing))}")
    return obj


def _need_count(v, path: Path, what: str, lo: int = 0) -> int:
    _need(is_int(v) and lo <= v < 2**53, path, f"{what} must be an int >= {lo}; got {v!r}")
    return v


def _need_finite_tensor(t, path: Path, what: str) -> torch.Tensor:
    _need(isinstance(t, torch.Tensor), path, f"{what} is a {type(t).__name__}, not a tensor")
    if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(path, f"{what} holds {bad} non-finite value(s) (NaN/inf)")
    return t


def _check_model_state(sd, path: Path, model: nn.Module) -> None:
    _need_dict(sd, path, "'model'")
    want = model.state_dict()
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    _need(not missing and not extra, path, f"'model' does not fit this model: missing {missing[:5]}, "
                                           f"unexpected {extra[:5]} (another model or config?)")
    for k, ref in want.items():
        t = _need_finite_tensor(sd[k], path, f"'model'[{k!r}]")
        _need(t.shape == ref.shape, path, f"'model'[{k!r}] has shape {tuple(t.shape)}, this model's is "
                                          f"{tuple(ref.shape)}")
        _need(t.dtype == ref.dtype, path, f"'model'[{k!r}] has dtype {t.dtype}, this model's is {ref.dtype}")


def _check_optimizer_state(sd, path: Path, optimizer) -> None:
    _need_dict(sd, path, "'optimizer'", ("state", "param_groups"))
    mine = optimizer.state_dict()["param_groups"]
    groups = sd["param_groups"]
    _need(isinstance(groups, list) and len(groups) == len(mine), path,
          f"'optimizer' has {len(groups) if isinstance(groups, list) else groups!r} parameter groups, this "
          f"optimizer {len(mine)}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, (g, m) in enumerate(zip(groups, mine)):
        _need_dict(g, path, f"'optimizer' param group {i}", ("params",))
        _need(isinstance(g["params"], list) and len(g["params"]) == len(m["params"])
              and all(is_int(x) and 0 <= x < len(params) for x in g["params"]), path,
              f"'optimizer' param group {i} lists other parameters than this optimizer's")
        for k, v in g.items():
            if k != "params" and isinstance(v, (int, float)) and not isinstance(v, bool):
                _need(math.isfinite(v), path, f"'optimizer' param group {i} has {k}={v!r}")
    state = sd["state"]
    _need_dict(state, path, "'optimizer' state")
    for idx, st in state.items():
        _need(is_int(idx) and 0 <= idx < len(params), path, f"'optimizer' state has parameter index {idx!r}")
        _need_dict(st, path, f"'optimizer' state[{idx}]")
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                _need_finite_tensor(v, path, f"'optimizer' state[{idx}][{k!r}]")
                _need(v.numel() == 1 or v.shape == params[idx].shape, path,
                      f"'optimizer' state[{idx}][{k!r}] has shape {tuple(v.shape)}, the parameter's is "
                      f"{tuple(params[idx].shape)}")
            else:
                _need(is_real(v) or v is None, path, f"'optimizer' state[{idx}][{k!r}] is {v!r}")


def _check_progress(p, path: Path) -> dict:
    _need_dict(p, path, "'progress'", ("step", "epoch", "batch"))
    for k in ("step", "epoch", "batch"):
        _need_count(p[k], path, f"'progress'['{k}']")
    _need_count(p.get("restarts", 0), path, "'progress'['restarts']")
    hist = p.get("history", [])
    _need(isinstance(hist, list) and all(isinstance(h, dict) for h in hist), path,
          "'progress'['history'] must be a list of dicts")
    return dict(p, restarts=p.get("restarts", 0), history=list(hist))


def _check_compression_state(sd, path: Path, model: nn.Module) -> int:
    """Validate a :meth:`CompressionState.state_dict` against ``model``; return its step."""
    from gradcomp.comm.hook import STATE_VERSION

    _need_dict(sd, path, "'hook'", ("version", "config", "step", "fits", "residuals", "reduce_residuals",
                                    "reduce_residual_layouts", "stats"))
    _need(sd["version"] == STATE_VERSION, path, f"'hook' is version {sd['version']!r}, not {STATE_VERSION}")
    _need_dict(sd["config"], path, "'hook'['config']")
    step = _need_count(sd["step"], path, "'hook'['step']")
    params = list(model.parameters())
    _need_dict(sd["residuals"], path, "'hook'['residuals']")
    for k, t in sd["residuals"].items():
        _need(is_int(k) and 0 <= k < len(params), path, f"'hook'['residuals'] has parameter index {k!r}; the "
                                                          f"model has {len(params)} parameters")
        _need_finite_tensor(t, path, f"'hook'['residuals'][{k}]")
        _need(t.dim() == 1 and t.numel() == params[k].numel() and t.is_floating_point(), path,
              f"'hook'['residuals'][{k}] has shape {tuple(t.shape)}; parameter {k} has {params[k].numel()} "
              "elements (a residual of another model)")
    total = sum(p.numel() for p in params)
    _need_dict(sd["reduce_residuals"], path, "'hook'['reduce_residuals']")
    layouts = _need_dict(sd["reduce_residual_layouts"], path, "'hook'['reduce_residual_layouts']")
    for b, t in sd["reduce_residuals"].items():
        _need(is_int(b) and b >= 0 and b in layouts, path, f"'hook'['reduce_residuals'] has bucket {b!r} "
                                                            "without a layout")
        lay = layouts[b]
        _need(isinstance(lay, (list, tuple)) and len(lay) == 2 and all(is_int(x) and x >= 1 for x in lay)
              and lay[1] <= total, path, f"'hook'['reduce_residual_layouts'][{b}] is {lay!r}")
        _need_finite_tensor(t, path, f"'hook'['reduce_residuals'][{b}]")
        _need(t.dim() == 1 and t.numel() <= lay[1] and t.is_floating_point(), path,
              f"'hook'['reduce_residuals'][{b}] has shape {tuple(t.shape)} for a bucket of {lay[1]} elements")
    _need_dict(sd["fits"], path, "'hook'['fits']")
    for k, v in sd["fits"].items():
        _check_fit_entry(k, v, path)
    _check_payload_sizes(sd, path)
    st = _need_dict(sd["stats"], path, "'hook'['stats']", ("bytes_sent", "dense_bytes", "payload_bytes",
                                                            "payload_elements"))
    for k, v in st.items():
        _need(is_real(v) and v >= 0, path, f"'hook'['stats'][{k!r}] is {v!r}")
    return step


def _check_fsdp_compression_state(sd, path: Path, model: nn.Module) -> int:
    """Validate a :meth:`gradcomp.comm.fsdp.FSDPCompressionState.state_dict`; return its step."""
    from gradcomp.comm.fsdp import STATE_VERSION

    _need_dict(sd, path, "'hook'", ("version", "config", "step", "fits", "residuals", "stats", "rank", "world_size"))
    _need(sd["version"] == STATE_VERSION, path, f"'hook' is version {sd['version']!r}, not {STATE_VERSION}")
    _need_dict(sd["config"], path, "'hook'['config']")
    step = _need_count(sd["step"], path, "'hook'['step']")
    total = sum(p.numel() for p in model.parameters())
    for k, t in _need_dict(sd["residuals"], path, "'hook'['residuals']").items():
        parts = k.split("/") if isinstance(k, str) else []
        _need(len(parts) == 2 and all(x.isdigit() for x in parts), path, f"'hook'['residuals'] has key {k!r}")
        _need_finite_tensor(t, path, f"'hook'['residuals'][{k!r}]")
        _need(t.dim() == 1 and t.is_floating_point() and t.numel() <= 2 * total + 64, path,
              f"'hook'['residuals'][{k!r}] has shape {tuple(t.shape)} (a residual of another model)")
    for k, v in _need_dict(sd["fits"], path, "'hook'['fits']").items():
        _check_fit_entry(k, v, path)
    _check_payload_sizes(sd, path)
    for k, v in _need_dict(sd["stats"], path, "'hook'['stats']").items():
        _need(is_real(v) and v >= 0, path, f"'hook'['stats'][{k!r}] is {v!r}")
    return step


@dataclass
class _Loaded:
    """One rank's validated checkpoint, not yet applied."""
    step_dir: Path
    main: dict
    progress: dict
    comp_path: Path
    comp_status: str  # "loaded", "afresh" (all ranks alike), "missing", "none" (this run keeps no state)
    hook_sd: Any = None
    hook_step: int = 0
    note: str = ""


def read_checkpoint(step_dir: str | os.PathLike, d: DistContext, model: nn.Module, optimizer, hook: CommHook,
                    gradquant: list, config: TrainConfig | None = None) -> _Loaded:
    """Read and validate this rank's files of a checkpoint; change nothing. Raises :class:`CheckpointError`."""
    step_dir = Path(step_dir)
    main_path = step_dir / "model.pt"
    main = _read(main_path, step_dir)
    _need_dict(main, main_path, "the checkpoint", ("format", "model", "optimizer", "progress"))
    _need(main["format"] == CHECKPOINT_FORMAT, main_path, f"unknown checkpoint format {main['format']!r}")
    if "config" in main and config is not None:
        saved = _need_dict(main["config"], main_path, "'config'")
        now = config.to_dict()
        diff = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_MUST_MATCH if saved.get(k) != now[k]]
        _need(not diff, main_path, f"was written by a run with another {', '.join(diff)}; resume with the same "
                                   "model settings or start a fresh checkpoint_dir")
    saved_world = main.get("world_size")
    _need(saved_world is None or (is_int(saved_world) and saved_world >= 1), main_path,
          f"'world_size' is {saved_world!r}")
    _check_model_state(main["model"], main_path, model)
    _check_optimizer_state(main["optimizer"], main_path, optimizer)
    progress = _check_progress(main["progress"], main_path)
    gq = main.get("gradquant_steps", [])
    _need(isinstance(gq, list) and all(is_int(s) and s >= 0 for s in gq), main_path,
          f"'gradquant_steps' must be a list of ints >= 0; got {gq!r}")
    _need(not gradquant or len(gq) == len(gradquant), main_path,
          f"'gradquant_steps' has {len(gq)} entries, this model has {len(gradquant)} GradQuant modules")

    comp = step_dir / f"compression-rank{d.rank}.pt"
    loaded = _Loaded(step_dir, main, progress, comp, "none")
    if not hook.has_state:
        return loaded  # fp32, fp16, PowerSGD or one process: nothing to restore
    if saved_world is not None and saved_world != d.world_size:
        loaded.comp_status = "afresh"  # every rank reads the same model.pt, so every rank decides alike
        loaded.note = (f"checkpoint was written by {saved_world} ranks, this run has {d.world_size}; "
                       "error-feedback residuals and fits start afresh")
        return loaded
    if not comp.exists() and not comp.is_symlink():
        loaded.comp_status = "missing"
        return loaded
    c = _need_dict(_read(comp, step_dir), comp, "the compression state", ("format", "world_size", "hook"))
    _need(c["format"] == CHECKPOINT_FORMAT, comp, f"unknown checkpoint format {c['format']!r}")
    _need_count(c["world_size"], comp, "'world_size'", 1)
    if c["world_size"] != d.world_size:
        loaded.comp_status = "afresh"
        loaded.note = (f"checkpoint has compression state for {c['world_size']} ranks, this run has "
                       f"{d.world_size}; error-feedback residuals and fits start afresh")
    elif c["hook"] is None:
        loaded.comp_status = "afresh"
        loaded.note = "checkpoint was written without compression state (another codec); it starts afresh"
    else:
        check = _check_fsdp_compression_state if hook.fsdp else _check_compression_state
        loaded.hook_step = check(c["hook"], comp, model)
        want = hook.compression_config()
        _need(want is None or c["hook"]["config"] == want, comp,
              f"holds compression state written with {c['hook']['config']}, this run's is {want}; resume with the "
              "same codec settings or start a fresh checkpoint_dir")
        loaded.hook_sd, loaded.comp_status = c["hook"], "loaded"
    return loaded


def apply_checkpoint(loaded: _Loaded, model: nn.Module, optimizer, hook: CommHook, gradquant: list) -> dict:
    """Load a validated checkpoint into the run's objects; return its progress."""
    main = loaded.main
    main_path = loaded.step_dir / "model.pt"
    try:
        model.load_state_dict(_shard_like(main["model"], model.state_dict()))
        optimizer.load_state_dict(_shard_optimizer_like(main["optimizer"], optimizer))
    except Exception as exc:
        raise CheckpointError(main_path, f"does not fit this run ({type(exc).__name__}: "
                                         f"{' '.join(str(exc).split())[:300]})") from exc
    for g, s in zip(gradquant, main.get("gradquant_steps", [])):
        g.step = int(s)
    if loaded.comp_status == "loaded":
        try:
            hook.load_state_dict(loaded.hook_sd)
        except Exception as exc:
            raise CheckpointError(loaded.comp_path, f"does not fit this run's compression ({type(exc).__name__}: "
                                                    f"{' '.join(str(exc).split())[:400]})") from exc
    elif loaded.note:
        warnings.warn(f"gradcomp: {loaded.note}", stacklevel=2)
    elif loaded.comp_status == "missing":
        warnings.warn(f"gradcomp: {loaded.comp_path} missing; compression state starts afresh", stacklevel=2)
    return dict(loaded.progress)


def load_checkpoint(step_dir: Path, d: DistContext, model: nn.Module, optimizer, hook: CommHook, gradquant: list,
                    config: TrainConfig | None = None) -> dict:
    """Load this rank's part of a checkpoint written by :func:`save_checkpoint`; return progress.

    Every file is validated first (``weights_only=True`` load, structure, types, ranges, finite
    weights, tensor shapes against this model, the saved config against ``config``); anything
    wrong raises :class:`CheckpointError` naming the file, before anything is changed. This
    function alone does not compare ranks: :func:`agree_on_resume` does, and
    :func:`gradcomp.app.train.train` calls it (see there).
    """
    return apply_checkpoint(read_checkpoint(step_dir, d, model, optimizer, hook, gradquant, config),
                            model, optimizer, hook, gradquant)


def agree_on_resume(d: DistContext, src: Path | None, loaded: _Loaded | None, error: CheckpointError | None) -> None:
    """Compare every rank's resume point; raise the same kind of error on every rank if they differ.

    One small all-gather of (checkpoint directory, step, compression status, hook step, error).
    """
    mine = {"dir": None if src is None else str(src), "error": None if error is None else str(error),
            "step": None if loaded is None else int(loaded.progress["step"]),
            "status": None if loaded is None else loaded.comp_status,
            "hook_step": None if loaded is None else loaded.hook_step,
            "file": None if loaded is None else str(loaded.comp_path)}
    everyone = all_gather_object(d, mine)
    failed = [(r, e["error"]) for r, e in enumerate(everyone) if e["error"] is not None]
    if failed:
        if error is not None:
            raise error
        r, msg = failed[0]
        raise CheckpointError(everyone[r]["file"] or everyone[r]["dir"] or "?",
                              f"rank {r} cannot resume from it, so no rank does: {msg}")
    steps = {e["step"] for e in everyone}
    if len(steps) > 1:
        where = "; ".join(f"rank {r}: {e['dir'] or 'no checkpoint'} (step {e['step']})" for r, e in enumerate(everyone))
        raise CheckpointError(src if src is not None else "latest",
                              f"ranks found different checkpoints to resume from ({where}); every rank must see "
                              "the same checkpoint (a shared file system, or copy it to every node)")
    missing = [(r, e["file"]) for r, e in enumerate(everyone) if e["status"] == "missing"]
    if missing:
        r, f = missing[0]
        raise CheckpointError(f, f"is missing (rank {r}'s compression state; missing on ranks "
                                 f"{[m for m, _ in missing]}), so ranks would resume at different hook steps; "
                                 "restore the file, or resume from an older checkpoint")
    statuses = {e["status"] for e in everyone}
    hook_steps = {e["hook_step"] for e in everyone}
    if len(statuses) > 1 or len(hook_steps) > 1:
        by_rank = "; ".join(f"rank {r}: {e['status']} at hook step {e['hook_step']} ({e['file']})"
                            for r, e in enumerate(everyone))
        raise CheckpointError(loaded.comp_path if loaded is not None else "latest",
                              f"ranks disagree on the compression state to resume ({by_rank})")


# ---- FSDP2: whole tensors in the files, each rank's shards in the run
def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor().detach().cpu() if isinstance(t, DTensor) else t


def _full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state dicts with whole tensors (FSDP's shards all-gathered, every rank
    in the same order; DDP's own dicts otherwise, so both write one checkpoint format)."""
    model_sd = {k: _full(v) for k, v in model.state_dict().items()}
    osd = optimizer.state_dict()
    optim_sd = {"state": {i: {k: _full(v) for k, v in st.items()} for i, st in osd["state"].items()},
                "param_groups": osd["param_groups"]}
    return model_sd, optim_sd


def _shard(full, like):
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor) and not isinstance(full, DTensor):  # each rank cuts its own shard
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)
    return full


def _shard_like(sd: dict, ref: dict) -> dict:
    return {k: _shard(v, ref[k]) if k in ref else v for k, v in sd.items()}


def _shard_optimizer_like(sd: dict, optimizer) -> dict:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {i: {k: _shard(v, params[i]) if isinstance(v, torch.Tensor) and v.dim() > 0 and is_int(i)
                 and 0 <= i < len(params) else v for k, v in st.items()} for i, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}
