"""gradcomp with plain torch DDP, launched by torchrun.

    torchrun --standalone --nproc-per-node 2 examples/torchrun_ddp.py OUTDIR

Each rank trains a small regressor on its share of a synthetic data set, with its gradients
reduced by gradcomp's hook (6-bit FP codec), and writes ``OUTDIR/rank{R}.pt``: the hook's
stats, the final parameters (flat) and its losses. gloo on CPU, NCCL when every rank has a GPU.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp
from gradcomp.codecs import FPCodec


def main(outdir: Path, steps: int = 30) -> None:
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")  # rank, world size, address: from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")

    torch.manual_seed(0)  # DDP broadcasts rank 0's parameters anyway
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device)
    model = DDP(net, device_ids=[device.index] if use_cuda else None)
    state = gradcomp.register(model, codec=FPCodec(6))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 16, generator=g)
        y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.5 * x[:, 4:5]
        loss = torch.nn.functional.mse_loss(model(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()  # the hook compresses and averages the gradients here
        optimizer.step()
        losses.append(loss.item())

    stats = state.stats()
    print(f"rank {rank}: {stats['steps']} steps, compression {stats['compression_ratio']:.1f}x, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
    outdir.mkdir(parents=True, exist_ok=True)
    torch.save({"stats": stats, "params": params, "losses": losses}, outdir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
