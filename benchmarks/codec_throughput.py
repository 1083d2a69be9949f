"""Measure encode+pack and unpack+decode throughput next to memcpy, in the same run.

Throughput is GB/s of float32 input (4 bytes per element), for one thread and for all cores.
memcpy is ``dst.copy_(src)`` into a preallocated float32 buffer of the same size: the
memory-bandwidth yardstick the codec ratios are quoted against. Two kinds of rows:

* format rows (``fp6_e3m2_*``): the FP kernels alone, on the native fused path
  (:mod:`gradcomp.numerics.kernels`) and on the eager reference path;
* format-function rows: ``gradcomp.encode`` / ``decode`` (FP6 codes, unpacked; decode into a
  preallocated ``out=``, as memcpy) and ``gradcomp.pack`` / ``unpack`` (6-bit codes), native
  and eager;
* codec rows (``codec:...``): every codec's full ``encode`` (header, fit-derived plan given,
  no-saturation check, pruning/positions) and ``decode_payload`` into a preallocated buffer,
  on the native kernels (``native``: what training uses) and on the eager reference.

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
from dataclasses import dataclass
from typing import Callable

import torch

from gradcomp import FPFormat
from gradcomp.app.env import environment
from gradcomp.numerics.rng import derive_key


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


def _codecs() -> list[tuple[str, object]]:
    from gradcomp import codecs as C

    return [("IdentityCodec()", C.IdentityCodec()), ("HalfCodec()", C.HalfCodec()),
            ("FPCodec(8)", C.FPCodec(8)), ("FPCodec(6)", C.FPCodec(6)), ("FPCodec(4)", C.FPCodec(4)),
            ("PruneCodec(0.85)", C.PruneCodec(0.85)), ("PruneFPCodec(0.85, 6)", C.PruneFPCodec(0.85, 6)),
            ("BudgetCodec(1.5)", C.BudgetCodec(1.5)), ("TopKCodec(0.01)", C.TopKCodec(0.01))]


def run(numel: int, repeats: int, threads: list[int], progress: bool, paths: list[str]) -> dict:
    import gradcomp
    from gradcomp.numerics import kernels
    from gradcomp.codecs import decode_payload
    from gradcomp.codecs.base import fit_or_none
    from gradcomp.codecs.dense import FPPlan, decode_fp_values, encode_fp_values

    gen = torch.Generator().manual_seed(0)
    # Gradient-like input: lognormal magnitudes with random signs.
    x = torch.randn(numel, generator=gen).mul_(2.0).sub_(7.0).exp_()
    x *= torch.where(torch.rand(numel, generator=gen) < 0.5, -1.0, 1.0)
    dst = torch.empty_like(x)
    out = torch.empty_like(x)
    gb = numel * 4 / 1e9
    fit = fit_or_none(x)
    rows = []

    def row(name, fmt_name, rounding, nthreads, memcpy_s, enc_s, dec_s, path):
        rows.append({
            "case": name, "format": fmt_name, "rounding": rounding, "threads": nthreads,
            "numel": numel, "path": path, "memcpy_gbps": gb / memcpy_s,
            "encode_pack_gbps": gb / enc_s, "unpack_decode_gbps": gb / dec_s,
            "encode_pack_vs_memcpy": memcpy_s / enc_s, "unpack_decode_vs_memcpy": memcpy_s / dec_s,
        })

    for nthreads in threads:
        torch.set_num_threads(nthreads)
        memcpy_s = _time(lambda: dst.copy_(x), repeats)
        for path in paths:
            if path == "native" and not kernels.warmup():
                print("  native kernels unavailable: skipping native rows", file=sys.stderr)
                continue
            os.environ["GRADCOMP_KERNELS"] = path
            for case in CASES:
                if progress:
                    print(f"  {nthreads} thread(s), {path}: {case.name} ...", file=sys.stderr, flush=True)
                plan = FPPlan(case.fmt, -9)
                st = case.rounding == "stochastic"
                packed = encode_fp_values(x, plan, st, derive_key(1))
                enc_s = _time(lambda: encode_fp_values(x, plan, st, derive_key(1)), repeats)
                dec_s = _time(lambda: decode_fp_values(packed, case.fmt, -9, numel, out), repeats)
                row(case.name, case.fmt.name, case.rounding, nthreads, memcpy_s, enc_s, dec_s, path)
        fmt6 = FPFormat(3, 2)
        for path in paths:
            # The format functions on unpacked codes (gradcomp.encode/decode, pack/unpack):
            # GB/s of the fp32 elements they stand for, like every other row.
            os.environ["GRADCOMP_KERNELS"] = "auto" if path == "native" else "eager"
            if progress:
                print(f"  {nthreads} thread(s), {path}: format functions ...", file=sys.stderr, flush=True)
            codes = gradcomp.encode(x, fmt6, "stochastic", key=1, scale_exp=-9)
            packed = gradcomp.pack(codes, 6)
            row("gradcomp.encode / decode", fmt6.name, "stochastic", nthreads, memcpy_s,
                _time(lambda: gradcomp.encode(x, fmt6, "stochastic", key=1, scale_exp=-9), repeats),
                _time(lambda: gradcomp.decode(codes, fmt6, scale_exp=-9, out=out), repeats), path)
            row("gradcomp.pack / unpack", "6-bit codes", "", nthreads, memcpy_s,
                _time(lambda: gradcomp.pack(codes, 6), repeats),
                _time(lambda: gradcomp.unpack(packed, 6, numel), repeats), path)
            for name, codec in _codecs():
                if progress:
                    print(f"  {nthreads} thread(s), {path}: codec {name} ...", file=sys.stderr, flush=True)
                plan = codec.plan(fit) if codec.uses_fit else None
                payload = codec.encode(x, key=1, plan=plan)
                enc_s = _time(lambda: codec.encode(x, key=1, plan=plan), repeats)
                dec_s = _time(lambda: decode_payload(payload, numel, out=out), repeats)
                row("codec:" + name, codec.describe(plan).get("format") or "", "", nthreads, memcpy_s,
                    enc_s, dec_s, path)
        os.environ["GRADCOMP_KERNELS"] = "auto"
    return {"environment": environment(), "numel": numel, "repeats": repeats, "results": rows}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# Codec throughput ({report['numel']:,} float32 elements, median of {report['repeats']})",
        "",
        f"CPU: {env['cpu']}, {env['cores']} cores; torch {env['torch']}; python {env['python']}",
        "",
        "| case | path | threads | memcpy GB/s | encode GB/s (x memcpy) | decode GB/s (x memcpy) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['case']} | {r['path']} | {r['threads']} | {r['memcpy_gbps']:.2f} | "
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
    p.add_argument("--paths", type=str, default="native,eager",
                   help="FP kernel paths to time for the format rows (default native,eager)")
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
    paths = [p.strip() for p in args.paths.split(",")]
    if not paths or any(p not in ("native", "eager") for p in paths):
        p.error(f"--paths must list native and/or eager, got {args.paths!r}")
    report = run(args.numel, args.repeats, threads, progress=not args.json, paths=paths)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
