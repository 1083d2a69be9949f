"""Step time of DDP with each communication hook on a 25M-parameter model (uncapped loopback).

Two (or ``--ranks``) gloo ranks on this machine train a stack of linear layers on a tiny batch,
so the step is dominated by gradient communication and the hook's own encode/decode. Reports
the median and p90 step time per method and the ratio to torch's ``fp16_compress_hook``.

    python benchmarks/hook_overhead.py [--params 25e6] [--steps 12] [--output benchmarks/results]
"""

from __future__ import annotations

import argparse
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

METHODS = ["fp32 (no hook)", "torch fp16_compress_hook", "FPCodec(8)", "FPCodec(6)",
           "PruneFPCodec(0.85, 6)", "BudgetCodec(1.5)"]


def _register(ddp, method: str):
    import gradcomp
    from gradcomp import codecs as C
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if method == "fp32 (no hook)":
        return None
    if method == "torch fp16_compress_hook":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    codec = eval(method, {"FPCodec": C.FPCodec, "PruneFPCodec": C.PruneFPCodec,
                          "BudgetCodec": C.BudgetCodec})
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
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--output", default=None, help="directory for hook_overhead.{json,md}")
    a = p.parse_args(argv)
    if a.params < 1e4 or a.steps < 1 or a.ranks < 2:
        p.error("--params >= 1e4, --steps >= 1, --ranks >= 2")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        mp.spawn(_worker, args=(a.ranks, os.path.join(d, "store"), int(a.params), a.steps, out),
                 nprocs=a.ranks)
        with open(out) as f:
            report = json.load(f)
    report["environment"] = environment()
    report["ranks"] = a.ranks
    base = report["results"]["torch fp16_compress_hook"]["p50_s"]
    lines = [f"# Hook step time: {report['params'] / 1e6:.1f}M parameters, {a.ranks} gloo ranks, "
             "uncapped loopback", "",
             f"CPU: {report['environment']['cpu']}, {report['environment']['cores']} cores, 1 torch "
             f"thread per rank; torch {report['environment']['torch']}; median of {a.steps} steps", "",
             "| method | bits/element | step p50 ms | step p90 ms | p50 / fp16 hook |",
             "|---|---:|---:|---:|---:|"]
    for m, r in report["results"].items():
        lines.append(f"| {m} | {r['bits_per_element']:.2f} | {r['p50_s'] * 1e3:.0f} | "
                     f"{r['p90_s'] * 1e3:.0f} | {r['p50_s'] / base:.2f} |")
    md = "\n".join(lines)
    write_report(a.output, "hook_overhead", report, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
