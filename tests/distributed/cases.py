"""Per-rank bodies of the distributed tests (importable by spawned processes)."""

from __future__ import annotations

import math

import torch

import gradcomp
from gradcomp import codecs as C
from gradcomp.comm.collectives import shard_bounds

from .harness import FakeBucket


def make_codecs() -> dict:
    return {
        "identity": C.IdentityCodec(),
        "half": C.HalfCodec(),
        "fp6": C.FPCodec(6),
        "fp4": C.FPCodec(4),
        "fp8_nearest": C.FPCodec(8, rounding="nearest"),
        "prune": C.PruneCodec(0.85),
        "prune_fp": C.PruneFPCodec(0.85, 6),
        "topk": C.TopKCodec(0.05),
        "budget": C.BudgetCodec(2.0),
    }


def rank_input(numel: int, rank: int, seed: int = 0, sigma: float = 2.0) -> torch.Tensor:
    """A gradient-like tensor: a shared lognormal signal plus rank noise, random signs."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(numel, generator=g).mul(sigma).sub(7.0).exp()
    common *= torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0)
    g.manual_seed(seed * 1000 + rank + 1)
    return common * (1 + 0.5 * torch.randn(numel, generator=g))


_PARAMS: dict = {}


def reduce_once(state: gradcomp.CompressionState, x: torch.Tensor, index: int = 0) -> torch.Tensor:
    """Reduce one bucket holding ``x``; the bucket's parameter objects stay the same per state
    (as in DDP), so error-feedback residuals follow them."""
    params = _PARAMS.setdefault((id(state), x.numel()), [torch.nn.Parameter(torch.empty(x.numel()))])
    buf = x.clone()
    fut = state.submit(FakeBucket(buf, index=index, params=params))
    return fut.wait().clone()


def codec_cases(rank: int, world: int) -> dict:
    """Every codec x collective x bucket size: outputs, exact means, and byte counts."""
    out = {}
    sizes = [0, 1, world - 1, 1001, 20000]
    for name, codec in make_codecs().items():
        collectives = ["auto", "two_phase", "allgather"] + (["allreduce"] if codec.summable else [])
        for coll in collectives:
            for numel in sizes:
                state = gradcomp.CompressionState(codec, warmup_steps=0, collective=coll, seed=3)
                x = rank_input(numel, rank)
                y = reduce_once(state, x)
                st = state.stats()
                info = st["buckets"].get(0, {})
                out[(name, coll, numel)] = {
                    "y": y, "bytes_sent": st["bytes_sent"], "collective": st["collective"],
                    "bits_per_element": st["bits_per_element"], "bucket": info,
                    "formats": [info[k]["format"] for k in ("phase1", "phase2")
                                if k in info and info[k].get("format")],
                }
                state.close()
    return out


def inputs_for(world: int, numel: int, sigma: float = 2.0) -> list[torch.Tensor]:
    return [rank_input(numel, r, sigma=sigma) for r in range(world)]


def expected_fixed_bytes(codec, collective: str, world: int, rank: int, numel: int) -> int:
    """Exact bytes this rank hands to collectives for fixed-size codecs."""
    n = world
    if collective == "allreduce":
        per = 2 if isinstance(codec, C.HalfCodec) else 4
        return round(2 * (n - 1) / n * per * numel)
    if collective == "allgather":
        return (n - 1) * codec.wire_bytes(numel)
    bounds = shard_bounds(numel, n)
    phase1 = sum(codec.wire_bytes(b - a) for j, (a, b) in enumerate(bounds) if j != rank)
    a, b = bounds[rank]
    return phase1 + (n - 1) * codec.reduce_codec().wire_bytes(b - a)


def nonfinite_cases(rank: int, world: int) -> dict:
    out = {}
    for name, codec in make_codecs().items():
        for coll in ["auto", "two_phase", "allgather"] + (["allreduce"] if codec.summable else []):
            state = gradcomp.CompressionState(codec, warmup_steps=0, collective=coll)
            x = rank_input(1000, rank)
            if rank == world - 1:
                x[17] = math.inf if name != "fp6" else math.nan
            out[(name, coll)] = reduce_once(state, x)
            state.close()
    return out


def unbiased_cases(rank: int, world: int, steps: int) -> dict:
    """Average the reduced output of the same input over many steps (fresh keys each step)."""
    out = {}
    for name in ["fp6", "fp4", "prune_fp", "prune", "budget"]:
        codec = make_codecs()[name]
        for coll in ["two_phase", "allgather"]:
            state = gradcomp.CompressionState(codec, warmup_steps=0, collective=coll, refit_every=1000)
            # Comparable magnitudes (sigma 0.3): the L2 error then averages over hundreds of
            # elements instead of being decided by the three largest of a heavy tail.
            x = rank_input(512, rank, sigma=0.3)
            acc = torch.zeros(512, dtype=torch.float64)
            ys = []
            for _ in range(steps):
                ys.append(reduce_once(state, x).double())
                acc += ys[-1]
            out[(name, coll)] = {"avg": acc / steps, "samples": torch.stack(ys[:50])}
            state.close()
    return out


def resume_case(rank: int, world: int, ckpt_dir: str) -> dict:
    """Ten steps straight vs five + checkpoint + restore into a fresh state + five."""
    def run(state, steps, start):
        ys = []
        for s in range(start, start + steps):
            ys.append(reduce_once(state, rank_input(3000, rank, seed=s)))
        return ys

    kw = dict(warmup_steps=1, refit_every=3, error_feedback=True, seed=11)
    straight = gradcomp.CompressionState(C.FPCodec(5), **kw)
    params = [torch.nn.Parameter(torch.empty(3000))]
    straight.bind_model(torch.nn.ParameterList(params))
    ys_straight = []
    for s in range(10):
        buf = rank_input(3000, rank, seed=s)
        ys_straight.append(straight.submit(FakeBucket(buf, params=params)).wait().clone())
    first = gradcomp.CompressionState(C.FPCodec(5), **kw)
    first.bind_model(torch.nn.ParameterList(params))
    for s in range(5):
        first.submit(FakeBucket(rank_input(3000, rank, seed=s), params=params)).wait()
    path = f"{ckpt_dir}/state{rank}.pt"
    torch.save(first.state_dict(), path)
    second = gradcomp.CompressionState(C.FPCodec(5), **kw)
    params2 = [torch.nn.Parameter(torch.empty(3000))]  # a new process would have new objects
    second.bind_model(torch.nn.ParameterList(params2))
    second.load_state_dict(torch.load(path, weights_only=True))
    ys_resumed = [second.submit(FakeBucket(rank_input(3000, rank, seed=s), params=params2)).wait().clone()
                  for s in range(5, 10)]
    for s in (straight, first, second):
        s.close()
    return {"straight": ys_straight[5:], "resumed": ys_resumed}


def digits_split(seed: int = 0):
    """scikit-learn's 8x8 digits (shipped with the package), standardized, half for testing."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    half = len(y) // 2
    mean, std = x[:half].mean(0), x[:half].std(0) + 1e-3
    x = (x - mean) / std
    return (x[:half], y[:half]), (x[half:], y[half:])


def train_digits(rank: int, world: int, runs: list, epochs: int) -> dict:
    """DDP-train the same MLP from the same init and data order once per (name, codec)."""
    (xtr, ytr), (xte, yte) = digits_split()
    accs = {}
    for name, codec, options in runs:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                    torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        state = gradcomp.register(ddp, codec=codec, **options) if codec is not None else None
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        batch = 64 // world  # the same global batch at every world size
        for _ in range(epochs):
            perm = torch.randperm(len(ytr), generator=g)
            for i in range(0, len(ytr) - 64 + 1, 64):
                idx = perm[i + rank * batch: i + (rank + 1) * batch]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ddp(xtr[idx]), ytr[idx]).backward()
                opt.step()
        with torch.no_grad():
            accs[name] = (model(xte).argmax(1) == yte).double().mean().item()
        if state is not None:
            accs[name + "_bits_per_element"] = state.stats()["bits_per_element"]
            state.close()
    return accs


def _mean_over_steps(make_state, rank: int, numel: int, steps: int) -> torch.Tensor:
    """Mean of the reduced output of the same input over ``steps`` steps (fresh keys each)."""
    state = make_state()
    x = rank_input(numel, rank, sigma=0.5)
    acc = torch.zeros(numel, dtype=torch.float64)
    for _ in range(steps):
        acc += reduce_once(state, x).double()
    state.close()
    return acc / steps


def topk_feedback_case(rank: int, world: int, steps: int) -> dict:
    """TopK is biased; with error feedback the running mean of its outputs still converges."""
    return {ef: _mean_over_steps(lambda: gradcomp.CompressionState(
        C.TopKCodec(0.05), warmup_steps=0, error_feedback=ef, collective="allgather"), rank, 2000, steps)
        for ef in (False, True)}


def world_one_case(rank: int, world: int) -> dict:
    state = gradcomp.CompressionState(C.PruneFPCodec(0.85, 6), warmup_steps=0)
    x = rank_input(1000, rank)
    y = reduce_once(state, x)
    st = state.stats()
    state.close()
    return {"x": x, "y": y, "bytes_sent": st["bytes_sent"], "world": st["world_size"]}


def async_case(rank: int, world: int) -> dict:
    """Rank 1 joins late: rank 0's hook must return at once and complete only after the exchange."""
    import time

    state = gradcomp.CompressionState(C.FPCodec(6), warmup_steps=0)
    params = [torch.nn.Parameter(torch.empty(50_000))]
    buf = rank_input(50_000, rank)
    if rank == 1:
        time.sleep(1.0)
    t0 = time.perf_counter()
    fut = state.submit(FakeBucket(buf, params=params))
    t_submit = time.perf_counter() - t0
    done_early = fut.done()
    fut.wait()
    t_done = time.perf_counter() - t0
    state.close()
    return {"submit_s": t_submit, "done_early": done_early, "done_s": t_done}


def reduce_feedback_case(rank: int, world: int, steps: int) -> dict:
    """A biased second phase (TopK on the reduced mean): reduce-side feedback repairs it."""
    return {ef: _mean_over_steps(lambda: gradcomp.CompressionState(
        C.FPCodec(8), warmup_steps=0, error_feedback=ef, collective="two_phase",
        reduce_codec=C.TopKCodec(0.1)), rank, 3000, steps) for ef in (False, "reduce")}


def mismatch_case(rank: int, world: int) -> str:
    try:
        gradcomp.CompressionState(C.FPCodec(6 if rank == 0 else 5))
    except ValueError as exc:
        return str(exc)
    return "no error"


# A bucket of tensors whose scales differ by orders of magnitude (as a transformer's positional
# embedding and attention weights do), with a run of tiny tensors inside.
SEGMENT_SIZES = (3000, 700, 20, 30, 5000)
SEGMENT_SCALES = (1.0, 1e-5, 1e3, 1e-3, 1e-2)


def segment_input(rank: int) -> torch.Tensor:
    parts = [rank_input(n, rank, seed=11 + i) * s for i, (n, s) in enumerate(zip(SEGMENT_SIZES, SEGMENT_SCALES))]
    return torch.cat(parts)


def segment_cases(rank: int, world: int) -> dict:
    """Per-tensor plans against one plan per shard, on a bucket of mixed-scale tensors; and a
    state_dict round trip of a per-tensor state (the resumed step must encode the same bits)."""
    out = {}
    codecs = {"fp6": C.FPCodec(6), "prune_fp": C.PruneFPCodec(0.85, 6, threshold="tensor"), "budget": C.BudgetCodec(1.5)}
    x = segment_input(rank)
    for name, codec in codecs.items():
        for coll in ("two_phase", "allgather"):
            for per_tensor in (True, False):
                state = gradcomp.CompressionState(codec, warmup_steps=0, collective=coll, seed=5,
                                                  per_tensor=per_tensor)
                params = [torch.nn.Parameter(torch.empty(n)) for n in SEGMENT_SIZES]
                fut = state.submit(FakeBucket(x.clone(), index=0, params=params))
                y = fut.wait().clone()
                st = state.stats()
                out[(name, coll, per_tensor)] = {"y": y, "bytes_sent": st["bytes_sent"],
                                                 "bits_per_element": st["bits_per_element"],
                                                 "bucket": st["buckets"].get(0, {})}
                if per_tensor:  # resume: a fresh state loading step 1's state_dict encodes the same
                    sd = state.state_dict()
                    y1 = state.submit(FakeBucket(x.clone(), index=0, params=params)).wait().clone()
                    other = gradcomp.CompressionState(codec, warmup_steps=0, collective=coll, seed=5)
                    other.load_state_dict(sd)
                    y1b = other.submit(FakeBucket(x.clone(), index=0, params=params)).wait().clone()
                    out[(name, coll, per_tensor)]["resumed_equal"] = torch.equal(
                        y1.view(torch.int32), y1b.view(torch.int32))
                    other.close()
                state.close()
    return out
