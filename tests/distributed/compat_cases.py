"""Per-rank bodies of the DDP compatibility suite: every DDP mode with every compressing codec.

One *cell* trains a small classifier for ``STEPS`` steps under one DDP mode with one codec (or
none: the fp32 reference of that mode) and reports the losses, a hash of the final parameters
(replicas must be bit-identical), the hook's stats and, for the GradScaler modes, the steps
the scaler skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp
from gradcomp import codecs as C

from .harness import progress

STEPS = 16
BATCH = 32
INJECT = (5, 9)  # GradScaler modes: steps at which rank 1's loss is made infinite

MODES = (
    "one_bucket", "many_buckets", "unused_never", "unused_alternate", "static_graph",
    "bucket_view", "no_sync", "join", "frozen", "bf16", "fp16", "compile", "amp_inf", "amp_inf_ef",
)
CODECS = ("fp6", "prune_fp", "budget", "topk")


def make_codec(name: str) -> tuple[C.Codec, dict]:
    """The codec of a cell and its CompressionState options (TopK always has error feedback)."""
    return {
        "fp6": (C.FPCodec(6), {}),
        "prune_fp": (C.PruneFPCodec(0.85, 6), {}),
        "budget": (C.BudgetCodec(1.5), {}),
        "topk": (C.TopKCodec(0.01), {"error_feedback": True}),
    }[name]


class Net(nn.Module):
    """A small classifier with a side branch that some modes leave unused."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 96)
        self.mid = nn.Linear(96, 96)
        self.side = nn.Linear(96, 96)
        self.out = nn.Linear(96, 4)

    def forward(self, x, use_side: bool = False):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.mid(h))
        if use_side:
            h = h + torch.relu(self.side(h))
        return self.out(h)


def batch(rank: int, step: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian blobs in 16 dimensions, a different sample per rank and step."""
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(7)) * 1.5
    g = torch.Generator().manual_seed(1000 * rank + step)
    y = torch.randint(0, 4, (BATCH,), generator=g)
    x = centers[y] + torch.randn(BATCH, 16, generator=g)
    return x.to(dtype), y


def _hash(model: nn.Module) -> str:
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def run_cell(rank: int, world: int, mode: str, codec_name: str | None) -> dict:
    """Train one cell; ``codec_name=None`` is the mode's fp32 (no hook) reference."""
    torch.manual_seed(0)
    net = Net()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode, torch.float32)
    net = net.to(dtype)
    if mode == "frozen":
        net.inp.requires_grad_(False)
    kwargs = {}
    if mode in ("unused_never", "unused_alternate"):
        kwargs["find_unused_parameters"] = True
    # Several buckets by default; torch.compile's DDPOptimizer wants DDP's default caps.
    kwargs["bucket_cap_mb"] = {"one_bucket": 1000.0, "many_buckets": 0.004, "compile": 25.0}.get(mode, 0.02)
    kwargs["static_graph"] = mode == "static_graph"
    kwargs["gradient_as_bucket_view"] = mode == "bucket_view"
    ddp = DDP(net, **kwargs)
    state = None
    if codec_name is not None:
        codec, options = make_codec(codec_name)
        if mode == "amp_inf_ef":
            options = {**options, "error_feedback": True}
        state = gradcomp.register(ddp, codec=codec, timeout=60, **options)
    model = torch.compile(ddp, backend="aot_eager") if mode == "compile" else ddp
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05 if dtype == torch.float32 else 0.1, momentum=0.9)
    amp = mode in ("amp_inf", "amp_inf_ef")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10_000) if amp else None
    steps = STEPS + (3 * rank if mode == "join" else 0)  # uneven inputs: later ranks train longer
    losses, skipped = [], []
    join = Join([ddp]) if mode == "join" else contextlib.nullcontext()
    with join:
        for step in range(steps):
            use_side = {"unused_never": False, "unused_alternate": step % 2 == 0}.get(mode, True)
            opt.zero_grad(set_to_none=True)
            micro = 2 if mode == "no_sync" else 1
            for m in range(micro):
                x, y = batch(rank, step * micro + m, dtype)
                sync = ddp.no_sync() if m < micro - 1 else contextlib.nullcontext()
                with sync:
                    if amp:
                        with torch.autocast("cpu", dtype=torch.float16):
                            loss = nn.functional.cross_entropy(model(x, use_side).float(), y)
                        if rank == 1 and step in INJECT:
                            loss = loss * float("inf")
                        scaler.scale(loss).backward()
                    else:
                        loss = nn.functional.cross_entropy(model(x, use_side).float(), y)
                        (loss / micro).backward()
            if amp:
                before = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                if scaler.get_scale() < before:
                    skipped.append(step)
            else:
                opt.step()
            losses.append(float(loss.detach()))
    result = {"losses": losses, "hash": _hash(ddp.module), "skipped": skipped}
    if state is not None:
        state.wait_idle()
        st = state.stats()
        result["stats"] = {k: st[k] for k in ("steps", "bytes_sent", "nonfinite_steps")}
        state.close()
    return result


def run_cells(rank: int, world: int, cells: list[tuple[str, str | None]]) -> dict:
    """Run ``cells`` (mode, codec name or None) in order; every rank runs the same list."""
    torch.set_num_threads(1)
    out = {}
    for mode, codec_name in cells:
        progress(rank, f"{mode} x {codec_name}")
        t = time.perf_counter()
        out[(mode, codec_name)] = run_cell(rank, world, mode, codec_name)
        out[(mode, codec_name)]["seconds"] = time.perf_counter() - t
        dist.barrier()
    return out


def dead_peer_rank(rank: int, world: int, workdir: str, how: str, hook_timeout: float) -> None:
    """Rank 1 trains 3 steps, then kills (``"kill"``) or stops (``"stop"``) itself; the other
    ranks record how soon their next ``backward()`` raised, and what it said, then return
    (without tearing down the process group) so the test sees whether the process exits."""
    import os
    import signal
    from pathlib import Path

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(workdir, "store"), world),
                            rank=rank, world_size=world)
    torch.manual_seed(0)
    ddp = DDP(Net(), bucket_cap_mb=0.02)
    gradcomp.register(ddp, codec=C.FPCodec(6), timeout=hook_timeout)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    result: dict = {"error": "backward never raised"}
    for step in range(100):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        x, y = batch(rank, step)
        loss = nn.functional.cross_entropy(ddp(x, True), y)
        opt.zero_grad()
        t = time.monotonic()
        try:
            loss.backward()
        except RuntimeError as exc:
            result = {"step": step, "seconds": time.monotonic() - t, "message": str(exc)}
            break
        opt.step()
    torch.save(result, Path(workdir) / f"dead{rank}.pt")


def nonfinite_feedback_case(rank: int, world: int) -> dict:
    """Error feedback across a step whose input is inf on rank 1: residuals (worker and reduce
    side) stay exactly as the previous step left them, the result is NaN on every rank (the
    shard that held the inf), and the
    next finite step updates them again."""
    from .harness import FakeBucket

    out = {}
    for name in ("fp6", "prune_fp", "topk"):
        codec, _ = make_codec(name)
        state = gradcomp.CompressionState(codec, error_feedback=True, warmup_steps=0,
                                          collective="two_phase", seed=1)
        params = [nn.Parameter(torch.empty(5000))]

        def step(poison: bool) -> torch.Tensor:
            x = torch.randn(5000, generator=torch.Generator().manual_seed(rank)) * 1e-3
            if poison and rank == 1:
                x[17] = float("inf")
            return state.submit(FakeBucket(x, params=params)).wait().clone()

        def residuals() -> list[torch.Tensor]:
            state.wait_idle()
            return [t.clone() for _, t in state.memory.residuals.values()] + \
                [t.clone() for _, t in state.memory.reduce_residuals.values()]

        step(False)
        before = residuals()
        y = step(True)
        after = residuals()
        step(False)
        later = residuals()
        out[name] = {
            # the shard holding the inf is NaN on every rank (enough for GradScaler to skip)
            "result_nan": bool(torch.isnan(y[:5000 // world]).all()),
            "kept": len(before) == len(after) == 2 and all(torch.equal(a, b) for a, b in zip(before, after)),
            "finite": all(bool(torch.isfinite(t).all()) for t in after + later),
            "updated_later": any(not torch.equal(a, b) for a, b in zip(after, later)),
            "nonfinite_steps": state.stats()["nonfinite_steps"],
        }
        state.close()
    return out


def mismatched_step_case(rank: int, world: int) -> dict:
    """Rank 0 restores a state saved at step 5, the others start afresh at step 0 (a resume with
    one rank's compression file missing): the first bucket must fail on every rank, clearly."""
    from .harness import FakeBucket

    state = gradcomp.CompressionState(C.FPCodec(6), warmup_steps=1, seed=1, timeout=30)
    if rank == 0:
        sd = state.state_dict()
        sd["step"] = 5
        state.load_state_dict(sd)
    fut = state.submit(FakeBucket(torch.ones(1000)))
    try:
        fut.wait()
        return {"error": None}
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        return {"error": str(exc)}
    finally:
        state.close()


def hook_error_case(rank: int, world: int) -> dict:
    """How the hook's errors reach ``backward()`` under DDP.

    1. A state built before ``init_process_group`` (and pickled and unpickled, as a launcher
       may) with a different codec on each rank: it binds at its first bucket: the settings check raises
       ``ValueError`` on every rank, before any mismatched collective.
    2. Ranks at different hook steps: the worker's ``ValueError`` reaches ``backward()`` as a
       ``RuntimeError`` quoting it, and ``state.failure`` is the original exception.
    """
    import os
    import pickle

    out = {}
    dist.barrier()  # every rank finished connecting before rank 0 tears its group down
    dist.destroy_process_group()  # build the state before init_process_group, as documented
    state = pickle.loads(pickle.dumps(gradcomp.CompressionState(C.FPCodec(6 - rank), timeout=30)))
    store = os.path.join(os.environ["GRADCOMP_TEST_WORKDIR"], "store-again")
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    torch.manual_seed(0)
    ddp = DDP(Net())
    ddp.register_comm_hook(state, gradcomp.compression_hook)
    x, y = batch(rank, 0)
    try:
        nn.functional.cross_entropy(ddp(x, True), y).backward()
        out["settings"] = None
    except Exception as exc:  # noqa: BLE001 - the test reads type and message
        out["settings"] = (type(exc).__name__, str(exc))
    state.close()

    ddp = DDP(Net())
    state = gradcomp.register(ddp, codec=C.FPCodec(6), timeout=30)
    if rank == 0:
        sd = state.state_dict()
        sd["step"] = 3
        state.load_state_dict(sd)
    try:
        nn.functional.cross_entropy(ddp(x, True), y).backward()
        out["steps"] = None
    except Exception as exc:  # noqa: BLE001
        out["steps"] = (type(exc).__name__, str(exc))
    out["failure"] = type(state.failure).__name__
    state.close()
    return out
