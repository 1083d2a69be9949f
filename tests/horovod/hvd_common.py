"""Per-rank bodies shared by the DDP side (spawned gloo ranks) and the Horovod side (horovodrun).

Kept free of horovod imports at module level: the DDP side imports it without Horovod.
"""

from __future__ import annotations

import torch

from gradcomp import codecs as C

STEPS = 4
SEED = 7
SMALL_CAP_MB = 0.001  # about 260 floats: three buckets for the MLP below


def parity_runs() -> list[tuple[str, C.Codec, dict]]:
    """(name, codec, options) compared between the DDP hook and the Horovod optimizer.

    ``bucket_cap_mb`` is a bucketing option (DDP's, or the optimizer's); the rest are
    CompressionState options.
    """
    big = {"bucket_cap_mb": 100}
    return [
        ("fp6", C.FPCodec(6), dict(big)),
        ("prune_fp_ef", C.PruneFPCodec(0.85, 6), dict(big, error_feedback=True)),
        ("half", C.HalfCodec(), dict(big)),
        ("fp5_two_phase_ef", C.FPCodec(5), dict(big, collective="two_phase", error_feedback=True)),
        ("fp6_small_buckets", C.FPCodec(6), {"bucket_cap_mb": SMALL_CAP_MB, "error_feedback": "worker"}),
    ]


def make_model() -> torch.nn.Module:
    """A small MLP with weights from a seeded generator (identical on every rank)."""
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32),
                                torch.nn.ReLU(), torch.nn.Linear(32, 10))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)


def train_steps(model, wrapped, opt, rank: int, after_backward) -> dict:
    """``STEPS`` SGD steps; ``after_backward(opt)`` makes the averaged gradients visible."""
    grads = []
    for step in range(STEPS):
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(wrapped(x), y).backward()
        after_backward(opt)
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    return {"grads": grads, "params": [p.detach().clone() for p in model.parameters()]}


def ddp_parity(rank: int, world: int) -> dict:
    """The DDP-hook side of the parity test (run with tests/distributed/harness.spawn)."""
    import gradcomp

    out = {}
    for name, codec, options in parity_runs():
        options = dict(options)
        cap = options.pop("bucket_cap_mb")
        model = make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cap)
        state = gradcomp.register(ddp, codec=codec, seed=SEED, **options)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        out[name] = train_steps(model, ddp, opt, rank, lambda o: None)
        out[name]["stats"] = state.stats()
        state.close()
    return out


def horovod_parity(rank: int, world: int) -> dict:
    """The Horovod side of the parity test (call after hvd.init())."""
    from gradcomp.comm.horovod import DistributedOptimizer

    out = {}
    for name, codec, options in parity_runs():
        model = make_model()
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                   model.named_parameters(), codec=codec, seed=SEED, **options)
        out[name] = train_steps(model, model, opt, rank, lambda o: o.synchronize())
        out[name]["stats"] = opt.stats()
        out[name]["buckets"] = opt.bucket_layout()
        opt.close()
    return out
