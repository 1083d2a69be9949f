"""Run under ``horovodrun -np N --gloo python hvd_cases.py OUTDIR [parity]``: every rank runs the
cases and saves its results to OUTDIR/rank{r}.pt (an exception is saved as its traceback)."""

from __future__ import annotations

import math
import os
import sys
import traceback
from pathlib import Path

# The same import roots as under pytest (tests/conftest.py puts tests/ on sys.path, and a test
# directory without __init__.py is itself on it): tests/horovod/ must not be a package, or it
# would shadow the real `horovod` for everything under tests/.
HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

torch.set_num_threads(1)

import horovod.torch as hvd  # noqa: E402

from gradcomp import codecs as C# noqa: E402
from gradcomp.comm.horovod import DistributedOptimizer  # noqa: E402
import hvd_common  # noqa: E402
from distributed.cases import rank_input  # noqa: E402

CODECS = {"fp6": C.FPCodec(6), "prune_fp": C.PruneFPCodec(0.85, 6), "half": C.HalfCodec(),
          "identity": C.IdentityCodec()}
SIZES = (1, 1001, 20000)


def reduce_with_optimizer(x: torch.Tensor, codec, **options) -> tuple[torch.Tensor, dict]:
    """One DistributedOptimizer synchronize of a single parameter whose gradient is ``x``."""
    p = torch.nn.Parameter(torch.zeros(x.numel()))
    opt = DistributedOptimizer(torch.optim.SGD([p], lr=1.0), [("p", p)], codec=codec,
                               warmup_steps=0, seed=3, **options)
    p.grad = x.clone()
    opt.synchronize()
    stats = opt.stats()
    opt.close()
    return p.grad.clone(), stats


def codec_cases(rank: int, world: int) -> dict:
    out = {}
    for name, codec in CODECS.items():
        for coll in ["auto", "two_phase", "allgather"] + (["allreduce"] if codec.summable else []):
            for numel in SIZES:
                y, st = reduce_with_optimizer(rank_input(numel, rank), codec, collective=coll)
                out[(name, coll, numel)] = {"y": y, "stats": st}
        # A non-finite gradient on one rank reaches every rank.
        x = rank_input(1000, rank)
        if rank == world - 1:
            x[17] = math.inf
        out[(name, "nonfinite")] = reduce_with_optimizer(x, codec)[0]
    # The wrapped optimizer steps with the averaged gradient (SGD, lr 1: p = -mean).
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = DistributedOptimizer(torch.optim.SGD([p], lr=1.0), [("p", p)], codec=C.FPCodec(8),
                               warmup_steps=0)
    p.grad = rank_input(1000, rank, sigma=0.5)
    opt.step()
    out["sgd_step"] = p.detach().clone()
    opt.close()
    # Different settings on different ranks fail at construction, on every rank.
    try:
        DistributedOptimizer(torch.optim.SGD([p], lr=1.0), [("p", p)], codec=C.FPCodec(6 if rank == 0 else 5))
        out["mismatch"] = "no error"
    except ValueError as exc:
        out["mismatch"] = str(exc)
    return out


def main() -> None:
    outdir, modes = Path(sys.argv[1]), sys.argv[2:]
    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    result: dict = {"world": world, "rank": rank}
    try:
        result["cases"] = codec_cases(rank, world)
        if "parity" in modes:
            result["parity"] = hvd_common.horovod_parity(rank, world)
        torch.save({"ok": result}, outdir / f"rank{rank}.pt")
    except BaseException:
        torch.save({"error": traceback.format_exc()}, outdir / f"rank{rank}.pt")
        raise
    finally:
        hvd.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
