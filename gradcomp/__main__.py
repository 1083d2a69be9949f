"""Command line: ``python -m gradcomp demo`` / ``analyze`` (also installed as ``gradcomp``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from gradcomp.numerics import lognormal
from gradcomp.numerics.packing import pack, unpack
from gradcomp.numerics.pruning import prune_to_sparsity
from gradcomp.numerics.quant import decode, encode
from gradcomp.numerics.rng import derive_key

# Bytes of side information a payload of one shard carries next to its packed codes: the
# format (exp/man bits), the power-of-two scale exponent and a non-finite flag.
HEADER_BYTES = 4


def demo(numel: int, bits: int, mu: float, sigma: float, sparsity: float, seed: int) -> dict:
    """Quantize a lognormal gradient sample to ``bits``-bit FP at the optimal split; report."""
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    mag = torch.randn(numel, generator=gen, dtype=torch.float64).mul_(sigma).add_(mu).exp_()
    x = (mag * torch.where(torch.rand(numel, generator=gen) < 0.5, -1.0, 1.0)).to(torch.float32)

    fit = lognormal.fit(x)
    ks_normal = lognormal.ks_statistic(x, "normal", seed=seed)
    ks_lognormal = lognormal.ks_statistic(x, "lognormal", seed=seed)
    table = lognormal.split_table(bits, fit.sigma, mu=fit.mu)
    e_exact = lognormal.optimal_exp_bits(bits, fit.sigma, method="exact", mu=fit.mu)
    e_closed = lognormal.optimal_exp_bits(bits, fit.sigma, method="closed_form")
    row = next(r for r in table if r.exp_bits == e_exact)
    fmt, k = row.fmt, row.scale_exp

    results = {}
    for rounding in ("nearest", "stochastic"):
        key = derive_key(seed, 1) if rounding == "stochastic" else None
        scaled = x * 2.0**-k  # exact: a power of two
        packed = pack(encode(scaled, fmt, rounding, key=key), fmt.bits)
        xq = decode(unpack(packed, fmt.bits, numel), fmt) * 2.0**k
        nz = x != 0
        rel = ((xq[nz].double() - x[nz].double()).abs() / x[nz].double().abs()).mean().item()
        results[rounding] = {
            "measured_relative_error": rel,
            "predicted_relative_error": lognormal.exact_relative_error(fmt, fit.sigma, fit.mu, rounding, k),
            "payload_bytes": packed.numel(),
            "bits_per_element": (packed.numel() + HEADER_BYTES) * 8 / numel,
        }
    pruned, alpha = prune_to_sparsity(x, sparsity, key=derive_key(seed, 2), fit=fit)
    return {
        "numel": numel,
        "sample": {"mu": mu, "sigma": sigma},
        "fit": {"mu": fit.mu, "sigma": fit.sigma, "sigma_log2": fit.sigma / math.log(2),
                "count": fit.count},
        "ks": {"normal": list(ks_normal), "lognormal": list(ks_lognormal)},
        "split_table": [
            {"format": r.fmt.name, "exp_bits": r.exp_bits, "man_bits": r.man_bits,
             "scale_exp": r.scale_exp, "exact_error": r.exact_error,
             "closed_form_error": r.closed_form_error}
            for r in table
        ],
        "optimal_exp_bits": {"exact": e_exact, "closed_form": e_closed},
        "chosen": {"format": fmt.name, "scale_exp": k},
        "quantized": results,
        "pruning": {"target_sparsity": sparsity, "alpha": alpha,
                    "measured_sparsity": (pruned == 0).double().mean().item()},
        "seconds": time.perf_counter() - t0,
    }


def _print_demo(r: dict) -> None:
    f, ks = r["fit"], r["ks"]
    print(f"gradcomp demo: {r['numel']:,} gradient-like values, |g| ~ Lognormal(mu={r['sample']['mu']}, "
          f"sigma={r['sample']['sigma']}) with random signs\n")
    print(f"lognormal fit: mu={f['mu']:.4f} sigma={f['sigma']:.4f} (log2 units {f['sigma_log2']:.3f}), "
          f"{f['count']:,} entries")
    print(f"KS statistic: normal {ks['normal'][0]:.4f} (p={ks['normal'][1]:.2g}), "
          f"lognormal {ks['lognormal'][0]:.4f} (p={ks['lognormal'][1]:.2g})\n")
    print("FP split for the bit budget (expected relative error at the best power-of-two scale):")
    print(f"  {'format':<18}{'k (x*2^-k)':>11}{'exact':>12}{'closed form':>14}")
    for row in r["split_table"]:
        mark = " <- E* (exact)" if row["exp_bits"] == r["optimal_exp_bits"]["exact"] else ""
        if row["exp_bits"] == r["optimal_exp_bits"]["closed_form"]:
            mark += " <- E* (closed form)"
        print(f"  {row['format']:<18}{row['scale_exp']:>11}{row['exact_error']:>12.4f}"
              f"{row['closed_form_error']:>14.4f}{mark}")
    c = r["chosen"]
    print(f"\nquantized with {c['format']} at scale 2^{-c['scale_exp']}:")
    for rounding, q in r["quantized"].items():
        print(f"  {rounding:<10} measured relative error {q['measured_relative_error']:.4f} "
              f"(predicted {q['predicted_relative_error']:.4f}), {q['payload_bytes']:,} bytes, "
              f"{q['bits_per_element']:.4f} bits/element with header")
    p = r["pruning"]
    print(f"\nstochastic pruning at target sparsity {p['target_sparsity']}: alpha={p['alpha']:.4g}, "
          f"measured sparsity {p['measured_sparsity']:.4f}")
    print(f"\n({r['seconds']:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradcomp", description="gradcomp command line")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="quantize a lognormal gradient sample at the optimal FP split")
    d.add_argument("--numel", type=int, default=1_000_000)
    d.add_argument("--bits", type=int, default=6, help="total FP bits, sign included (default 6)")
    d.add_argument("--mu", type=float, default=-9.0, help="mean of ln|g| of the sample")
    d.add_argument("--sigma", type=float, default=2.0, help="std of ln|g| of the sample")
    d.add_argument("--sparsity", type=float, default=0.85)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    from gradcomp.app import analyze

    a = sub.add_parser("analyze", help="train a small model and KS-test its weight and neural "
                       "gradients against Normal and Lognormal (the seed's table)",
                       description=analyze.__doc__.splitlines()[0])
    analyze.add_arguments(a)
    args = parser.parse_args(argv)

    if args.command == "analyze":
        return analyze.run_args(args, a)

    if args.command == "demo":
        if args.numel < 2:
            parser.error("--numel must be at least 2")
        if not 2 <= args.bits <= 16:
            parser.error("--bits must be in 2..16")
        if not (args.sigma > 0 and math.isfinite(args.sigma) and math.isfinite(args.mu)):
            parser.error("--sigma must be positive and --mu finite")
        if not 0 < args.sparsity <= 0.9999:
            parser.error("--sparsity must be in (0, 0.9999]")
        report = demo(args.numel, args.bits, args.mu, args.sigma, args.sparsity, args.seed)
        if args.json:
            json.dump(report, sys.stdout, indent=2)
            print()
        else:
            _print_demo(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
