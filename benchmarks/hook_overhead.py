"""Step time of DDP with each communication hook on a 25M-parameter model (uncapped loopback).

N gloo ranks (``--ranks``, default 2 and 4, one run each) on this machine train a stack of
linear layers on a tiny batch, so the step is dominated by gradient communication and the
hook's own encode/decode: the fast-link case, where compression cannot pay and a codec must
cost no more than the hook a user would pick instead. Reports the median and p90 step time per
method and the ratio to torch's ``fp16_compress_hook`` at the same N (target: every codec
<= 1.1x).

    python benchmarks/hook_overhead.py [--params 25e6] [--steps 12] [--ranks 2,4] [--output benchmarks/results]

``--output DIR`` writes ``hook_overhead.json``, ``.csv``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradcomp.app.env import environment, write_report

METHODS = ["fp32 (no hook)", "torch fp16_compress_hook", "FPCodec(8)", "FPCodec(6)", "FPCodec(4)",
           "PruneCodec(0.85)", "PruneFPCodec(0.85, 6)", "BudgetCodec(1.5)", "TopKCodec(0.01)"]


def _register(ddp, method: str):
    import gradcomp
    from gradcomp import codecs as C
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if method == "fp32 (no hook)":
        return None
    if method == "torch fp16_compress_hook":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    codec = eval(method, {"FPCodec": C.FPCodec, "PruneFPCodec": C.PruneFPCodec, "PruneCodec": C.PruneCodec,
                          "BudgetCodec": C.BudgetCodec, "TopKCodec": C.TopKCodec})
    return gradcomp.register(ddp, codec=codec, refit_every=50)


def _worker(rank: int, world: int, store: str, params: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    from gradcomp.numerics import kernels

    kernels.warmup()
    width = int((params / 5) ** 0.5)
    results = {}
    for method in METHODS:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(5)])
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=25)
        state = _register(ddp, method)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
        x = torch.randn(4, width)
        times = []
        for step in range(steps + 2):  # two warm-up steps (bucket rebuild, warm-up all-reduce)
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad()
            ddp(x).square().mean().backward()
            opt.step()
            if step >= 2:
                times.append(time.perf_counter() - t0)
        results[method] = {
            "p50_s": statistics.median(times),
            "p90_s": sorted(times)[int(0.9 * (len(times) - 1))],
            "bits_per_element": state.stats()["bits_per_element"] if state else (32 if method.startswith("fp32") else 16),
        }
        if state is not None:
            state.close()
        if rank == 0:
            print(f"  {method}: p50 {results[method]['p50_s'] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"params": sum(p.numel() for p in model.parameters()), "results": results}, f)
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=25e6)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--ranks", type=str, default="2,4", help="comma-separated world sizes, one run each")
    p.add_argument("--output", default=None, help="directory for hook_overhead.{json,csv,md,png}")
    a = p.parse_args(argv)
    try:
        worlds = [int(r) for r in a.ranks.split(",")]
    except ValueError:
        p.error(f"--ranks must be comma-separated integers, got {a.ranks!r}")
    if a.params < 1e4 or a.steps < 1 or not worlds or min(worlds) < 2:
        p.error("--params >= 1e4, --steps >= 1, --ranks >= 2")
    runs = {}
    for world in worlds:
        print(f"{world} ranks:", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "out.json")
            mp.spawn(_worker, args=(world, os.path.join(d, "store"), int(a.params), a.steps, out), nprocs=world)
            with open(out) as f:
                runs[world] = json.load(f)
    env = environment()
    report = {"environment": env, "steps": a.steps, "params": runs[worlds[0]]["params"],
              "runs": {str(w): r["results"] for w, r in runs.items()}}
    lines = [f"# Hook step time: {report['params'] / 1e6:.1f}M parameters, gloo ranks on one machine, "
             "uncapped loopback", "",
             f"CPU: {env['cpu']}, {env['cores']} cores, 1 torch thread per rank; torch {env['torch']}; "
             f"gradcomp {env['gradcomp']}; median of {a.steps} steps", "",
             "| ranks | method | bits/element | step p50 ms | step p90 ms | p50 / fp16 hook |",
             "|---:|---|---:|---:|---:|---:|"]
    rows = []
    for w, results in report["runs"].items():
        base = results["torch fp16_compress_hook"]["p50_s"]
        for m, r in results.items():
            rows.append({"ranks": int(w), "method": m, "bits_per_element": r["bits_per_element"],
                         "p50_ms": r["p50_s"] * 1e3, "p90_ms": r["p90_s"] * 1e3, "vs_fp16": r["p50_s"] / base})
            lines.append(f"| {w} | {m} | {r['bits_per_element']:.2f} | {r['p50_s'] * 1e3:.0f} | "
                         f"{r['p90_s'] * 1e3:.0f} | {r['p50_s'] / base:.2f} |")
    md = "\n".join(lines)
    write_report(a.output, "hook_overhead", report, md)
    if a.output:
        with open(os.path.join(a.output, "hook_overhead.csv"), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
        _plot(rows, os.path.join(a.output, "hook_overhead.png"))
    print(md)
    return 0


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({r["ranks"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 5))
    width = 0.8 / len(worlds)
    for i, w in enumerate(worlds):
        vals = {r["method"]: r["vs_fp16"] for r in rows if r["ranks"] == w}
        ax.barh([j + i * width for j in range(len(methods))], [vals.get(m, 0) for m in methods], width,
                label=f"{w} ranks")
    ax.axvline(1.1, color="k", ls="--", lw=0.8)
    ax.set_yticks([j + width * (len(worlds) - 1) / 2 for j in range(len(methods))], methods, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("step p50 / torch fp16_compress_hook's (uncapped)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
