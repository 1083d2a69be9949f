"""gradcomp over Horovod: horovodrun ranks, parity with the DDP hook, and Ray.

Skipped when horovod.torch does not import (build it with launch/build_horovod.sh; CI does).
One horovodrun launch (2 ranks) runs every Horovod-side case; the DDP side of the parity test
is one spawn of 2 gloo ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):  # tests/ (as tests/conftest.py does) and this directory
    if _p not in sys.path:
        sys.path.insert(0, _p)

hvd = pytest.importorskip(
    "horovod.torch", reason="horovod.torch does not import; build it with launch/build_horovod.sh")

import gradcomp  # noqa: E402

import hvd_common as common  # noqa: E402
from distributed.cases import expected_fixed_bytes, inputs_for  # noqa: E402
from distributed.harness import spawn  # noqa: E402
from hvd_cases import CODECS, SIZES  # noqa: E402

WORLD = 2


def horovodrun(np_: int, outdir: Path, *modes: str, timeout: int = 600) -> list[dict]:
    """Run hvd_cases.py on ``np_`` local Gloo ranks; return each rank's results."""
    exe = Path(sys.executable).parent / "horovodrun"
    if not exe.exists():
        pytest.fail(f"{exe} is missing although horovod.torch imports; rerun launch/build_horovod.sh")
    outdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [str(exe), "-np", str(np_), "--gloo", "--gloo-timeout-seconds", "120",
           sys.executable, str(HERE / "hvd_cases.py"), str(outdir), *modes]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    results = []
    for r in range(np_):
        path = outdir / f"rank{r}.pt"
        if not path.exists():
            pytest.fail(f"horovodrun rank {r} wrote no result (exit {proc.returncode}):\n"
                        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        data = torch.load(path, weights_only=False)
        if "error" in data:
            pytest.fail(f"horovodrun rank {r} failed:\n{data['error']}")
        results.append(data["ok"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return results


@pytest.fixture(scope="module")
def hvd_results(tmp_path_factory):
    return horovodrun(WORLD, tmp_path_factory.mktemp("horovodrun"), "parity")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return spawn(WORLD, common.ddp_parity, tmp_path_factory.mktemp("ddp"))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_codecs_through_horovod(hvd_results):
    r0, r1 = (r["cases"] for r in hvd_results)
    assert [r["rank"] for r in hvd_results] == [0, 1] and hvd_results[0]["world"] == WORLD
    for name, codec in CODECS.items():
        for coll in ["auto", "two_phase", "allgather"] + (["allreduce"] if codec.summable else []):
            for numel in SIZES:
                key = (name, coll, numel)
                a, b = r0[key], r1[key]
                # Replicas: bit-identical on every rank.
                assert same_bits(a["y"], b["y"]), key
                st = a["stats"]
                resolved = st["collective"]
                if coll == "auto":
                    assert resolved == ("allreduce" if codec.summable else "allgather"), key
                else:
                    assert resolved == coll, key
                exact = torch.stack(inputs_for(WORLD, numel)).double().mean(0)
                err = ((a["y"].double() - exact).norm() / exact.norm()).item()
                if name == "identity":
                    assert err < 1e-6, key
                elif name == "half":
                    assert err <= 2.0**-10, (key, err)
                elif name == "fp6":
                    # Stochastic rounding errs by at most 2**-m per stage (m = mantissa bits of
                    # the chosen format); one stage for all-gather and all-reduce, two for two-phase.
                    stages = [st["buckets"][0][k]["format"] for k in ("phase1", "phase2")
                              if k in st["buckets"][0]]
                    assert len(stages) == (2 if resolved == "two_phase" else 1), key
                    bound = sum(2.0 ** -gradcomp.FPFormat.from_name(f).man_bits for f in stages)
                    assert err <= bound, (key, err, bound)
                elif numel >= 1001:  # pruned at 85%: unbiased, lossy, but it carries the signal
                    assert err < 0.9, (key, err)
                # Bytes handed to Horovod: exactly the payload sizes, as with torch.distributed.
                if codec.wire_bytes(1) is not None:
                    for r, res in enumerate((a, b)):
                        assert res["stats"]["bytes_sent"] == expected_fixed_bytes(codec, resolved, WORLD, r, numel), (key, r)
        nf0, nf1 = r0[(name, "nonfinite")], r1[(name, "nonfinite")]
        assert not torch.isfinite(nf0).all() and same_bits(nf0, nf1), name
    # SGD(lr=1) from zero after one step: -mean(grad), the same on both ranks.
    exact = torch.stack(inputs_for(WORLD, 1000, sigma=0.5)).mean(0)
    assert same_bits(r0["sgd_step"], r1["sgd_step"])
    assert ((r0["sgd_step"] + exact).norm() / exact.norm()).item() < 2.0**-4
    for r in (r0, r1):
        assert "different settings" in r["mismatch"] and "FPCodec(bits=5" in r["mismatch"], r["mismatch"]


def test_horovod_matches_ddp_hook_bit_for_bit(hvd_results, ddp_results):
    """Same codec, seed and data: the Horovod optimizer and the DDP hook average to the same bits.

    Both paths encode the same buckets (the optimizer reproduces DDP's bucketing: one bucket in
    model order for the first step, then buckets by gradient-ready order) with the same keys,
    and decode the same payloads in rank order; the all-reduce paths (warm-up fp32 and fp16)
    add two numbers per element, which is exact-order-independent at two ranks. So the
    comparison is bitwise, for every step, both ranks, and the parameters after the last step.
    """
    names = [n for n, _, _ in common.parity_runs()]
    for rank in range(WORLD):
        hv, dd = hvd_results[rank]["parity"], ddp_results[rank]
        for name in names:
            for step in range(common.STEPS):
                for i, (g_h, g_d) in enumerate(zip(hv[name]["grads"][step], dd[name]["grads"][step])):
                    assert same_bits(g_h, g_d), (name, rank, step, i, (g_h - g_d).abs().max().item())
            for p_h, p_d in zip(hv[name]["params"], dd[name]["params"]):
                assert same_bits(p_h, p_d), (name, rank)
            sh, sd = hv[name]["stats"], dd[name]["stats"]
            assert sh["steps"] == sd["steps"] == common.STEPS
            assert sh["bytes_sent"] == sd["bytes_sent"], name
            assert sh["collective"] == sd["collective"], name
            assert sh["buckets"].keys() == sd["buckets"].keys(), name
    # The small cap really made several buckets; the parity then covers DDP's rebuilt order.
    # (The ready order puts the last layer's bias before its weight: [[5, 4], [3, 2], [1, 0]].)
    assert len(hvd_results[0]["parity"]["fp6_small_buckets"]["buckets"]) >= 3
    assert len(hvd_results[0]["parity"]["fp6"]["buckets"]) == 1
    # And the compression did something (the comparison is not between two fp32 all-reduces).
    g_fp6 = hvd_results[0]["parity"]["fp6"]["grads"][1][0]
    assert hvd_results[0]["parity"]["fp6"]["stats"]["bits_per_element"] < 8
    assert g_fp6.abs().sum() > 0


def test_run_on_ray_two_workers():
    import ray

    from gradcomp.comm.horovod import run_on_ray

    # Defined here so that cloudpickle ships it by value (Ray workers cannot import this file).
    def _ray_job(scale: float):
        import horovod.torch as hvd
        import torch

        from gradcomp import codecs as C
        from gradcomp.comm.horovod import DistributedOptimizer

        torch.set_num_threads(1)
        total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]) * scale, op=hvd.Sum).item()
        p = torch.nn.Parameter(torch.zeros(256))
        opt = DistributedOptimizer(torch.optim.SGD([p], lr=1.0), [("p", p)], codec=C.FPCodec(6),
                                   warmup_steps=0)
        p.grad = torch.linspace(-1, 1, 256, dtype=torch.float32) * (hvd.rank() + 1)
        opt.synchronize()
        grad = p.grad.clone()
        opt.close()
        return {"rank": hvd.rank(), "size": hvd.size(), "total": total, "grad": grad}

    assert not ray.is_initialized()
    results = run_on_ray(_ray_job, num_workers=2, args=(2.0,))
    assert not ray.is_initialized()  # the local session it started is shut down
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["size"] == 2 for r in results)
    assert all(r["total"] == 6.0 for r in results)  # 2 * (1 + 2)
    assert same_bits(results[0]["grad"], results[1]["grad"])
    exact = torch.linspace(-1, 1, 256) * 1.5
    assert ((results[0]["grad"] - exact).norm() / exact.norm()).item() < 2.0**-2

