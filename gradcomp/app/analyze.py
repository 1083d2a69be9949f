"""Reproduce the seed's KS table on our models: are weight and neural gradients lognormal?

``python -m gradcomp analyze`` (also ``gradcomp-analyze``) trains a model single-process with
plain SGD for a few hundred steps and, at a few evenly spaced checkpoint steps, samples per
layer (every ``Conv1d``/``Conv2d``/``Linear``, in module order):

* the **weight gradient** ``layer.weight.grad`` of that step, and
* the **neural gradient** -- the gradient w.r.t. the layer's output, taken by a full backward
  hook (``grad_output[0]``). The classifier's output gradient is the loss gradient
  ``softmax - onehot`` rather than a neural gradient, and the seed (like
  :func:`gradcomp.nn.convert_gradquant`) leaves it alone: it is recorded but kept out of the
  table (``in_table: false``).

For each sample it computes the seed's Kolmogorov-Smirnov comparison
(:func:`gradcomp.numerics.lognormal.ks_statistic`): Normal fitted to ``g`` vs Lognormal fitted to
``|g|`` (equivalently ``ln|g|`` vs a fitted Normal, nonzero entries only), and reports the KS
statistic as mean +- std over layers x checkpoints with the median p-value, weight and neural
gradients side by side. Parameters are estimated from the tested data, so the p-values are
conservative; they also shrink with ``--samples`` (the seed's p ~ 0.2-0.3 at D ~ 0.02-0.07
correspond to a few hundred to a few thousand samples).

Writes ``ks_analysis.json`` (config, environment, per-layer results, aggregates),
``ks_analysis.md`` (the table) and ``ks_analysis.png`` (histograms of ``ln|g|`` with the fitted
normal density, last checkpoint) into ``--output``.

Example:
    python -m gradcomp analyze --model resnet1d --dataset mnist1d --steps 300 --output out/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from gradcomp.app.config import is_int, is_real
from gradcomp.app.data import DATASETS, load_dataset, make_loader
from gradcomp.app.models import MODELS, build_model, num_parameters
from gradcomp.numerics import lognormal
from gradcomp.numerics.rng import derive_key

__all__ = ["AnalyzeConfig", "KINDS", "analyze", "prepare", "run", "markdown", "plot_histograms",
           "add_arguments", "main"]

KINDS = ("weight", "neural")
DISTS = ("normal", "lognormal")
STEM = "ks_analysis"
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)

# The seed's KS table (neural gradients; mean +- std over layers, p-value in parentheses).
SEED_TABLE = {
    "BERT (CoLA)": {"normal": (0.46, 0.02, 2e-4), "lognormal": (0.05, 0.002, 0.28)},
    "BERT (MRPC)": {"normal": (0.39, 0.04, 5e-5), "lognormal": (0.04, 0.002, 0.23)},
    "ResNet18 (ImageNet)": {"normal": (0.38, 0.1, 3e-6), "lognormal": (0.02, 0.002, 0.26)},
    "MobileNetV2 (ImageNet)": {"normal": (0.22, 0.09, 5e-6), "lognormal": (0.07, 0.003, 0.18)},
    "VGG16 (ImageNet)": {"normal": (0.35, 0.08, 3e-6), "lognormal": (0.06, 0.002, 0.31)},
    "DenseNet121 (ImageNet)": {"normal": (0.33, 0.1, 5e-5), "lognormal": (0.05, 0.001, 0.29)},
}


@dataclass(frozen=True)
class AnalyzeConfig:
    """What to train and how to sample its gradients (see the module docstring).

    ``checkpoints`` evenly spaced steps ``round(steps * k / checkpoints)``, ``k = 1..checkpoints``,
    are sampled; ``samples`` caps the entries drawn per layer, kind and checkpoint.
    """

    model: str = "resnet1d"
    dataset: str = "mnist1d"
    steps: int = 300
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    width: int = 32
    act_bits: int | None = None
    seed: int = 0
    samples: int = 10_000
    checkpoints: int = 3
    num_train: int | None = None

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; valid names: {', '.join(MODELS)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid names: {', '.join(DATASETS)}")
        for name, lo in (("steps", 1), ("batch_size", 1), ("width", 1), ("seed", 0),
                         ("samples", 10), ("checkpoints", 1)):
            v = getattr(self, name)
            if not is_int(v) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.checkpoints > self.steps:
            raise ValueError(f"checkpoints ({self.checkpoints}) must be <= steps ({self.steps})")
        for name, v, ok in (("lr", self.lr, lambda x: x > 0),
                            ("momentum", self.momentum, lambda x: 0 <= x < 1)):
            if not is_real(v) or not ok(v):
                raise ValueError(f"{name} must be {'> 0' if name == 'lr' else 'in [0, 1)'}, got {v!r}")
        if self.act_bits is not None and (not is_int(self.act_bits) or self.act_bits < 1):
            raise ValueError(f"act_bits must be None or an int >= 1, got {self.act_bits!r}")
        if self.act_bits is not None and self.model == "mlp":
            raise ValueError("act_bits (Squeeze-and-Threshold) applies to resnet1d/resnet2d, not mlp")
        if self.num_train is not None and (not is_int(self.num_train) or self.num_train < 1):
            raise ValueError(f"num_train must be None or an int >= 1, got {self.num_train!r}")

    @property
    def checkpoint_steps(self) -> list[int]:
        """The 1-based training steps whose gradients are sampled."""
        return sorted({max(1, round(self.steps * k / self.checkpoints))
                       for k in range(1, self.checkpoints + 1)})


def prepare(config: AnalyzeConfig):
    """Load the data set and build the model of ``config``; ``ValueError`` if they don't fit."""
    bundle = load_dataset(config.dataset, seed=config.seed, num_train=config.num_train)
    model = build_model(config.model, input_shape=bundle.input_shape, num_classes=bundle.num_classes,
                        width=config.width, act_bits=config.act_bits, seed=config.seed)
    if len(bundle.train) < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(bundle.train)} training "
                         f"samples of {config.dataset}")
    return bundle, model


def _target_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv/Linear layers in module order, except those inside an ST block's own bottleneck."""
    skip_types: tuple[type, ...] = ()
    try:
        from gradcomp.nn import SqueezeThreshold

        skip_types = (SqueezeThreshold,)
    except ImportError:  # ST not available: no such blocks to skip
        pass
    skip = [n for n, m in model.named_modules() if skip_types and isinstance(m, skip_types)]
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, LAYER_TYPES) and not any(n.startswith(s + ".") for s in skip)]


def _stats(sample: np.ndarray, seed: int) -> dict:
    """Lognormal fit, zero fraction and both KS tests of one gradient sample."""
    out: dict[str, float | None] = {"numel": int(sample.size), "zero_fraction": float(np.mean(sample == 0))}
    try:
        f = lognormal.fit(sample)
        out["mu"], out["sigma"] = f.mu, f.sigma
    except ValueError:
        out["mu"] = out["sigma"] = None
    for dist in DISTS:
        try:
            r = lognormal.ks_statistic(sample, dist, max_samples=max(sample.size, 1), seed=seed)
            out[f"ks_{dist}"], out[f"p_{dist}"] = r.statistic, r.pvalue
        except ValueError:  # too few nonzero entries or zero spread
            out[f"ks_{dist}"] = out[f"p_{dist}"] = None
    return out


def _aggregate(rows: list[dict]) -> dict:
    """Mean/std of the KS statistics and median p-values over ``rows`` (one kind)."""
    agg: dict[str, Any] = {"count": 0}  # count: int; per distribution: dict or None; sigma_mean: float or None
    for dist in DISTS:
        ks = np.array([r[f"ks_{dist}"] for r in rows if r[f"ks_{dist}"] is not None], dtype=np.float64)
        ps = np.array([r[f"p_{dist}"] for r in rows if r[f"p_{dist}"] is not None], dtype=np.float64)
        agg["count"] = max(agg["count"], int(ks.size))
        agg[dist] = ({"mean": float(ks.mean()), "std": float(ks.std()), "median_p": float(np.median(ps)),
                      "min": float(ks.min()), "max": float(ks.max())} if ks.size else None)
    sig = [r["sigma"] for r in rows if r["sigma"] is not None]
    agg["sigma_mean"] = float(np.mean(sig)) if sig else None
    return agg


@torch.no_grad()
def _accuracy(model: nn.Module, dataset, batch: int = 1000) -> float:
    was = model.training
    model.eval()
    x, y = dataset.tensors
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, len(y), batch))
    model.train(was)
    return correct / len(y)


def run(config: AnalyzeConfig, bundle, model: nn.Module, *, log=None) -> tuple[dict, dict]:
    """Train ``model`` on ``bundle`` per ``config``; return ``(result, samples)``.

    ``result`` is JSON-serializable (see the module docstring); ``samples`` maps
    ``(kind, layer_name)`` to the last checkpoint's sampled gradient (numpy), for plotting.
    """
    log = log or (lambda msg: None)
    layers = _target_layers(model)
    if not layers:
        raise ValueError(f"model {config.model!r} has no Conv/Linear layers to analyze")
    names = [n for n, _ in layers]
    last_layer = names[-1]
    ckpts = set(config.checkpoint_steps)
    loader = make_loader(bundle.train, config.batch_size, seed=config.seed)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    model.train()

    records: list[dict] = []
    samples: dict = {}
    losses: list[float] = []
    t0 = time.perf_counter()
    step, epoch = 0, 0
    while step < config.steps:
        cast(DistributedSampler, loader.sampler).set_epoch(epoch)  # make_loader's sampler
        for x, y in loader:
            step += 1
            collect = step in ckpts
            neural: dict[str, np.ndarray] = {}
            handles = []
            if collect:
                for idx, (name, layer) in enumerate(layers):
                    def hook(mod, grad_input, grad_output, name=name, idx=idx, neural=neural, step=step):
                        # Subsample inside the hook: keeps only `samples` values per layer.
                        neural[name] = lognormal.subsample(
                            grad_output[0], config.samples, seed=derive_key(config.seed, step, idx, 1) >> 32)
                    handles.append(layer.register_full_backward_hook(hook))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                # The stem's input (the data) needs no gradient; the hook still gets grad_output.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            for h in handles:
                h.remove()
            if collect:
                for idx, (name, layer) in enumerate(layers):
                    w = cast(torch.Tensor, layer.weight).grad
                    if w is None:
                        raise RuntimeError(f"layer {name!r} got no weight gradient in step {step}")
                    wsample = lognormal.subsample(
                        w, config.samples, seed=derive_key(config.seed, step, idx, 0) >> 32)
                    for kind, sample in (("weight", wsample), ("neural", neural.get(name))):
                        if sample is None:
                            continue
                        rec = {"step": step, "layer": name, "type": type(layer).__name__, "kind": kind,
                               "shape": list(w.shape) if kind == "weight" else None,
                               "in_table": not (kind == "neural" and name == last_layer)}
                        rec.update(_stats(sample, seed=config.seed))
                        records.append(rec)
                        if step == max(ckpts):
                            samples[(kind, name)] = sample
                log(f"step {step}/{config.steps}: loss {loss.item():.4f}, sampled {len(layers)} layers")
            opt.step()
            losses.append(float(loss.item()))
            if step >= config.steps:
                break
        epoch += 1
    train_seconds = time.perf_counter() - t0

    aggregates = {kind: _aggregate([r for r in records if r["kind"] == kind and r["in_table"]])
                  for kind in KINDS}
    per_checkpoint = {str(s): {kind: _aggregate([r for r in records if r["kind"] == kind and r["in_table"]
                                                 and r["step"] == s]) for kind in KINDS}
                      for s in sorted(ckpts)}
    from gradcomp.app.env import environment

    head = max(1, min(10, len(losses) // 10))
    result = {
        "config": asdict(config),
        "checkpoint_steps": sorted(ckpts),
        "environment": environment(),
        "model": {"name": config.model, "parameters": num_parameters(model), "layers": names,
                  "input_shape": list(bundle.input_shape), "num_classes": bundle.num_classes},
        "training": {"loss_first": float(np.mean(losses[:head])), "loss_last": float(np.mean(losses[-head:])),
                     "test_accuracy": _accuracy(model, bundle.test), "seconds": train_seconds,
                     "epochs": step / len(loader)},
        "aggregate": aggregates,
        "per_checkpoint": per_checkpoint,
        "layers": records,
        "seed_table": {k: {d: list(v) for d, v in row.items()} for k, row in SEED_TABLE.items()},
    }
    return result, samples


def _cell(a: dict | None) -> str:
    if a is None:
        return "n/a"
    return f"{a['mean']:.3f} ± {a['std']:.3f} (p {a['median_p']:.2g})"


def markdown(result: dict, title: str | None = None) -> str:
    """Return the Markdown KS table (and a per-layer table for the last checkpoint)."""
    c, m, t = result["config"], result["model"], result["training"]
    agg = result["aggregate"]
    title = title or f"KS goodness of fit: Normal(g) vs Lognormal(|g|) -- {c['model']} on {c['dataset']}"
    act = f", ST activations {c['act_bits']} bits" if c["act_bits"] else ""
    lines = [
        f"## {title}", "",
        f"{c['model']} (width {c['width']}{act}, {m['parameters']:,} parameters) on {c['dataset']}: "
        f"{c['steps']} SGD steps (batch {c['batch_size']}, lr {c['lr']}, momentum {c['momentum']}, "
        f"seed {c['seed']}); loss {t['loss_first']:.3f} -> {t['loss_last']:.3f}, test accuracy "
        f"{t['test_accuracy']:.4f}, {t['seconds']:.1f} s. Gradients sampled at steps "
        f"{', '.join(map(str, result['checkpoint_steps']))}, up to {c['samples']:,} entries per layer.",
        "",
        "| Distribution | Weight gradients | Neural gradients |",
        "|---|---|---|",
    ]
    for dist, label in (("normal", "Normal"), ("lognormal", "Lognormal")):
        lines.append(f"| {label} | {_cell(agg['weight'][dist])} | {_cell(agg['neural'][dist])} |")
    lines += [
        "",
        f"KS statistic, mean ± std over layers x checkpoints ({agg['weight']['count']} weight, "
        f"{agg['neural']['count']} neural samples; the classifier's output gradient is the loss "
        "gradient and is excluded), median p-value in parentheses. Lognormal: KS of ln|g| "
        "(nonzero entries) against the fitted normal; Normal: KS of g against the fitted normal.",
        "",
        "Seed (Chmiel et al., ICLR 2021), neural gradients: Normal 0.22-0.46, Lognormal 0.02-0.07 "
        "(e.g. ResNet18/ImageNet 0.38 ± 0.1 vs 0.02 ± 0.002).",
        "",
        f"Per layer, step {max(result['checkpoint_steps'])}:",
        "",
        "| layer | type | weight sigma | weight KS N / LN | neural sigma | neural zeros | neural KS N / LN |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    last = max(result["checkpoint_steps"])
    by = {(r["kind"], r["layer"]): r for r in result["layers"] if r["step"] == last}

    def f(v, fmt=".3f"):
        return "n/a" if v is None else format(v, fmt)

    for name in m["layers"]:
        w, n = by.get(("weight", name)), by.get(("neural", name))
        wtxt = (f(w and w["sigma"], ".2f"), f"{f(w and w['ks_normal'])} / {f(w and w['ks_lognormal'])}")
        if n is None:
            ntxt = ("n/a", "n/a", "n/a")
        else:
            mark = "" if n["in_table"] else " (excluded)"
            ntxt = (f(n["sigma"], ".2f"), f(n["zero_fraction"], ".2f"),
                    f"{f(n['ks_normal'])} / {f(n['ks_lognormal'])}{mark}")
        typ = next((r["type"] for r in (w, n) if r), "")
        lines.append(f"| {name} | {typ} | {wtxt[0]} | {wtxt[1]} | {ntxt[0]} | {ntxt[1]} | {ntxt[2]} |")
    return "\n".join(lines)


def plot_histograms(result: dict, samples: dict, path: str, title: str | None = None) -> None:
    """Save a PNG: per layer, histograms of ln|g| (weight and neural) with the fitted normals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = result["model"]["layers"]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.7 * rows + 0.6))
    FigureCanvasAgg(fig)
    colors = {"weight": "tab:orange", "neural": "tab:blue"}
    last = max(result["checkpoint_steps"])
    by = {(r["kind"], r["layer"]): r for r in result["layers"] if r["step"] == last}
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        parts = []
        for kind in KINDS:
            s = samples.get((kind, name))
            rec = by.get((kind, name))
            if s is None or rec is None or rec["sigma"] is None or not rec["sigma"] > 0:
                continue
            a = np.abs(s)
            logs = np.log(a[np.isfinite(a) & (a > 0)])
            ax.hist(logs, bins=60, density=True, histtype="stepfilled", alpha=0.45, color=colors[kind],
                    label=kind)
            xs = np.linspace(logs.min(), logs.max(), 200)
            mu, sd = rec["mu"], rec["sigma"]
            ax.plot(xs, np.exp(-0.5 * ((xs - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)),
                    color=colors[kind], lw=1.5)
            if rec["ks_lognormal"] is not None:
                note = "" if rec["in_table"] else " (loss grad)"
                parts.append(f"{kind[0]}: KS {rec['ks_lognormal']:.3f}{note}")
        ax.set_title(f"{name}\n" + ", ".join(parts), fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
        if i % cols == 0:
            ax.set_ylabel("density", fontsize=8)
        ax.set_xlabel("ln|g|", fontsize=8)
    c = result["config"]
    fig.suptitle(title or f"ln|g| at step {last}, {c['model']} on {c['dataset']} "
                 f"(bars: samples; lines: fitted normal; w = weight, n = neural gradient)", fontsize=10)
    # Fixed margins: tight_layout would cost an extra full draw (about a second here).
    height = 2.7 * rows + 0.6  # inches: the title needs ~0.4 above the top row's titles
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.5 / height, top=1 - 0.95 / height,
                        hspace=0.6, wspace=0.25)
    fig.savefig(path, dpi=110)


def _to_json(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_outputs(result: dict, samples: dict, output: str, stem: str = STEM) -> dict:
    """Write ``{stem}.json``, ``{stem}.md`` and ``{stem}.png`` into ``output``; return the paths."""
    os.makedirs(output, exist_ok=True)
    paths = {ext: os.path.join(output, f"{stem}.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2, default=_to_json)
    with open(paths["md"], "w") as f:
        f.write(markdown(result) + "\n")
    plot_histograms(result, samples, paths["png"])
    return paths


def analyze(config: AnalyzeConfig, output: str | None = None, *, log=None) -> dict:
    """Train per ``config``, sample and test the gradients; write files into ``output`` if given.

    Returns the result dict (``result["aggregate"][kind][dist]`` holds mean/std/median_p).
    """
    if not isinstance(config, AnalyzeConfig):
        raise ValueError(f"config must be an AnalyzeConfig, got {type(config).__name__}")
    bundle, model = prepare(config)
    result, samples = run(config, bundle, model, log=log)
    if output is not None:
        result["files"] = write_outputs(result, samples, output)
    return result


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the analyzer's options to ``p`` (shared by ``gradcomp analyze`` and ``gradcomp-analyze``)."""
    d = AnalyzeConfig()
    p.add_argument("--model", default=d.model, help=f"one of {', '.join(MODELS)} (default {d.model})")
    p.add_argument("--dataset", default=d.dataset, help=f"one of {', '.join(DATASETS)} (default {d.dataset})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"SGD steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"default {d.lr}")
    p.add_argument("--momentum", type=float, default=d.momentum, help=f"default {d.momentum}")
    p.add_argument("--width", type=int, default=d.width, help=f"model width (default {d.width})")
    p.add_argument("--act-bits", type=int, default=None, help="ST activation bits (ResNets; default off)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--samples", type=int, default=d.samples,
                   help=f"max gradient entries per layer and checkpoint (default {d.samples})")
    p.add_argument("--checkpoints", type=int, default=d.checkpoints,
                   help=f"evenly spaced steps to sample (default {d.checkpoints})")
    p.add_argument("--num-train", type=int, default=None, help="training samples (default: the dataset's)")
    p.add_argument("--output", default=None, help="directory for ks_analysis.{json,md,png}")
    p.add_argument("--json", action="store_true", help="print the result JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the analyzer for parsed ``args``; invalid arguments -> ``parser.error`` (exit 2)."""
    if args.output is not None and os.path.exists(args.output) and not os.path.isdir(args.output):
        parser.error(f"--output {args.output!r} exists and is not a directory")
    try:
        config = AnalyzeConfig(model=args.model, dataset=args.dataset, steps=args.steps,
                               batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                               width=args.width, act_bits=args.act_bits, seed=args.seed,
                               samples=args.samples, checkpoints=args.checkpoints,
                               num_train=args.num_train)
        bundle, model = prepare(config)
    except (ValueError, ImportError) as e:
        parser.error(str(e))
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result, samples = run(config, bundle, model, log=log)
    if args.output is not None:
        result["files"] = write_outputs(result, samples, args.output)
    if args.json:
        print(json.dumps(result, indent=2, default=_to_json))
    else:
        print(markdown(result))
        if args.output is not None:
            print(f"\nwrote {', '.join(result['files'].values())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``gradcomp-analyze``."""
    p = argparse.ArgumentParser(prog="gradcomp-analyze", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_args(p.parse_args(argv), p)


if __name__ == "__main__":
    raise SystemExit(main())
