"""Training tasks of the bandwidth benchmark (and of ``real_grad_error.py``): one small object each.

A :class:`Task` says what is trained and how it is judged; the harness
(``bandwidth_accuracy.py``) does everything else the same way for every task (namespace, link
measurement, byte counting, hooks, progress, reports). A task provides:

* ``load_data()`` -> dict with at least ``source`` (one line for the report header);
* ``build_model(data, cfg, seed)`` -> ``nn.Module`` (same weights on every rank for a seed);
* ``batches(data, cfg, rank, world, seed)`` -> an iterator of this rank's ``(x, y)`` per step,
  the global batch independent of the world size;
* ``loss(output, y)``, ``evaluate(model, data)`` -> the metric (accuracy or validation loss);
* ``optimizer(params, cfg)`` -> ``(optimizer, scheduler or None)`` (the scheduler steps once
  per training step);
* ``metric``, ``higher_is_better``, ``target_kind``: ``"absolute"`` (``cfg["target"]`` is the
  metric value to reach) or ``"fp32_relative"`` (target = fp32's final metric, mean over seeds,
  times ``1 + cfg["target"]``), and the defaults of a full sweep and of ``--quick``.

``defaults`` may also hold ``goals`` (the figures' thresholds: ``close``, the allowed gap to
fp32's final metric, relative for a loss and in accuracy points otherwise; ``vs_fp16`` and
``vs_powersgd``, the time-to-target ratios to reach) and ``est`` (time-estimate constants
calibrated at the default size and N=4: compute, evaluation, start-up seconds, the hook's
seconds per step by family, measured wire bits of model-dependent methods); see
``bandwidth_accuracy.estimate_run_s``.

``cfg`` is the harness's ``SweepConfig`` as a dict (it crosses process boundaries as JSON);
``width`` is the model size knob (MLP hidden units, ResNet base channels, LM ``d_model``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# LM architecture fixed apart from d_model (width): see LMTask.
LM_CONTEXT = 128
LM_LAYERS = 7
LM_HEAD_DIM = 64
LM_WARMUP_FRAC = 0.1
LM_MIN_LR_FRAC = 0.1
LM_WEIGHT_DECAY = 0.1
LM_BETAS = (0.9, 0.95)
LM_EVAL_BATCHES = 4  # x 8 sequences x LM_CONTEXT bytes: 4096 held-out bytes, the same for every run
LM_EVAL_BATCH = 8


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    metric: str
    higher_is_better: bool
    target_kind: str
    defaults: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)

    # --- the metric
    def reached(self, value: float, target: float) -> bool:
        return value >= target if self.higher_is_better else value <= target

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b

    def metric_text(self, v: float) -> str:
        return f"{v * 100:.2f}%" if self.metric == "accuracy" else f"{v:.4f}"

    # overridden below
    def load_data(self) -> dict: raise NotImplementedError
    def build_model(self, data: dict, cfg: dict, seed: int): raise NotImplementedError
    def batches(self, data: dict, cfg: dict, rank: int, world: int, seed: int): raise NotImplementedError
    def loss(self, out, y): raise NotImplementedError
    def evaluate(self, model, data: dict) -> float: raise NotImplementedError
    def optimizer(self, params, cfg: dict): raise NotImplementedError
    def model_name(self, cfg: dict) -> str: raise NotImplementedError
    def recipe(self, cfg: dict) -> str: raise NotImplementedError  # batch unit; optimizer (one line)
    def eval_text(self) -> str: raise NotImplementedError  # what the metric is measured on


# ----------------------------------------------------------------------------- image classification
@dataclass(frozen=True)
class DigitsTask(Task):
    """scikit-learn digits (1437 train / 360 test, 8x8) with gradcomp.app.models; SGD + momentum.

    ``pool`` > 1 average-pools the images by that factor first (the CNN task: 4x4, so the
    ResNet's last stage runs at 1x1, where a 3x3 convolution's zero padding makes 8 of its 9 taps'
    weight gradients exactly zero: the exact-zero case of torchvision's resnet18 on 32x32 inputs).
    """

    model: str = "mlp"
    pool: int = 1

    def load_data(self) -> dict:
        import torch.nn.functional as F

        from gradcomp.app.data import load_dataset

        b = load_dataset("digits", seed=0)
        (xtr, ytr), (xte, yte) = b.train.tensors, b.test.tensors
        xtr, xte, shape, src = xtr.float(), xte.float(), tuple(b.input_shape), "gradcomp.app.data.load_dataset('digits', seed=0)"
        if self.pool > 1:
            xtr, xte = F.avg_pool2d(xtr, self.pool), F.avg_pool2d(xte, self.pool)
            shape = tuple(xtr.shape[1:])
            src += f", average-pooled {self.pool}x{self.pool} to {shape[1]}x{shape[2]}"
        return {"source": src, "x_train": xtr, "y_train": ytr.long(), "x_test": xte, "y_test": yte.long(),
                "input_shape": shape, "num_classes": b.num_classes}

    def build_model(self, data, cfg, seed):
        from gradcomp.app.models import build_model

        return build_model(self.model, input_shape=data["input_shape"], num_classes=data["num_classes"],
                           width=cfg["width"], seed=seed)

    def batches(self, data, cfg, rank, world, seed):
        """gradcomp.app.data.make_loader: DistributedSampler shards of one seeded permutation per epoch."""
        import torch

        from gradcomp.app.data import make_loader

        ds = torch.utils.data.TensorDataset(data["x_train"], data["y_train"])
        loader = make_loader(ds, cfg["global_batch"] // world, rank=rank, world_size=world, seed=seed)
        epoch = 0
        while True:
            loader.sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    def loss(self, out, y):
        import torch.nn.functional as F

        return F.cross_entropy(out, y)

    def evaluate(self, model, data) -> float:
        import torch

        with torch.no_grad():
            model.eval()
            pred = model(data["x_test"]).argmax(1)
            model.train()
        return float((pred == data["y_test"]).float().mean())

    def optimizer(self, params, cfg):
        import torch

        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"]), None

    def model_name(self, cfg) -> str:
        return f"gradcomp.app.models.build_model('{self.model}', width={cfg['width']})"

    def recipe(self, cfg) -> str:
        return f"images; SGD lr {cfg['lr']} momentum {cfg['momentum']}"

    def eval_text(self) -> str:
        return "test accuracy on the 360 test images"


# ----------------------------------------------------------------------------- language model
@dataclass(frozen=True)
class LMTask(Task):
    """GPT byte-level decoder (gradcomp.app.lm) on the Python stdlib sources (gradcomp.app.corpus).

    ``width`` is d_model (heads of LM_HEAD_DIM), LM_LAYERS pre-LN blocks, context LM_CONTEXT;
    ``global_batch`` counts sequences. AdamW (betas LM_BETAS, weight decay LM_WEIGHT_DECAY on
    matrices and embeddings only), linear warm-up over LM_WARMUP_FRAC of the steps to ``lr``,
    then cosine decay to LM_MIN_LR_FRAC x ``lr``. Metric: mean loss (nats/byte) on LM_EVAL_BATCHES
    fixed held-out batches of the validation files.
    """

    def load_data(self) -> dict:
        from gradcomp.app.corpus import fixed_batches, load_python_corpus

        c = load_python_corpus()
        d = c.describe()
        return {"source": (f"Python {d['python']} standard library .py files ({d['files']} files, "
                           f"{d['files_train']} train / {d['files_val']} validation by file, "
                           f"{d['bytes_train'] / 1e6:.1f} / {d['bytes_val'] / 1e6:.1f} MB, sha256 {d['sha256'][:16]}...)"),
                "corpus": d, "train": c.train,
                "val_batches": fixed_batches(c.val, LM_EVAL_BATCHES, LM_EVAL_BATCH, LM_CONTEXT, seed=0)}

    def build_model(self, data, cfg, seed):
        from gradcomp.app.lm import build_lm

        w = cfg["width"]
        return build_lm(context=LM_CONTEXT, d_model=w, n_layer=LM_LAYERS, n_head=max(1, w // LM_HEAD_DIM), seed=seed)

    def batches(self, data, cfg, rank, world, seed):
        from gradcomp.app.corpus import lm_batch

        step = 0
        while True:
            yield lm_batch(data["train"], cfg["global_batch"], LM_CONTEXT, seed=seed, step=step,
                           rank=rank, world_size=world)
            step += 1

    def loss(self, out, y):
        from gradcomp.app.lm import lm_loss

        return lm_loss(out, y)

    def evaluate(self, model, data) -> float:
        import torch

        from gradcomp.app.lm import lm_loss

        with torch.no_grad():
            model.eval()
            v = sum(float(lm_loss(model(x), y)) for x, y in data["val_batches"]) / len(data["val_batches"])
            model.train()
        return v

    def optimizer(self, params, cfg):
        import torch

        params = list(params)
        decay = [p for p in params if p.dim() >= 2]
        other = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": LM_WEIGHT_DECAY},
                                 {"params": other, "weight_decay": 0.0}], lr=cfg["lr"], betas=LM_BETAS)
        steps = cfg["steps"]
        warm = max(1, round(LM_WARMUP_FRAC * steps))

        def factor(step: int) -> float:  # multiplier of lr for the step about to run
            if step < warm:
                return (step + 1) / warm
            t = min(1.0, (step - warm) / max(1, steps - warm))
            return LM_MIN_LR_FRAC + (1 - LM_MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * t))

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def recipe(self, cfg) -> str:
        return (f"sequences of {LM_CONTEXT} bytes; AdamW lr {cfg['lr']} "
                f"betas {LM_BETAS} weight decay {LM_WEIGHT_DECAY} (matrices and embeddings), linear warm-up over "
                f"{LM_WARMUP_FRAC:.0%} of the steps then cosine decay to {LM_MIN_LR_FRAC:g} x lr")

    def eval_text(self) -> str:
        return (f"validation loss (nats/byte) on {LM_EVAL_BATCHES} fixed held-out batches of {LM_EVAL_BATCH} x "
                f"{LM_CONTEXT} bytes from the validation files")

    def model_name(self, cfg) -> str:
        w = cfg["width"]
        return (f"gradcomp.app.lm.build_lm(d_model={w}, n_layer={LM_LAYERS}, n_head={max(1, w // LM_HEAD_DIM)}, "
                f"context={LM_CONTEXT}): GPT byte-level decoder, pre-LN, tied embeddings")


TASKS = {t.name: t for t in [
    DigitsTask(
        name="mlp", title="MLP on digits", metric="accuracy", higher_is_better=True, target_kind="absolute",
        model="mlp",
        defaults=dict(width=1000, global_batch=64, lr=0.02, momentum=0.9, steps=36, eval_every=3, target=0.95,
                      world_sizes=(2, 4), seeds=(0, 1, 2), rates=("50mbit", "200mbit", "1gbit", "uncapped"),
                      methods=("fp32", "fp16_hook", "powersgd_r1", "powersgd_r4", "quant_pertensor", "quant_perchannel",
                               "topk_0.01_ef", "fp8", "fp6", "fp5", "fp4", "prune_0.85", "prune_0.95",
                               "prunefp_0.85_6", "budget_1.5"),
                      output="bandwidth", stem="bandwidth"),
        quick=dict(steps=12, target=0.85, world_sizes=(2,), seeds=(0, 1), rates=("200mbit", "uncapped"),
                   methods=("fp32", "fp16_hook", "fp6", "prunefp_0.85_6"), compute_steps=5)),
    DigitsTask(
        name="cnn", title="ResNet with BatchNorm on 4x4 digits", metric="accuracy", higher_is_better=True,
        target_kind="absolute", model="resnet2d", pool=2,
        defaults=dict(width=32, global_batch=64, lr=0.05, momentum=0.9, steps=80, eval_every=5, target=0.9,
                      world_sizes=(4,), seeds=(0, 1), rates=("200mbit", "1gbit"),
                      methods=("fp32", "fp16_hook", "powersgd_r4", "topk_0.01_ef", "fp8", "fp6", "prune_0.85",
                               "prunefp_0.85_6", "budget_1.5"), output="bandwidth_cnn", stem="cnn",
                      goals=dict(close=0.005)),
        quick=dict(steps=6, target=0.3, world_sizes=(2,), seeds=(0,), rates=("200mbit",),
                   methods=("fp32", "prunefp_0.85_6"), compute_steps=3, eval_every=3)),
    LMTask(
        name="lm", title="GPT byte-level LM on the Python stdlib", metric="val_loss", higher_is_better=False,
        target_kind="fp32_relative",
        # steps/eval_every sized so the sweep (9 methods x 2 rates x 2 seeds, N=4) takes about 90 minutes: est is the
        # calibration run of 2026-12-02 (12 steps per method at 200 Mbit/s, N=4, machine shared: load 5-7;
        # compute-only step 0.74 s; see benchmarks/README.md)
        defaults=dict(width=256, global_batch=16, lr=1e-3, momentum=0.0, steps=90, eval_every=6, target=0.01,
                      params=5_627_136,
                      est=dict(compute_s=0.74, eval_s=0.5, start_s=2.0, group_s=60.0,
                               codec_s={"baseline": 0.0, "torch": 0.05, "topk": 0.55, "fp": 0.0, "sparse": 0.1},
                               bits={"powersgd_r4": 0.82, "powersgd_r16": 2.84, "topk_0.01_ef": 0.78,
                                     "prune_0.85": 0.22, "prune_0.95": 0.1, "prunefp_0.85_6": 0.21,
                                     "budget_1.5": 0.18}),
                      world_sizes=(4,), seeds=(0, 1), rates=("200mbit", "1gbit"),
                      methods=("fp32", "fp16_hook", "powersgd_r4", "powersgd_r16", "topk_0.01_ef", "fp6",
                               "prune_0.85", "prunefp_0.85_6", "budget_1.5"), output="bandwidth_lm", stem="lm",
                      goals=dict(close=0.01, vs_fp16=4.0, vs_powersgd=1.5)),
        quick=dict(width=64, global_batch=4, steps=4, eval_every=2, world_sizes=(2,), seeds=(0,),
                   rates=("200mbit",), methods=("fp32", "fp6"), compute_steps=2)),
]}
