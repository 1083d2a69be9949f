"""Shared pieces of the accuracy reproductions (st_bits.py, gradquant_table.py, gradquant_pruning.py).

Not a benchmark itself. It holds the one training recipe all three use (:data:`RECIPE`, the
same for every variant: the papers do not tune per bit width or per format), runs a grid of
:class:`gradcomp.app.train.TrainConfig` variants x seeds single-process with a progress line per run
and a running estimate of the time left, summarises accuracies, captures the GradQuant modules
of each run (``train()`` returns no model), and writes the reports.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from gradcomp.app import train as train_mod
from gradcomp.app.env import environment, write_report

# resnet1d width 32 (111k parameters) on MNIST-1D (4000 train / 1000 test), SGD with (heavy-ball)
# momentum, cosine decay to 0. Measured here: the fp32 model reaches 97-98.5% after 5-6 epochs
# (the data set's ceiling for small CNNs is about 98-99%), at ~2-3 s per epoch on one core.
RECIPE = dict(model="resnet1d", dataset="mnist1d", width=32, optimizer="sgd", lr=0.1, momentum=0.9,
              weight_decay=5e-4, schedule="cosine", batch_size=64, epochs=6, device="cpu", progress=False)
# --quick: a smoke run of the whole script (every variant, 1 seed, 3 steps on 256 samples).
QUICK = dict(epochs=1, max_steps=3, num_train=256)

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Variant:
    """One row of a table: a key (JSON), a label (Markdown) and the TrainConfig overrides.

    ``module_options``: attributes set on every GradQuant module right after the model is
    built, for options TrainConfig has no field for (e.g. ``{"rounding": "nearest"}``).
    """

    key: str
    label: str
    overrides: dict = field(default_factory=dict)
    module_options: dict = field(default_factory=dict)


def _fmt_time(s: float) -> str:
    s = round(max(0.0, s))
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{s} s"


def run_grid(variants: list[Variant], seeds: list[int], recipe: dict, *,
             observe: Callable[[Variant, int], "Observer"] | None = None,
             log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict[str, list[dict]]:
    """Train every variant for every seed (seed-major order); return ``{key: [run, ...]}``.

    Seed-major: after the first seed every variant has been timed once, so the estimate of the
    time left is good early, and a cut-short grid still covers every variant.
    ``observe(variant, seed)`` may return an :class:`Observer` whose ``on_step``/``finish`` see
    the run's GradQuant modules; ``finish()``'s dict is stored under the run's ``"observed"``.
    """
    runs: dict[str, list[dict]] = {v.key: [] for v in variants}
    per_variant: dict[str, list[float]] = {v.key: [] for v in variants}
    total = len(variants) * len(seeds)
    log(f"{total} runs planned ({len(variants)} variants x {len(seeds)} seeds), recipe: "
        + ", ".join(f"{k}={v}" for k, v in recipe.items() if k not in ("progress", "device")))
    t0 = time.perf_counter()
    k = 0
    for seed in seeds:
        for v in variants:
            k += 1
            cfg = train_mod.TrainConfig(**{**recipe, **v.overrides, "seed": seed})
            obs = observe(v, seed) if observe is not None else None
            if v.module_options:
                obs = obs if obs is not None else Observer()
                obs.module_options = dict(v.module_options)
            t = time.perf_counter()
            with (obs.capture() if obs is not None else contextlib.nullcontext()):
                r = train_mod.train(cfg, on_step=obs.on_step if obs is not None else None)
            dt = time.perf_counter() - t
            per_variant[v.key].append(dt)
            run = {"seed": seed, "final_accuracy": r["final_accuracy"], "final_loss": r["final_loss"],
                   "steps": r["steps"], "wall_seconds": dt, "step_time_p50": r["step_time_p50"],
                   "test_accuracy_per_epoch": [h["test_accuracy"] for h in r["history"]]}
            if obs is not None:
                run["observed"] = obs.finish()
            runs[v.key].append(run)
            # Time left: each remaining run at its variant's mean so far (all runs' mean if unseen).
            seen = [x for xs in per_variant.values() for x in xs]
            mean_all = sum(seen) / len(seen)
            left = 0.0
            j = 0
            for s in seeds:
                for w in variants:
                    j += 1
                    if j > k:
                        xs = per_variant[w.key]
                        left += sum(xs) / len(xs) if xs else mean_all
            elapsed = time.perf_counter() - t0
            log(f"[{k:>2}/{total}] {v.label:<22} seed {seed}: acc {r['final_accuracy']:.4f}  {dt:5.1f} s | "
                f"elapsed {_fmt_time(elapsed)}, est. left {_fmt_time(left)} (total ~{_fmt_time(elapsed + left)})")
    return runs


def summary(accs: list[float]) -> dict:
    """Mean, sample std (0 for one value), min, max and count of accuracies (fractions)."""
    return {"mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "min": min(accs), "max": max(accs), "n": len(accs)}


def pct(s: dict) -> str:
    """``mean ± std`` in percent."""
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def diff_pct(a: dict, base: dict) -> str:
    """Difference of means in percentage points, with the std of the difference (independent runs)."""
    d = 100 * (a["mean"] - base["mean"])
    sd = 100 * math.hypot(a["std"], base["std"])
    return f"{d:+.2f} ± {sd:.2f}"


class Observer:
    """Capture the GradQuant modules of one ``train()`` run (it returns no model).

    ``capture()`` wraps :func:`gradcomp.app.train.build_model` for the duration of the run, so the
    observer sees exactly the model and modules that train; subclasses override
    ``on_build``/``on_step``/``finish``.
    """

    def __init__(self):
        self.module_options: dict = {}
        self.model = None
        self.gradquant: list = []
        self.names: list[str] = []

    @contextlib.contextmanager
    def capture(self):
        orig = train_mod.build_model

        def build(config, bundle):
            model, gq = orig(config, bundle)
            for g in gq:
                for name, value in self.module_options.items():
                    if not hasattr(g, name):
                        raise ValueError(f"GradQuant has no attribute {name!r}")
                    setattr(g, name, value)
            self.model, self.gradquant = model, gq
            owners = {id(m.grad_quant): n for n, m in model.named_modules() if hasattr(m, "grad_quant")}
            self.names = [owners.get(id(g), f"#{g.index}") for g in gq]
            self.on_build()
            return model, gq

        train_mod.build_model = build
        try:
            yield self
        finally:
            train_mod.build_model = orig

    def on_build(self) -> None:
        pass

    def on_step(self, step: int) -> None:
        pass

    def finish(self) -> dict:
        return {}


def parse_args(description: str, argv=None, extra: Callable | None = None):
    """The common command line: --seeds, --epochs, --quick, --output, --render, --variants."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--epochs", type=int, help=f"override the recipe's {RECIPE['epochs']} epochs")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 seed, 3 steps per run on 256 samples; writes to a temporary "
                        "directory unless --output is given")
    p.add_argument("--output", help="results directory (default benchmarks/results)")
    p.add_argument("--render", action="store_true", help="only re-render the Markdown and PNG from the JSON")
    p.add_argument("--variants", help="comma-separated variant keys: run only these and merge them into the "
                                      "existing JSON in --output (same recipe and seeds required)")
    if extra is not None:
        extra(p)
    a = p.parse_args(argv)
    if a.seeds < 1 or (a.epochs is not None and a.epochs < 1):
        p.error("--seeds and --epochs must be >= 1")
    if a.output is None:
        a.output = tempfile.mkdtemp(prefix="gradcomp-quick-") if a.quick else DEFAULT_OUTPUT
    if os.path.exists(a.output) and not os.path.isdir(a.output):
        p.error(f"--output {a.output!r} is not a directory")
    return a


def recipe_for(a) -> tuple[dict, list[int]]:
    """The recipe and seeds the command line asks for."""
    recipe = dict(RECIPE)
    if a.epochs is not None:
        recipe["epochs"] = a.epochs
    if a.quick:
        recipe.update(QUICK)
    return recipe, list(range(1 if a.quick else a.seeds))


def header(env: dict, meta: dict) -> str:
    """The environment line of a report."""
    load = meta.get("load_average")
    return (f"Environment: {env['cpu']}, {env['cores']} cores (shared with other jobs; load average "
            f"{load[0]:.1f} at start), {env['torch_threads']} torch thread, torch {env['torch']}, "
            f"Python {env['python']}, gradcomp {env['gradcomp']}. Total wall time "
            f"{_fmt_time(meta['seconds'])}.")


def recipe_line(recipe: dict) -> str:
    r = recipe
    extra = "".join(f", {k} {r[k]}" for k in ("max_steps", "num_train") if r.get(k) is not None)
    return (f"Recipe (identical for every row): {r['model']} width {r['width']} on {r['dataset']}, "
            f"{r['optimizer']} lr {r['lr']} momentum {r['momentum']} weight decay {r['weight_decay']}, "
            f"{r['schedule']} schedule, batch {r['batch_size']}, {r['epochs']} "
            f"epoch{'s' if r['epochs'] != 1 else ''}{extra}, single "
            f"process, 1 thread; test accuracy in eval mode after the last epoch. Seed s sets the "
            f"weights, the data order and the MNIST-1D draw (train() generates the data set from the "
            f"seed), so the spread includes data-set variation.")


def save(output: str, stem: str, data: dict, markdown: str) -> None:
    """Write ``stem.json`` and ``stem.md`` (gradcomp.app.env.write_report) and say where."""
    write_report(output, stem, data, markdown)
    print(f"wrote {os.path.join(output, stem)}.{{json,md,png}}", file=sys.stderr)


def start_meta() -> dict:
    return {"load_average": list(os.getloadavg()), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "t0": time.perf_counter()}


def finish_meta(meta: dict) -> dict:
    t0 = meta.pop("t0")
    meta["seconds"] = time.perf_counter() - t0
    return meta


def collect(a, stem: str, variants: list[Variant], *, observe=None, extra: dict | None = None) -> dict:
    """Run the grid the command line asks for (or load it for --render); return the report data.

    ``--variants`` runs only the named variants and merges them into ``stem.json``: the other
    variants' runs are kept, so a table can be extended without rerunning it.
    """
    if a.render:
        return load_json(a.output, stem)
    set_threads()
    recipe, seeds = recipe_for(a)
    chosen = variants
    old = None
    if a.variants:
        keys = [k.strip() for k in a.variants.split(",") if k.strip()]
        known = {v.key: v for v in variants}
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; valid: {', '.join(known)}")
        chosen = [known[k] for k in keys]
        old = load_json(a.output, stem)
        if old["recipe"] != recipe or old["seeds"] != seeds:
            raise SystemExit(f"--variants: {stem}.json was made with recipe {old['recipe']} and seeds "
                             f"{old['seeds']}; this run has {recipe} and {seeds}")
    meta = start_meta()
    runs = run_grid(chosen, seeds, recipe, observe=observe)
    meta = finish_meta(meta)
    if old is not None:
        runs = {**old["runs"], **runs}
        meta = {**old["meta"], "seconds": old["meta"]["seconds"] + meta["seconds"],
                "merged": old["meta"].get("merged", []) + [{**meta, "variants": [v.key for v in chosen]}]}
    runs = {v.key: runs[v.key] for v in variants if v.key in runs}
    return {"environment": environment(), "meta": meta, "recipe": recipe, "seeds": seeds, "runs": runs,
            "summary": {k: summary([r["final_accuracy"] for r in rs]) for k, rs in runs.items()},
            **(extra or {})}


def load_json(output: str, stem: str) -> dict:
    with open(os.path.join(output, f"{stem}.json")) as f:
        return json.load(f)


def set_threads() -> None:
    torch.set_num_threads(1)


__all__ = ["RECIPE", "QUICK", "Variant", "run_grid", "summary", "pct", "diff_pct", "Observer",
           "parse_args", "recipe_for", "header", "recipe_line", "save", "start_meta", "finish_meta",
           "load_json", "set_threads", "environment", "collect"]


def two_panel_figure():
    """A headless 1x2 matplotlib figure: ``(fig, (ax1, ax2))``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(11, 4.2))


def finish_axes(ax, *, ylabel: str, title: str, xlabel: str | None = None,
                legend_fontsize: int | None = 8) -> None:
    """Label ``ax``, add the light grid and the legend every reproduction plot uses."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_fontsize)


def save_figure(fig, path: str) -> None:
    """Lay out, write (120 dpi) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def script_main(doc: str, stem: str, variants, markdown, plot, argv=None, **collect_kw) -> int:
    """Run a reproduction script: parse the common arguments, collect, save MD/JSON, plot, print."""
    a = parse_args(doc.splitlines()[0], argv)
    data = collect(a, stem, variants, **collect_kw)
    md = markdown(data)
    save(a.output, stem, data, md)
    plot(data, os.path.join(a.output, f"{stem}.png"))
    print(md)
    return 0
