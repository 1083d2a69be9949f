"""gradcomp with Hugging Face Accelerate.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_ddp.py OUTDIR
    # CPU only (gloo): ACCELERATE_USE_CPU=1 in front of the same command

``accelerator.prepare`` wraps the model in DDP; :func:`gradcomp.register` puts the hook on that
DDP model. Each rank writes ``OUTDIR/rank{R}.pt``: the hook's stats, the final parameters
(flat) and its losses.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

import gradcomp
from gradcomp.codecs import FPCodec


def main(outdir: Path, steps: int = 30) -> None:
    accelerator = Accelerator()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    x = torch.randn(accelerator.num_processes * 16 * steps, 16)
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.5 * x[:, 4:5]
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # prepare() shards it by rank

    model, optimizer, loader = accelerator.prepare(net, optimizer, loader)
    state = gradcomp.register(model, codec=FPCodec(6))  # model is the DDP wrapper here

    losses = []
    for xb, yb in loader:
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        optimizer.zero_grad()
        accelerator.backward(loss)  # the hook compresses and averages the gradients here
        optimizer.step()
        losses.append(loss.item())

    stats, rank = state.stats(), accelerator.process_index
    print(f"rank {rank}: {stats['steps']} steps, compression {stats['compression_ratio']:.1f}x, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
    outdir.mkdir(parents=True, exist_ok=True)
    torch.save({"stats": stats, "params": params, "losses": losses}, outdir / f"rank{rank}.pt")
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
