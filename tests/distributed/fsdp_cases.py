"""Per-rank bodies of the FSDP2 tests (importable by spawned processes)."""

from __future__ import annotations

import io
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from gradcomp import codecs as C
from gradcomp.comm import fsdp

from .cases import digits_split, rank_input
from .harness import progress


def _codecs() -> dict:
    return {"fp6": C.FPCodec(6), "fp8_nearest": C.FPCodec(8, rounding="nearest"), "prune": C.PruneCodec(0.85), "prune_fp": C.PruneFPCodec(0.85, 6), "topk": C.TopKCodec(0.05),
            "budget": C.BudgetCodec(2.0)}


def direct_cases(rank: int, world: int, only: tuple = ()) -> dict:
    """The ReduceScatter object called as FSDP calls it: every codec (or ``only`` these) x shard
    size x dtype x op."""
    out = {}
    for name, codec in _codecs().items():
        if only and name not in only:
            continue
        state = fsdp.FSDPCompressionState(codec, warmup_steps=0, refit_every=1, seed=5)
        state.bind()
        comm = fsdp.CompressedReduceScatter(state, 0)
        for s in (1, 7, 1001):
            for dtype in (torch.float32, torch.bfloat16):
                for opname, op in (("avg", dist.ReduceOp.AVG), ("sum", dist.ReduceOp.SUM),
                                   ("premul", dist.ReduceOp.PREMUL_SUM(0.25))):
                    if (dtype == torch.bfloat16 or opname != "avg") and (s != 1001 or name not in ("fp6", "prune_fp")):
                        continue
                    progress(rank, f"direct {name} {s} {dtype} {opname}")
                    before = dict(state.stats())
                    x = rank_input(world * s, rank).to(dtype)
                    y = comm.allocate((s,), dtype=dtype, device=torch.device("cpu"))
                    comm(y, x, None, op)
                    st = state.stats()
                    out[(name, s, str(dtype), opname)] = {
                        "y": y.clone(), "unit": dict(st["units"][0]),
                        "bytes": st["bytes_sent"] - before["bytes_sent"]}
        state.close()
    # The dense path (IdentityCodec; also every warm-up step) is FSDP's own reduce-scatter.
    state = fsdp.FSDPCompressionState(C.IdentityCodec(), warmup_steps=0)
    state.bind()
    x = rank_input(world * 1001, rank)
    y, ref = torch.empty(1001), torch.empty(1001)
    fsdp.CompressedReduceScatter(state, 0)(y, x, None, dist.ReduceOp.AVG)
    dist.reduce_scatter_single(ref, x.clone(), op=dist.ReduceOp.AVG)
    out["identity_equal"] = torch.equal(y, ref)
    state.close()
    out["feedback"] = _feedback_steps(rank, world)
    return out


def _feedback_steps(rank: int, world: int) -> list:
    """Warm-up, refits every 2 steps, error feedback, and a step with inf on rank 1's input."""
    state = fsdp.FSDPCompressionState(C.FPCodec(6), warmup_steps=1, refit_every=2, error_feedback=True, seed=1)
    state.bind()
    comm = fsdp.CompressedReduceScatter(state, 0)
    s = 500
    x = rank_input(world * s, rank)
    bad = x.clone()
    if rank == world - 1:
        bad[3] = float("inf")  # in shard 0: rank 0's output
    rows = []
    for inp in (x, x, x * 8, x * 8, bad, x):
        y = torch.empty(s)
        comm(y, inp.clone(), None, dist.ReduceOp.AVG)
        st = state.stats()
        unit = st["units"][0]
        res = state._residuals.get((0, 1))
        rows.append({"y": y, "compressed": unit["compressed"], "scale": unit.get("phase1", {}).get("scale_exp"),
                     "nonfinite_steps": st["nonfinite_steps"], "steps": st["steps"],
                     "residual": None if res is None else res.clone()})
    state.close()
    return rows


def _mlp(mesh, mp=None, reshard=True, seed=0):
    """64-37-23-10 MLP: no dimension divides 2, 3 or 4 evenly, so FSDP pads every shard."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 37), torch.nn.ReLU(), torch.nn.Linear(37, 23),
                                torch.nn.ReLU(), torch.nn.Linear(23, 10))
    kw = {"mesh": mesh, "reshard_after_forward": reshard}
    if mp is not None:
        kw["mp_policy"] = mp
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _full(model) -> torch.Tensor:
    return torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])


def _same_on_all_ranks(t: torch.Tensor, group=None) -> bool:
    got = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(got, t, group=group)
    return all(torch.equal(g.view(torch.int32) if g.dtype == torch.float32 else g, got[0].view(torch.int32)
                           if got[0].dtype == torch.float32 else got[0]) for g in got)


def train_cases(rank: int, world: int, epochs: int, short_epochs: int) -> dict:
    """Digits MLP under FSDP2: default reduce-scatter vs gradcomp's, fp32 and bf16 reduce dtype.

    The parity runs (default, fp6, prune_fp) train ``epochs``; the others ``short_epochs``
    (every run records its parameters after ``short_epochs`` too, for the bit-exact checks)."""
    (xtr, ytr), (xte, yte) = digits_split()
    mesh = init_device_mesh("cpu", (world,))
    bf16 = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)
    runs = [("default", None, None), ("identity", C.IdentityCodec(), None), ("fp6", C.FPCodec(6), None),
            ("prune_fp", C.PruneFPCodec(0.85, 6), None), ("default_bf16", None, bf16),
            ("identity_bf16", C.IdentityCodec(), bf16), ("fp6_bf16", C.FPCodec(6), bf16)]
    res = {}
    for name, codec, mp in runs:
        epochs_here = epochs if name in ("default", "fp6", "prune_fp") else short_epochs
        progress(rank, f"train {name}")
        model = _mlp(mesh, mp)
        state = fsdp.register(model, codec=codec) if codec is not None else None
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        batch = 64 // world
        consistent, losses, step = True, [], 0
        t0 = time.perf_counter()
        params_short = None
        for epoch in range(epochs_here):
            if epoch == short_epochs:
                params_short = _full(model).detach().clone()
            perm = torch.randperm(len(ytr), generator=g)
            for i in range(0, len(ytr) - 64 + 1, 64):
                idx = perm[i + rank * batch: i + (rank + 1) * batch]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
                loss.backward()
                opt.step()
                losses.append(loss.detach())
                if step < 15:  # every rank all-gathers the same parameters after the step
                    consistent &= _same_on_all_ranks(_full(model).detach())
                step += 1
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            logits = model(xte)
            acc = (logits.argmax(1) == yte).double().mean().item()
        params = _full(model).detach().clone()
        res[name] = {"acc": acc, "params": params, "params_short": params if params_short is None else params_short, "losses": torch.stack(losses),
                     "consistent": consistent, "seconds": seconds, "steps": step,
                     "stats": state.stats() if state is not None else None}
        if state is not None:
            state.close()
    return res


def _steps(model, opt, rank, world, first, count):
    for s in range(first, first + count):
        g = torch.Generator().manual_seed(1000 * s + rank)
        x = torch.randn(16, 64, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def resume_and_errors_case(rank: int, world: int) -> dict:
    """Bit-exact resume from a state_dict; ValueErrors for what FSDP2 would break."""
    mesh = init_device_mesh("cpu", (world,))
    opts = {"error_feedback": True, "refit_every": 2, "warmup_steps": 1, "seed": 7}
    out = {}
    progress(rank, "resume: straight")
    model = _mlp(mesh)
    state = fsdp.register(model, codec=C.PruneFPCodec(0.85, 6), **opts)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _steps(model, opt, rank, world, 0, 6)
    straight = _full(model).detach().clone()
    state.close()

    progress(rank, "resume: 3 + 3")
    model = _mlp(mesh)
    state = fsdp.register(model, codec=C.PruneFPCodec(0.85, 6), **opts)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _steps(model, opt, rank, world, 0, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gradcomp": state.state_dict()}, buf)
    sd = state.state_dict()
    out["residual_keys"] = sorted(sd["residuals"])
    state.close()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model = _mlp(mesh, seed=123)  # a different init: everything must come from the checkpoint
    model.load_state_dict(ckpt["model"])
    state = fsdp.register(model, codec=C.PruneFPCodec(0.85, 6), **opts)
    state.load_state_dict(ckpt["gradcomp"])
    again = state.state_dict()
    out["round_trip"] = (again["step"] == sd["step"] and again["fits"] == sd["fits"]
                         and again["residuals"].keys() == sd["residuals"].keys()
                         and all(torch.equal(again["residuals"][k], sd["residuals"][k]) for k in sd["residuals"]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt.load_state_dict(ckpt["opt"])
    _steps(model, opt, rank, world, 3, 3)
    out["resumed_equal"] = torch.equal(_full(model).detach(), straight)
    out["steps"] = state.stats()["steps"]
    state.close()

    # set_force_sum_reduction_for_comms: FSDP passes SUM and divides afterwards; the same bits.
    fulls = []
    for force in (False, True):
        progress(rank, f"force sum {force}")
        model = _mlp(mesh)
        if force:  # per FSDP module (the method does not recurse)
            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.set_force_sum_reduction_for_comms(True)
        state = fsdp.register(model, codec=C.FPCodec(6), warmup_steps=0, seed=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        _steps(model, opt, rank, world, 0, 3)
        fulls.append(_full(model).detach().clone())
        out[f"ops_force_sum_{force}"] = sorted({u["op"] for u in state.stats()["units"].values()})
        state.close()
    out["force_sum_equal"] = torch.equal(fulls[0], fulls[1])

    # Settings FSDP2 (or this module) cannot serve: a clear ValueError at register().
    errors = {}

    def expect(name, fn):
        try:
            fn()
        except ValueError as e:
            errors[name] = str(e)
        else:
            errors[name] = None

    progress(rank, "errors")
    expect("not_fsdp", lambda: fsdp.register(torch.nn.Linear(2, 2), codec=C.FPCodec(6)))
    expect("fp16", lambda: fsdp.register(_mlp(mesh, MixedPrecisionPolicy(reduce_dtype=torch.float16)),
                                         codec=C.FPCodec(6)))
    m = _mlp(mesh)
    s = fsdp.register(m, codec=C.FPCodec(6))
    expect("twice", lambda: fsdp.register(m, codec=C.FPCodec(6)))
    s.close()
    expect("ef", lambda: fsdp.FSDPCompressionState(C.FPCodec(6), error_feedback="both"))
    expect("collective", lambda: fsdp.FSDPCompressionState(C.FPCodec(6), collective="allreduce"))
    expect("ranks_differ", lambda: fsdp.register(_mlp(mesh), codec=C.FPCodec(6), seed=rank))
    out["errors"] = errors
    return out


def hsdp_case(rank: int, world: int) -> dict:
    """2 x 2 HSDP: native (dense replica all-reduce) vs gradcomp's compressed replica all-reduce."""
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    rgroup = mesh.get_group("replicate")
    out = {}
    for name, codec in (("native", None), ("native_rs_fp6", C.FPCodec(6)),
                        ("identity", C.IdentityCodec()), ("fp6", C.FPCodec(6)),
                        ("prune_fp", C.PruneFPCodec(0.85, 6))):
        progress(rank, f"hsdp {name}")
        native = name.startswith("native")
        model = _mlp(mesh if native else mesh["shard"])
        state = None
        if codec is not None:
            state = fsdp.register(model, codec=codec, **({} if native else {"replicate_group": rgroup}))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        _steps(model, opt, rank % (world // 2), world // 2, 0, 5)  # replicas see the same data
        local = torch.cat([p.to_local().reshape(-1) for p in model.parameters()]).detach()
        out[name] = {"full": _full(model).detach().clone(),
                     "replicas_equal": _same_on_all_ranks(local, rgroup),
                     "stats": state.stats() if state is not None else None}
        if state is not None:
            state.close()
    try:
        fsdp.register(_mlp(mesh), codec=C.FPCodec(6), replicate_group=rgroup)
        out["hsdp_2d_error"] = None
    except ValueError as e:
        out["hsdp_2d_error"] = str(e)
    return out


def world2_case(rank: int, world: int, epochs: int, short_epochs: int, timeout: float) -> dict:
    """One spawn for the world-2 checks (spawning costs seconds): training, resume, errors, a stall."""
    return {"direct": direct_cases(rank, world), "train": train_cases(rank, world, epochs, short_epochs),
            "resume": resume_and_errors_case(rank, world),
            "stall": stall_case(rank, world, timeout)}


def world4_case(rank: int, world: int) -> dict:
    return {"direct": direct_cases(rank, world, only=("fp6", "prune_fp", "topk")), "hsdp": hsdp_case(rank, world)}


def stall_case(rank: int, world: int, timeout: float) -> dict:
    """Rank 1 stops before its backward: rank 0's reduce-scatter fails after ``timeout``."""
    mesh = init_device_mesh("cpu", (world,))
    model = _mlp(mesh, reshard=False)  # no all-gather in backward: the first collective is ours
    state = fsdp.register(model, codec=C.FPCodec(6), warmup_steps=0, timeout=timeout)
    x = torch.randn(8, 64)
    loss = model(x).square().mean()
    if rank == 1:
        time.sleep(timeout + 1.5)
        return {}
    t0 = time.perf_counter()
    try:
        loss.backward()
        return {"error": None}
    except RuntimeError as e:
        return {"error": str(e), "seconds": time.perf_counter() - t0,
                "later": _later_error(state)}


def _later_error(state) -> str | None:
    try:
        fsdp.CompressedReduceScatter(state, 0)(torch.empty(1), torch.empty(2), None, dist.ReduceOp.AVG)
    except RuntimeError as e:
        return str(e)
    return None


def killed_peer_rank(rank: int, world: int, workdir: str) -> None:
    """Rank 1 trains 2 steps, runs the third step's forward, then SIGKILLs itself; rank 0 records
    how soon its ``backward()`` (whose first collective is gradcomp's reduce-scatter: no
    all-gather in backward) raised, and what it said, then returns without tearing down."""
    import os
    import signal
    from pathlib import Path

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(workdir, "store"), world),
                            rank=rank, world_size=world)
    model = _mlp(init_device_mesh("cpu", (world,)), reshard=False)
    fsdp.register(model, codec=C.FPCodec(6), timeout=60.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    result: dict = {"error": "backward never raised"}
    for step in range(100):
        g = torch.Generator().manual_seed(step * 10 + rank)
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 64, generator=g)),
                                                 torch.randint(0, 10, (8,), generator=g))
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        opt.zero_grad()
        t = time.monotonic()
        try:
            loss.backward()
        except RuntimeError as exc:
            result = {"step": step, "seconds": time.monotonic() - t, "message": str(exc)}
            break
        opt.step()
    torch.save(result, Path(workdir) / f"dead{rank}.pt")
