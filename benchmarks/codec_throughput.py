"""Measure encode+pack and unpack+decode throughput next to memcpy, in the same run.

Throughput is GB/s of float32 input (4 bytes per element), for one thread and for all cores.
memcpy is ``dst.copy_(src)`` into a preallocated float32 buffer of the same size: the
memory-bandwidth yardstick the codec ratios are quoted against.

    python benchmarks/codec_throughput.py                 # Markdown table
    python benchmarks/codec_throughput.py --json          # machine-readable, to stdout
    python benchmarks/codec_throughput.py --numel 1000000 --repeats 3 --output out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

import gradcomp
from gradcomp import FPFormat
from gradcomp.packing import pack_unchecked, unpack
from gradcomp.env import environment
from gradcomp.rng import derive_key


@dataclass(frozen=True)
class Case:
    name: str
    fmt: FPFormat
    rounding: str


CASES = [
    Case("fp8_e4m3_nearest", FPFormat(4, 3), "nearest"),
    Case("fp6_e3m2_nearest", FPFormat(3, 2), "nearest"),
    Case("fp6_e3m2_stochastic", FPFormat(3, 2), "stochastic"),
    Case("fp4_e2m1_nearest", FPFormat(2, 1), "nearest"),
]


def _time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(numel: int, repeats: int, threads: list[int], progress: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    # Gradient-like input: lognormal magnitudes with random signs, scaled into the format range.
    x = torch.randn(numel, generator=gen).mul_(2.0).exp_()
    x *= torch.where(torch.rand(numel, generator=gen) < 0.5, -1.0, 1.0)
    dst = torch.empty_like(x)
    gb = numel * 4 / 1e9
    rows = []
    for nthreads in threads:
        torch.set_num_threads(nthreads)
        memcpy_s = _time(lambda: dst.copy_(x), repeats)
        for case in CASES:
            if progress:
                print(f"  {nthreads} thread(s): {case.name} ...", file=sys.stderr, flush=True)
            key = derive_key(1) if case.rounding == "stochastic" else None
            kw = {"key": key} if key is not None else {}
            bits = case.fmt.bits
            packed = pack_unchecked(gradcomp.encode(x, case.fmt, case.rounding, nan_check=False, **kw), bits)
            enc_s = _time(lambda: pack_unchecked(
                gradcomp.encode(x, case.fmt, case.rounding, nan_check=False, **kw), bits), repeats)
            dec_s = _time(lambda: gradcomp.decode(unpack(packed, bits, numel), case.fmt), repeats)
            rows.append({
                "case": case.name, "format": case.fmt.name, "rounding": case.rounding,
                "threads": nthreads, "numel": numel,
                "memcpy_gbps": gb / memcpy_s,
                "encode_pack_gbps": gb / enc_s, "unpack_decode_gbps": gb / dec_s,
                "encode_pack_vs_memcpy": memcpy_s / enc_s,
                "unpack_decode_vs_memcpy": memcpy_s / dec_s,
                "path": "eager",
            })
    return {"environment": environment(), "numel": numel, "repeats": repeats, "results": rows}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# Codec throughput ({report['numel']:,} float32 elements, median of {report['repeats']})",
        "",
        f"CPU: {env['cpu']}, {env['cores']} cores; torch {env['torch']}; python {env['python']}",
        "",
        "| case | threads | memcpy GB/s | encode+pack GB/s (x memcpy) | unpack+decode GB/s (x memcpy) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['case']} | {r['threads']} | {r['memcpy_gbps']:.2f} | "
            f"{r['encode_pack_gbps']:.3f} ({r['encode_pack_vs_memcpy']:.3f}) | "
            f"{r['unpack_decode_gbps']:.3f} ({r['unpack_decode_vs_memcpy']:.3f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=1 << 24, help="elements per tensor (default 16M)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--threads", type=str, default=f"1,{os.cpu_count()}",
                   help="comma-separated thread counts (default: 1 and all cores)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--output", type=str, default=None, help="also write the JSON report here")
    args = p.parse_args(argv)
    if args.numel <= 0 or args.repeats <= 0:
        p.error("--numel and --repeats must be positive")
    try:
        threads = sorted({int(t) for t in args.threads.split(",")})
    except ValueError:
        p.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if not threads or min(threads) < 1:
        p.error("--threads must be positive integers")
    report = run(args.numel, args.repeats, threads, progress=not args.json)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
