"""Measure each codec's wire bits per element and error on a lognormal gradient-like shard.

For every codec: payload bits per element (header included), normalized squared error
``||y - x||^2 / ||x||^2``, mean relative error over nonzero entries, and the bias of the mean
over ``--keys`` independent encodes (``||mean_k y_k - x|| / ||x||``, which shrinks like
``1/sqrt(keys)`` for an unbiased codec).

    python benchmarks/codec_error.py [--numel 1048576] [--sigma 2.0] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from gradcomp import codecs as C
from gradcomp.codecs.base import fit_or_none
from gradcomp.app.env import environment, write_report


def codec_list() -> list[tuple[str, C.Codec]]:
    out = [
        ("IdentityCodec()", C.IdentityCodec()),
        ("HalfCodec()", C.HalfCodec()),
        ("FPCodec(8)", C.FPCodec(8)),
        ("FPCodec(6)", C.FPCodec(6)),
        ("FPCodec(5)", C.FPCodec(5)),
        ("FPCodec(4)", C.FPCodec(4)),
        ("FPCodec(8, criterion='relative')", C.FPCodec(8, criterion="relative")),
        ("FPCodec(6, criterion='relative')", C.FPCodec(6, criterion="relative")),
        ("FPCodec(4, criterion='relative')", C.FPCodec(4, criterion="relative")),
        ("PruneCodec(0.85)", C.PruneCodec(0.85)),
        ("PruneCodec(0.95)", C.PruneCodec(0.95)),
        ("PruneFPCodec(0.85, 6)", C.PruneFPCodec(0.85, 6)),
        ("TopKCodec(0.01)", C.TopKCodec(0.01)),
    ]
    out += [(f"BudgetCodec({b})", C.BudgetCodec(b)) for b in (1.5, 2.0, 4.0)]
    return out


def measure(numel: int, sigma: float, keys: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=g).mul(sigma).sub(7.0).exp()
    x *= torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0)
    fit = fit_or_none(x)
    rows = []
    xd = x.double()
    nz = x != 0
    for name, codec in codec_list():
        print(f"  {name} ...", file=sys.stderr, flush=True)
        plan = codec.plan(fit)
        t0 = time.perf_counter()
        payload = codec.encode(x, key=1, plan=plan)
        t1 = time.perf_counter()
        y = C.decode_payload(payload, numel).double()
        t2 = time.perf_counter()
        mean = y.clone()
        for k in range(2, keys + 1):
            mean += C.decode_payload(codec.encode(x, key=k, plan=plan), numel).double()
        mean /= keys
        rows.append({
            "codec": name,
            "bits_per_element": payload.numel() * 8 / numel,
            "nmse": ((y - xd).norm() ** 2 / xd.norm() ** 2).item(),
            "mean_relative_error": ((y[nz] - xd[nz]).abs() / xd[nz].abs()).mean().item(),
            "bias_after_keys": ((mean - xd).norm() / xd.norm()).item(),
            "encode_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3,
            "plan": {k: (v if isinstance(v, (int, float, str, type(None))) else str(v))
                     for k, v in codec.describe(plan).items()},
        })
    return {"environment": environment(),
            "numel": numel, "sigma": sigma, "keys": keys,
            "fit": {"mu": fit.mu, "sigma": fit.sigma}, "results": rows}


def markdown(r: dict) -> str:
    lines = [f"# Codec bits and error ({r['numel']:,} elements, |g| lognormal, sigma {r['sigma']})", "",
             f"torch {r['environment']['torch']}, {r['environment']['torch_threads']} thread(s), {r['environment']['cpu']}; "
             f"bias = ||mean of {r['keys']} encodes - x|| / ||x|| (shrinks like 1/sqrt(keys) if unbiased)", "",
             "| codec | bits/element | NMSE | mean rel. error | bias | encode ms | decode ms | plan |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for x in r["results"]:
        plan = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in x["plan"].items())
        lines.append(f"| {x['codec']} | {x['bits_per_element']:.3f} | {x['nmse']:.4g} | "
                     f"{x['mean_relative_error']:.4g} | {x['bias_after_keys']:.4g} | "
                     f"{x['encode_ms']:.0f} | {x['decode_ms']:.0f} | {plan} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=1 << 20)
    p.add_argument("--sigma", type=float, default=2.0)
    p.add_argument("--keys", type=int, default=16)
    p.add_argument("--json", action="store_true")
    p.add_argument("--output", default=None, help="directory for codec_error.{json,md}")
    a = p.parse_args(argv)
    if a.numel < 1 or a.keys < 1 or not a.sigma > 0:
        p.error("--numel and --keys must be positive, --sigma > 0")
    torch.set_num_threads(1)
    r = measure(a.numel, a.sigma, a.keys)
    md = markdown(r)
    write_report(a.output, "codec_error", r, md)
    print(json.dumps(r, indent=2) if a.json else md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
