"""Measure encode and decode throughput of the codecs and format kernels next to memcpy, in one run.

Throughput is GB/s of float32 input (4 bytes per element); every ratio (``x memcpy``) is to
``dst.copy_(src)`` of the same number of elements into a preallocated buffer, timed in the same
process and thread setting just before: the memory-bandwidth yardstick. Decodes write into a
preallocated buffer too. Inputs (``--inputs``):

* ``synthetic``: ``--numel`` (default 16M) lognormal magnitudes (``sigma`` 2, ``mu`` -7) with
  random signs, the codec's own fit-derived plan;
* ``lm`` / ``cnn``: a real gradient bucket -- the whole flattened gradient (DDP's bucket order,
  parameters reversed) of ``benchmarks/_tasks.py``'s byte-level GPT (5.6M parameters, one 25 MB
  bucket) or BatchNorm CNN (0.3M) after ``--grad-steps`` training steps of its own recipe, on
  one process. Their sizes are the models' (the CNN's fits in cache, so memcpy is faster there).

Rows, for 1 thread and for all cores (``--threads``; ``x 1 thread`` compares a row with its
one-thread time):

* ``fmt:<format>/<rounding>``: the fused FP encode+pack and unpack+decode kernels alone
  (``gradcomp.codecs.dense.encode_fp_values``), every width 4..8, both roundings, on the native
  kernels (and on the eager reference, synthetic input, with ``--paths native,eager``);
* ``gradcomp.encode/decode(packed=True)``: the public fused path; ``gradcomp.pack(encode())`` and
  ``decode(unpack())``: the public two-call path, for comparison;
* ``codec:<codec>``: every codec's full ``encode`` (header, plan given, no-saturation check,
  pruning and positions) and ``decode_payload``.

    python benchmarks/codec_throughput.py                                  # Markdown to stdout
    python benchmarks/codec_throughput.py --output benchmarks/results/codec_throughput
    python benchmarks/codec_throughput.py --numel 1000000 --repeats 3 --inputs synthetic --json

``--output DIR`` writes ``codec_throughput.json``, ``.csv``, ``.md`` and ``.png`` (encode and
decode ``x memcpy`` per row and input). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from gradcomp import FPFormat
from gradcomp.app.env import environment
from gradcomp.numerics.rng import derive_key

INPUTS = ("synthetic", "lm", "cnn")
PATHS = ("native", "eager")


@dataclass(frozen=True)
class Case:
    fmt: FPFormat
    rounding: str

    @property
    def name(self) -> str:
        return f"fmt:e{self.fmt.exp_bits}m{self.fmt.man_bits}/{self.rounding}"


# Every width 4..8 (the split the planners pick most for lognormal gradients), both roundings.
CASES = [Case(FPFormat(e, m), r) for e, m in ((2, 1), (2, 2), (3, 2), (3, 3), (4, 3))
         for r in ("nearest", "stochastic")]


def _time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after two warm-up runs."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _codecs() -> list[tuple[str, object]]:
    from gradcomp import codecs as C

    return [("IdentityCodec()", C.IdentityCodec()), ("HalfCodec()", C.HalfCodec()),
            ("FPCodec(8)", C.FPCodec(8)), ("FPCodec(6)", C.FPCodec(6)), ("FPCodec(4)", C.FPCodec(4)),
            ("PruneCodec(0.85)", C.PruneCodec(0.85)), ("PruneFPCodec(0.85, 6)", C.PruneFPCodec(0.85, 6)),
            ("BudgetCodec(1.5)", C.BudgetCodec(1.5)), ("TopKCodec(0.01)", C.TopKCodec(0.01))]


def synthetic_input(numel: int) -> torch.Tensor:
    """Lognormal magnitudes (sigma 2, mu -7) with random signs, seed 0."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=gen).mul_(2.0).sub_(7.0).exp_()
    x *= torch.where(torch.rand(numel, generator=gen) < 0.5, -1.0, 1.0)
    return x


def real_gradient(task_name: str, steps: int) -> tuple[torch.Tensor, str]:
    """The flattened gradient (parameters in reverse order, as DDP buckets them) of ``task_name``'s
    model after ``steps`` optimizer steps of its recipe on one process, and a description."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from _tasks import TASKS

    task = TASKS[task_name]
    cfg = dict(task.defaults)
    data = task.load_data()
    model = task.build_model(data, cfg, seed=0)
    opt = task.optimizer(model.parameters(), cfg)
    opt, sched = opt if isinstance(opt, tuple) else (opt, None)
    batches = task.batches(data, cfg, rank=0, world=1, seed=0)
    for _ in range(steps + 1):
        x, y = next(batches)
        opt.zero_grad()
        task.loss(model(x), y).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in reversed(list(model.parameters())) if p.grad is not None])
        opt.step()
        if sched is not None:
            sched.step()
    return grad.contiguous(), f"{task.model_name(cfg)}, gradient of step {steps + 1}"


def _measure_input(name: str, x: torch.Tensor, repeats: int, threads: list[int], paths: list[str],
                   progress: bool) -> list[dict]:
    import gradcomp
    from gradcomp.codecs import decode_payload
    from gradcomp.codecs.base import fit_or_none
    from gradcomp.codecs.dense import FPPlan, decode_fp_values, encode_fp_values
    from gradcomp.numerics import kernels
    from gradcomp.numerics.lognormal import scale_exponent

    numel = x.numel()
    dst = torch.empty_like(x)
    out = torch.empty_like(x)
    gb = numel * 4 / 1e9
    fit = fit_or_none(x)
    rows: list[dict] = []

    def row(case, path, nthreads, memcpy_s, enc_s, dec_s, fmt_name=""):
        rows.append({"input": name, "numel": numel, "case": case, "format": fmt_name, "path": path,
                     "threads": nthreads, "memcpy_gbps": gb / memcpy_s, "encode_s": enc_s, "decode_s": dec_s,
                     "encode_gbps": gb / enc_s, "decode_gbps": gb / dec_s,
                     "encode_vs_memcpy": memcpy_s / enc_s, "decode_vs_memcpy": memcpy_s / dec_s})

    def say(msg):
        if progress:
            print(f"  [{name}] {msg}", file=sys.stderr, flush=True)

    for nthreads in threads:
        torch.set_num_threads(nthreads)
        memcpy_s = _time(lambda: dst.copy_(x), repeats)
        say(f"{nthreads} thread(s): memcpy {gb / memcpy_s:.2f} GB/s")
        for path in paths:
            if path == "native" and not kernels.warmup():
                print("  native kernels unavailable: skipping native rows", file=sys.stderr)
                continue
            if path == "eager" and name != "synthetic":
                continue  # the reference path, once
            os.environ["GRADCOMP_KERNELS"] = "auto" if path == "native" else "eager"
            for case in CASES:
                say(f"{nthreads} thread(s), {path}: {case.name}")
                k = scale_exponent(fit.mu, fit.sigma, case.fmt) if fit is not None else 0
                plan = FPPlan(case.fmt, k)
                st = case.rounding == "stochastic"
                packed = encode_fp_values(x, plan, st, derive_key(1))
                row(case.name, path, nthreads, memcpy_s,
                    _time(lambda: encode_fp_values(x, plan, st, derive_key(1)), repeats),
                    _time(lambda: decode_fp_values(packed, case.fmt, k, numel, out), repeats), case.fmt.name)
            fmt6 = FPFormat(3, 2)
            k6 = scale_exponent(fit.mu, fit.sigma, fmt6) if fit is not None else 0
            say(f"{nthreads} thread(s), {path}: format functions")
            wire = gradcomp.encode(x, fmt6, "stochastic", key=1, scale_exp=k6, packed=True)
            row("gradcomp.encode/decode(packed=True)", path, nthreads, memcpy_s,
                _time(lambda: gradcomp.encode(x, fmt6, "stochastic", key=1, scale_exp=k6, packed=True), repeats),
                _time(lambda: gradcomp.decode(wire, fmt6, scale_exp=k6, packed=True, out=out), repeats),
                fmt6.name)
            row("gradcomp.pack(encode()) / decode(unpack())", path, nthreads, memcpy_s,
                _time(lambda: gradcomp.pack(gradcomp.encode(x, fmt6, "stochastic", key=1, scale_exp=k6), 6), repeats),
                _time(lambda: gradcomp.decode(gradcomp.unpack(wire, 6, numel), fmt6, scale_exp=k6, out=out), repeats),
                fmt6.name)
            for cname, codec in _codecs():
                say(f"{nthreads} thread(s), {path}: codec {cname}")
                plan = codec.plan(fit) if codec.uses_fit else None
                payload = codec.encode(x, key=1, plan=plan)
                row("codec:" + cname, path, nthreads, memcpy_s,
                    _time(lambda: codec.encode(x, key=1, plan=plan), repeats),
                    _time(lambda: decode_payload(payload, numel, out=out), repeats),
                    codec.describe(plan).get("format") or "")
        os.environ["GRADCOMP_KERNELS"] = "auto"
    one = {(r["case"], r["path"]): r for r in rows if r["threads"] == min(threads)}
    for r in rows:
        base = one.get((r["case"], r["path"]))
        r["encode_speedup"] = base["encode_s"] / r["encode_s"] if base else None
        r["decode_speedup"] = base["decode_s"] / r["decode_s"] if base else None
    return rows


def run(numel: int, repeats: int, threads: list[int], paths: list[str], inputs: list[str],
        grad_steps: int, progress: bool) -> dict:
    rows: list[dict] = []
    described = {}
    for name in inputs:
        if name == "synthetic":
            x, what = synthetic_input(numel), f"{numel:,} lognormal magnitudes (sigma 2, mu -7), random signs"
        else:
            if progress:
                print(f"  [{name}] training {grad_steps} steps for a real gradient ...", file=sys.stderr, flush=True)
            torch.set_num_threads(max(threads))
            x, what = real_gradient(name, grad_steps)
        described[name] = {"numel": x.numel(), "what": what}
        rows += _measure_input(name, x, repeats, threads, paths, progress)
    return {"environment": environment(), "repeats": repeats, "threads": threads, "inputs": described,
            "results": rows}


def _f(v, fmt: str = ".3f") -> str:
    return "" if v is None else format(v, fmt)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# Codec throughput (median of {report['repeats']}, ratios to memcpy of the same size)",
        "",
        f"CPU: {env['cpu']}, {env['cores']} cores; torch {env['torch']}; python {env['python']}; "
        f"gradcomp {env['gradcomp']}",
        "",
        "Inputs: " + "; ".join(f"`{k}`: {v['what']} ({v['numel']:,} elements)" for k, v in report["inputs"].items()),
        "",
        "| input | case | path | threads | memcpy GB/s | encode GB/s | encode x memcpy | encode x 1 thread "
        "| decode GB/s | decode x memcpy | decode x 1 thread |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['input']} | {r['case']} | {r['path']} | {r['threads']} | {r['memcpy_gbps']:.2f} | "
            f"{r['encode_gbps']:.3f} | {r['encode_vs_memcpy']:.3f} | {_f(r['encode_speedup'], '.2f')} | "
            f"{r['decode_gbps']:.3f} | {r['decode_vs_memcpy']:.3f} | {_f(r['decode_speedup'], '.2f')} |")
    return "\n".join(lines)


def write_outputs(report: dict, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, "codec_throughput")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown(report) + "\n")
    rows = report["results"]
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    native = [r for r in rows if r["path"] == "native" and r["threads"] == 1]
    fig, axes = plt.subplots(1, len(report["inputs"]), figsize=(6 * len(report["inputs"]), 7), squeeze=False)
    for ax, name in zip(axes[0], report["inputs"]):
        sel = [r for r in native if r["input"] == name]
        ypos = range(len(sel))
        ax.barh([y - 0.2 for y in ypos], [r["encode_vs_memcpy"] for r in sel], 0.4, label="encode")
        ax.barh([y + 0.2 for y in ypos], [r["decode_vs_memcpy"] for r in sel], 0.4, label="decode")
        ax.axvline(0.6, color="k", ls="--", lw=0.8)
        ax.set_yticks(list(ypos), [r["case"] for r in sel], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("throughput / memcpy (1 thread, native)")
        ax.set_title(f"{name} ({report['inputs'][name]['numel']:,} elements)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=1 << 24, help="elements of the synthetic input (default 16M)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--threads", type=str, default=f"1,{os.cpu_count()}",
                   help="comma-separated thread counts (default: 1 and all cores)")
    p.add_argument("--paths", type=str, default="native,eager",
                   help="kernel paths: native (what training uses) and/or eager (the reference, synthetic input only)")
    p.add_argument("--inputs", type=str, default=",".join(INPUTS), help=f"comma-separated, of {INPUTS}")
    p.add_argument("--grad-steps", type=int, default=5, help="training steps before a real gradient is taken")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--output", type=str, default=None,
                   help="directory for codec_throughput.{json,csv,md,png}")
    args = p.parse_args(argv)
    if args.numel <= 0 or args.repeats <= 0 or args.grad_steps < 0:
        p.error("--numel and --repeats must be positive, --grad-steps non-negative")
    try:
        threads = sorted({int(t) for t in args.threads.split(",")})
    except ValueError:
        p.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if not threads or min(threads) < 1:
        p.error("--threads must be positive integers")
    paths = [s.strip() for s in args.paths.split(",")]
    if not paths or any(s not in PATHS for s in paths):
        p.error(f"--paths must list native and/or eager, got {args.paths!r}")
    inputs = [s.strip() for s in args.inputs.split(",")]
    if not inputs or any(s not in INPUTS for s in inputs):
        p.error(f"--inputs must list some of {INPUTS}, got {args.inputs!r}")
    report = run(args.numel, args.repeats, threads, paths, inputs, args.grad_steps, progress=not args.json)
    if args.output:
        write_outputs(report, args.output)
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
