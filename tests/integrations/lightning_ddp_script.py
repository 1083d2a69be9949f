"""Lightning DDP on 2 CPU ranks, run as a script (Lightning's launcher re-runs it per rank).

    python lightning_ddp_script.py OUTDIR MODE

MODE ``gradcomp``: ``GradcompDDPStrategy(codec=FPCodec(6))``; MODE ``plain``: Lightning's own
``DDPStrategy(ddp_comm_state=state, ddp_comm_hook=compression_hook)``. Each rank saves
``OUTDIR/MODE-rank{R}.pt``: the hook's stats, the final parameters (flat), and its losses.
"""

from __future__ import annotations

import sys
import warnings
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

import gradcomp
from gradcomp.codecs import FPCodec
from gradcomp.integrations.lightning import GradcompDDPStrategy

STEPS = 30


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)  # the same data on every rank; the sampler splits it
    x = torch.randn(2 * 16 * STEPS, 16, generator=g)
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.5 * x[:, 4:5]
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def main(outdir: Path, mode: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    if mode == "gradcomp":
        strategy = GradcompDDPStrategy(codec=FPCodec(6), timeout=timedelta(seconds=60))
        state = strategy.state
    elif mode == "plain":
        state = gradcomp.CompressionState(FPCodec(6))
        strategy = DDPStrategy(ddp_comm_state=state, ddp_comm_hook=gradcomp.compression_hook,
                               timeout=timedelta(seconds=60))
    else:
        raise ValueError(f"mode must be gradcomp or plain, got {mode!r}")
    torch.manual_seed(0)
    model = Regressor()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=outdir)
    trainer.fit(model, data())
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.save({"stats": state.stats(), "params": params, "losses": model.losses},
               outdir / f"{mode}-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
