"""Error of the hook's averaged gradient on real models, per tensor, against the exact DDP average.

Two gloo ranks (spawned) train each model with plain fp32 DDP (the task's optimizer, data and
batches of ``bandwidth_accuracy.py``'s ``lm`` and ``cnn`` tasks, ``benchmarks/_tasks.py``). At
every training step, after the exact step's backward and before its optimizer step, each codec's
own DDP replica (``gradcomp.comm.hook.register(ddp, codec)``, DDP's default buckets unless
``--bucket-cap-mb``) gets the same weights and buffers and runs forward/backward on the same
batch, so its hook sees every step as in training (warm-up step, DDP's bucket rebuild, a refit
every ``refit_every`` steps, stale plans in between). From step ``--measure-from`` on it
compares that replica's averaged gradient ``h`` with the exact one ``e`` (fp32 all-reduce mean
of the same local gradients) per parameter tensor:

* NMSE ``||h - e||^2 / ||e||^2`` (``e == 0`` everywhere: ``0`` if ``h`` is too, else ``inf``);
* whole-model NMSE ``sum ||h - e||^2 / sum ||e||^2``, and per DDP bucket;
* exact-zero share of the local gradient (rank 0, before averaging), of ``e`` and of ``h``;
* payload bits per element of the step (phase-1 payloads incl. headers, mean over ranks).

Codecs run without error feedback (each step's error on its own: TopK's is then its one-step
error, not what TopK + EF trains with). Per-tensor figures are means over the measured steps;
``worst`` is the largest single-step value.

    python benchmarks/real_grad_error.py --label before    # ~2-3 min on 2 shared cores
    python benchmarks/real_grad_error.py --label after --models lm
    python benchmarks/real_grad_error.py --label before --render-only   # redo md/csv from the JSON

Output (``--output``, default ``benchmarks/results/real_grad_error``): per label
``<label>.json`` (everything), ``<label>.csv`` (one row per model x codec x tensor) and
``<label>.md``; ``README.md`` there is rewritten from every label's JSON found (whole-model
tables side by side).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import math
import os
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

DEFAULT_OUTPUT = os.path.join(HERE, "results", "real_grad_error")
WORLD = 2
CODECS = {
    "fp6": "FPCodec(6)",
    "fp8": "FPCodec(8)",
    "prunefp_0.85_6": "PruneFPCodec(0.85, 6)",
    "prunefp_0.85_6_nz": "PruneFPCodec(0.85, 6, count_zeros=False)",
    "prunefp_0.85_6_tensor": "PruneFPCodec(0.85, 6, threshold='tensor')",
    "prune_0.85": "PruneCodec(0.85)",
    "budget_1.5": "BudgetCodec(1.5)",
    "topk_0.01": "TopKCodec(0.01)",
}
MODELS = ("lm", "cnn")
# The goals (issue 15), checked in the report.
GOALS = {"prunefp_0.85_6": 0.1, "fp6": 0.03}
TENSOR_LIMIT, TENSOR_MIN_NUMEL = 1.0, 64


def _codec(name: str):
    from gradcomp import codecs as C

    return {"fp6": lambda: C.FPCodec(6), "fp8": lambda: C.FPCodec(8),
            "prunefp_0.85_6": lambda: C.PruneFPCodec(0.85, 6),
            "prunefp_0.85_6_nz": lambda: C.PruneFPCodec(0.85, 6, count_zeros=False),
            "prunefp_0.85_6_tensor": lambda: C.PruneFPCodec(0.85, 6, threshold="tensor"),
            "prune_0.85": lambda: C.PruneCodec(0.85),
            "budget_1.5": lambda: C.BudgetCodec(1.5), "topk_0.01": lambda: C.TopKCodec(0.01)}[name]()


def _task_cfg(model: str) -> dict:
    from _tasks import TASKS

    t = TASKS[model]
    d = t.defaults
    return {"task": model, "width": d["width"], "global_batch": d["global_batch"], "lr": d["lr"],
            "momentum": d["momentum"], "steps": d["steps"]}


# ----------------------------------------------------------------------------- ranks
def _rank(rank: int, job: dict) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(job["store"], WORLD), rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    try:
        out = {m: _measure_model(rank, job, m) for m in job["models"]}
        if rank == 0:
            with open(job["result"], "w") as f:
                json.dump(out, f)
    except BaseException:
        with open(os.path.join(job["workdir"], f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


FLOOR_DENSITY = 0.15  # PruneFP(0.85)'s requested density


def floor_variance(x, density: float) -> float:
    """Least variance of any unbiased sparsifier of ``x`` that keeps ``density * numel`` entries
    in expectation, each independently: entry ``i`` kept with probability ``p_i = min(1, |x_i| /
    lam)`` (``lam`` set by the density) and sent as ``x_i / p_i``; the variance is
    ``sum x_i^2 (1 / p_i - 1)`` (Wangni et al. 2018: these ``p_i`` minimise it for the expected
    count). Stochastic pruning at threshold ``alpha = lam`` is exactly this sparsifier; a codec
    that also rounds the kept values can only add to it. ``0`` when the nonzeros fit the budget."""
    import torch

    a = x.detach().reshape(-1).double().abs()
    target = density * a.numel()
    if int((a > 0).sum()) <= target:
        return 0.0
    lo, hi = 0.0, float(a.max()) * a.numel()
    for _ in range(80):  # bisection on lam: sum(min(1, a / lam)) is decreasing in lam
        lam = 0.5 * (lo + hi)
        if float(torch.clamp(a / lam, max=1.0).sum()) > target:
            lo = lam
        else:
            hi = lam
    p = torch.clamp(a / hi, max=1.0)
    kept = p > 0
    return float((a[kept] ** 2 * (1.0 / p[kept] - 1.0)).sum())


def _exact_hook(state: dict, bucket):
    """fp32 all-reduce mean (DDP's own arithmetic), recording local exact zeros and buckets."""
    import torch.distributed as dist

    for p, g in zip(bucket.parameters(), bucket.gradients()):
        state["local_zeros"][id(p)] = int((g == 0).sum())
        state["bucket_of"][id(p)] = bucket.index()
        state["local"][id(p)] = g.detach().clone()
    buf = bucket.buffer()
    buf.div_(dist.get_world_size())
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])


def _measure_model(rank: int, job: dict, name: str) -> dict:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gradcomp
    from _tasks import TASKS

    task, cfg = TASKS[name], _task_cfg(name)
    t_start = time.perf_counter()
    data = task.load_data()
    kw = {} if job["bucket_cap_mb"] is None else {"bucket_cap_mb": job["bucket_cap_mb"]}
    model = task.build_model(data, cfg, job["seed"])
    exact_state = {"local_zeros": {}, "bucket_of": {}, "local": {}}
    ddp = DDP(model, init_sync=False, **kw)
    ddp.register_comm_hook(exact_state, _exact_hook)
    opt, sched = task.optimizer(ddp.parameters(), cfg)
    replicas = {}
    for c in job["codecs"]:
        m = task.build_model(data, cfg, job["seed"])
        r = DDP(m, init_sync=False, **kw)
        st = gradcomp.register(r, _codec(c), seed=job["seed"], error_feedback=False)
        replicas[c] = (m, r, st)
    batches = task.batches(data, cfg, rank, WORLD, job["seed"])
    params = [(n, p) for n, p in model.named_parameters()]
    acc = {c: {"sq_err": {}, "sq_ref": {}, "nmse_steps": {}, "hook_zeros": {}, "whole": [], "bits": [],
               "buckets": []} for c in job["codecs"]}
    ref_zeros, local_zeros, losses = {}, {}, []
    floor = {"tensor": {}, "ref": {}, "global": [], "whole_tensor": []}
    for step in range(job["steps"]):
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(ddp(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        exact = {n: p.grad.detach().clone() for n, p in params}
        measure = step >= job["measure_from"]
        if measure:
            for n, p in params:
                ref_zeros.setdefault(n, []).append(float((exact[n] == 0).float().mean()))
                local_zeros.setdefault(n, []).append(exact_state["local_zeros"][id(p)] / p.numel())
            # The floor of unbiased sparsification at PruneFP(0.85)'s density, for the average of
            # the ranks' independently sparsified gradients: per tensor, and with one threshold
            # over the whole model (the allocation that minimises the whole-model error).
            local = [exact_state["local"][id(p)] for _, p in params]
            var = torch.tensor([floor_variance(g, FLOOR_DENSITY) for g in local]
                               + [floor_variance(torch.cat([g.reshape(-1) for g in local]), FLOOR_DENSITY)],
                               dtype=torch.float64)
            dist.all_reduce(var)
            var /= WORLD ** 2
            refs = [float((exact[n].double() ** 2).sum()) for n, _ in params]
            for (n, _), v, r in zip(params, var[:-1].tolist(), refs):
                floor["tensor"][n] = floor["tensor"].get(n, 0.0) + v
                floor["ref"][n] = floor["ref"].get(n, 0.0) + r
            floor["global"].append(float(var[-1]) / sum(refs))
            floor["whole_tensor"].append(float(var[:-1].sum()) / sum(refs))
        for c, (m, r, st) in replicas.items():
            with torch.no_grad():
                for (n, p), q in zip(params, m.parameters()):
                    q.copy_(p)
                for b, bq in zip(model.buffers(), m.buffers()):
                    bq.copy_(b)
            for q in m.parameters():
                q.grad = None
            task.loss(r(x), y).backward()
            st.wait_idle()
            if not measure:
                continue
            a = acc[c]
            tot_err = tot_ref = 0.0
            per_bucket: dict = {}
            for (n, p), q in zip(params, m.parameters()):
                e, h = exact[n].double(), q.grad.detach().double()
                se, sr = float(((h - e) ** 2).sum()), float((e ** 2).sum())
                a["sq_err"][n] = a["sq_err"].get(n, 0.0) + se
                a["sq_ref"][n] = a["sq_ref"].get(n, 0.0) + sr
                nm = se / sr if sr > 0 else (0.0 if se == 0 else math.inf)
                a["nmse_steps"].setdefault(n, []).append(nm)
                a["hook_zeros"].setdefault(n, []).append(float((q.grad == 0).float().mean()))
                tot_err += se
                tot_ref += sr
                b = exact_state["bucket_of"][id(p)]
                pe, pr = per_bucket.get(b, (0.0, 0.0))
                per_bucket[b] = (pe + se, pr + sr)
            a["whole"].append(tot_err / tot_ref)
            a["buckets"].append({str(b): (se / sr if sr else None) for b, (se, sr) in per_bucket.items()})
            bs = st.stats()["buckets"]
            bits = torch.tensor([8.0 * sum(v["payload_bytes"] for v in bs.values()),
                                 float(sum(v["numel"] for v in bs.values()))], dtype=torch.float64)
            dist.all_reduce(bits)
            a["bits"].append(float(bits[0] / bits[1]))
        opt.step()
        if sched is not None:
            sched.step()
    buckets = {}
    for n, p in params:
        buckets.setdefault(exact_state["bucket_of"][id(p)], []).append(n)
    for c, (m, r, st) in replicas.items():
        stats = st.stats()
        acc[c]["bucket_plans"] = {str(k): {kk: vv for kk, vv in v.items() if kk in ("numel", "collective", "phase1")}
                                  for k, v in stats["buckets"].items()}
        st.close()
    if rank != 0:
        return {}
    tensors = []
    for n, p in params:
        tensors.append({"name": n, "numel": p.numel(), "shape": list(p.shape), "bucket": exact_state["bucket_of"][id(p)],
                        "zero_share_local": sum(local_zeros[n]) / len(local_zeros[n]),
                        "zero_share_exact_avg": sum(ref_zeros[n]) / len(ref_zeros[n])})
    codecs = {}
    for c in job["codecs"]:
        a = acc[c]
        per = {}
        for n, p in params:
            steps_nm = a["nmse_steps"][n]
            per[n] = {"nmse": sum(steps_nm) / len(steps_nm), "nmse_worst": max(steps_nm),
                      "zero_share_hook_avg": sum(a["hook_zeros"][n]) / len(a["hook_zeros"][n])}
        big = [(n, v["nmse"]) for n, v in per.items() if dict(params)[n].numel() >= TENSOR_MIN_NUMEL]
        worst = max(big, key=lambda kv: kv[1])
        bucket_nmse = {}
        for rec in a["buckets"]:
            for b, v in rec.items():
                bucket_nmse.setdefault(b, []).append(v)
        codecs[c] = {"label": CODECS[c], "whole_nmse": sum(a["whole"]) / len(a["whole"]),
                     "whole_nmse_worst": max(a["whole"]), "whole_nmse_steps": a["whole"],
                     "bits_per_element": sum(a["bits"]) / len(a["bits"]),
                     "worst_tensor": worst[0], "worst_tensor_nmse": worst[1],
                     "tensors_over_limit": sum(1 for _, v in big if v > TENSOR_LIMIT),
                     "bucket_nmse": {b: sum(v) / len(v) for b, v in bucket_nmse.items()},
                     "bucket_plans": a["bucket_plans"], "tensors": per}
    return {"model": task.model_name(cfg), "data": data["source"], "corpus": data.get("corpus"),
            "params": sum(p.numel() for _, p in params), "tensors": tensors,
            "buckets": {str(b): {"tensors": len(v), "numel": sum(dict(params)[n].numel() for n in v)}
                        for b, v in sorted(buckets.items())},
            "train_losses": losses, "codecs": codecs, "seconds": time.perf_counter() - t_start,
            "floor": {"density": FLOOR_DENSITY,
                      "whole_per_tensor": sum(floor["whole_tensor"]) / len(floor["whole_tensor"]),
                      "whole_global": sum(floor["global"]) / len(floor["global"]),
                      "tensors": {n: (floor["tensor"][n] / floor["ref"][n] if floor["ref"][n] else 0.0)
                                  for n in floor["tensor"]}},
            "cfg": cfg}


# ----------------------------------------------------------------------------- reports
def _g(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def label_markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"# Real-gradient error of the hook: label `{res['label']}`", "",
             f"Run {res['started']} ({res['seconds']:.0f} s), git {res['git']}; CPU {env['cpu']}, torch {env['torch']}, "
             f"Python {env['python']}, gradcomp {env['gradcomp']}. {WORLD} gloo ranks, seed {res['seed']}, "
             f"steps {res['steps']} (measured from step {res['measure_from']}), DDP buckets: "
             + ("default" if res["bucket_cap_mb"] is None else f"bucket_cap_mb={res['bucket_cap_mb']}")
             + "; codecs without error feedback, hook defaults otherwise (warmup_steps=1, refit_every=10).", "",
             f"Command: `{res['command']}`", ""]
    for model, r in res["models"].items():
        lines += [f"## {model}: {r['model']}", "", f"{r['params']:,} parameters in {len(r['tensors'])} tensors, "
                  f"{len(r['buckets'])} DDP bucket(s) ({', '.join(str(b['numel']) for b in r['buckets'].values())} "
                  f"elements); data: {r['data']}. Training loss over the steps: "
                  + ", ".join(f"{v:.3f}" for v in r["train_losses"]) + ".", "",
                  "| codec | whole-model NMSE (mean / worst step) | bits/element | worst tensor (>= 64 el.) | its NMSE "
                  "| tensors >= 64 el. over 1.0 | goal |",
                  "|---|---:|---:|---|---:|---:|---|"]
        for c, v in r["codecs"].items():
            goal = GOALS.get(c)
            met = []
            if goal is not None:
                met.append(f"whole <= {goal}: {'met' if v['whole_nmse'] <= goal else 'NOT met'}")
            met.append(f"no tensor > 1: {'met' if v['tensors_over_limit'] == 0 else 'NOT met'}")
            lines.append(f"| {v['label']} | {_g(v['whole_nmse'])} / {_g(v['whole_nmse_worst'])} | "
                         f"{v['bits_per_element']:.3f} | `{v['worst_tensor']}` | {_g(v['worst_tensor_nmse'])} | "
                         f"{v['tensors_over_limit']} | {'; '.join(met)} |")
        cs = list(r["codecs"])
        fl = r.get("floor")
        if fl:
            lines += ["", f"Floor of unbiased sparsification at density {fl['density']} (PruneFP(0.85)'s), for the "
                      "average of the ranks' independently sparsified gradients, computed from this run's local "
                      "gradients (`floor_variance`): whole-model NMSE "
                      f"{_g(fl['whole_per_tensor'])} with a threshold per tensor, {_g(fl['whole_global'])} with one "
                      "threshold over the whole model (the least any unbiased sparsifier at this density reaches; "
                      "rounding the kept values only adds). Per tensor in the last column below."]
        lines += ["", "Per DDP bucket: NMSE of the bucket's averaged gradient (mean over measured steps).", "",
                  "| codec | " + " | ".join(f"bucket {b} ({v['numel']:,} el., {v['tensors']} tensors)"
                                           for b, v in r["buckets"].items()) + " |",
                  "|---|" + "---:|" * len(r["buckets"])]
        for c in cs:
            bn = r["codecs"][c]["bucket_nmse"]
            lines.append(f"| {CODECS[c]} | " + " | ".join(_g(bn.get(b)) for b in r["buckets"]) + " |")
        lines += ["", "Per tensor: NMSE (mean over measured steps) per codec; exact-zero share of rank 0's local "
                  "gradient, of the exact average, and of the hook's average (PruneFP).", "",
                  "| tensor | numel | bucket | zeros local | zeros exact avg | zeros PruneFP avg | "
                  + " | ".join(CODECS[c] for c in cs) + (" | unbiased floor at 0.15 |" if fl else " |"),
                  "|---|---:|---:|---:|---:|---:|" + "---:|" * (len(cs) + (1 if fl else 0))]
        for t in r["tensors"]:
            pf = r["codecs"].get("prunefp_0.85_6", {}).get("tensors", {}).get(t["name"], {})
            lines.append(f"| `{t['name']}` | {t['numel']:,} | {t['bucket']} | {t['zero_share_local']:.1%} | "
                         f"{t['zero_share_exact_avg']:.1%} | "
                         + (f"{pf['zero_share_hook_avg']:.1%}" if pf else "-") + " | "
                         + " | ".join(_g(r["codecs"][c]["tensors"][t["name"]]["nmse"]) for c in cs)
                         + (f" | {_g(fl['tensors'].get(t['name']))} |" if fl else " |"))
        lines.append("")
    return "\n".join(lines)


def write_label(out: str, res: dict) -> None:
    os.makedirs(out, exist_ok=True)
    label = res["label"]
    with open(os.path.join(out, f"{label}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, f"{label}.md"), "w") as f:
        f.write(label_markdown(res) + "\n")
    with open(os.path.join(out, f"{label}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "model", "codec", "tensor", "numel", "bucket", "nmse", "nmse_worst_step",
                    "zero_share_local", "zero_share_exact_avg", "zero_share_hook_avg", "whole_model_nmse",
                    "bits_per_element"])
        for model, r in res["models"].items():
            for c, v in r["codecs"].items():
                for t in r["tensors"]:
                    tv = v["tensors"][t["name"]]
                    w.writerow([label, model, c, t["name"], t["numel"], t["bucket"], tv["nmse"], tv["nmse_worst"],
                                t["zero_share_local"], t["zero_share_exact_avg"], tv["zero_share_hook_avg"],
                                v["whole_nmse"], v["bits_per_element"]])


def write_index(out: str) -> str:
    """Rewrite ``README.md`` of ``out``: whole-model NMSE and bits per label, side by side."""
    runs = []
    for p in sorted(glob.glob(os.path.join(out, "*.json"))):
        with open(p) as f:
            r = json.load(f)
        if "models" in r and "label" in r:
            runs.append(r)
    runs.sort(key=lambda r: r["started"])
    lines = ["# Real-gradient error of the hook, per label", "",
             "Whole-model NMSE of the hook's averaged gradient against the exact DDP average (mean over the measured "
             "steps), payload bits per element, and the worst tensor of >= 64 elements. Goals (issue 15): "
             "PruneFP(0.85, 6) <= 0.1, FP6 <= 0.03, no tensor of >= 64 elements above 1.0. Details per label in "
             "`<label>.md` / `.csv` / `.json`; written by `benchmarks/real_grad_error.py`.", ""]
    models = sorted({m for r in runs for m in r["models"]})
    for m in models:
        rs = [r for r in runs if m in r["models"]]
        lines += [f"## {m}", "", "| codec | " + " | ".join(f"{r['label']}: NMSE / bits / worst tensor NMSE" for r in rs)
                  + " |", "|---|" + "---|" * len(rs)]
        for c in CODECS:
            cells = []
            for r in rs:
                v = r["models"][m]["codecs"].get(c)
                cells.append("-" if v is None else f"{_g(v['whole_nmse'])} / {v['bits_per_element']:.2f} / "
                             f"{_g(v['worst_tensor_nmse'])}")
            lines.append(f"| {CODECS[c]} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Runs: " + "; ".join(f"`{r['label']}` {r['started']} git {r['git']}" for r in rs) + ".")
        setups = {json.dumps([r["models"][m].get("cfg"), r["steps"], r["measure_from"], r["seed"], r["bucket_cap_mb"]],
                             sort_keys=True) for r in rs}
        if len(setups) > 1:
            lines.append("**The labels above were measured with different training setups** (task config, steps, "
                         "seed or buckets; see each label's JSON): their gradients differ, not only the codecs.")
        lines.append("")
    md = "\n".join(lines)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(md + "\n")
    return md


def _git() -> str:
    import subprocess

    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "gradcomp"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return rev + ("+dirty(gradcomp)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--label", required=True, help="name of this run, e.g. before / after (letters, digits, -_.)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--codecs", default=",".join(CODECS), help=f"comma list of {', '.join(CODECS)}")
    p.add_argument("--steps", type=int, default=8, help="training steps per model (default 8)")
    p.add_argument("--measure-from", type=int, default=3, help="first measured step (0-based; default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP bucket cap (default: DDP's own)")
    p.add_argument("--output", default=DEFAULT_OUTPUT)
    p.add_argument("--render-only", action="store_true", help="rewrite <label>.md/.csv and README.md from <label>.json")
    a = p.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    models, codecs = split(a.models), split(a.codecs)
    errors = [f"unknown model {m!r}" for m in models if m not in MODELS]
    errors += [f"unknown codec {c!r}" for c in codecs if c not in CODECS]
    if not a.label.replace("-", "").replace("_", "").replace(".", "").isalnum():
        errors.append(f"--label must be letters, digits, '-', '_' or '.', got {a.label!r}")
    if not 0 <= a.measure_from < a.steps:
        errors.append(f"--measure-from must be in 0..steps-1, got {a.measure_from} with --steps {a.steps}")
    if a.measure_from < 2:
        errors.append("--measure-from must be >= 2 (step 0 is the hook's fp32 warm-up, DDP rebuilds buckets after it)")
    if not models or not codecs:
        errors.append("need at least one model and one codec")
    if errors:
        p.error("; ".join(errors))
    if a.render_only:
        with open(os.path.join(a.output, f"{a.label}.json")) as f:
            write_label(a.output, json.load(f))
        write_index(a.output)
        print(f"real_grad_error: rewrote {a.output}/{a.label}.{{md,csv}} and README.md")
        return 0
    import torch.multiprocessing as mp

    from gradcomp.numerics import kernels
    from gradcomp.app.env import environment

    kernels.warmup()  # build the native kernels once here, not in both ranks
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.time()
    print(f"real_grad_error: {', '.join(models)} x {len(codecs)} codecs, {a.steps} steps on {WORLD} ranks "
          f"(label {a.label})", flush=True)
    with tempfile.TemporaryDirectory(prefix="gradcomp-rge-") as d:
        job = {"store": os.path.join(d, "store"), "workdir": d, "result": os.path.join(d, "result.json"),
               "models": models, "codecs": codecs, "steps": a.steps, "measure_from": a.measure_from,
               "seed": a.seed, "bucket_cap_mb": a.bucket_cap_mb}
        try:
            mp.spawn(_rank, args=(job,), nprocs=WORLD, join=True)
        except Exception as exc:
            errs = [open(os.path.join(d, n)).read() for n in sorted(os.listdir(d)) if n.startswith("error")]
            print(f"real_grad_error: ranks failed: {exc}\n" + "\n".join(errs), file=sys.stderr)
            return 1
        with open(job["result"]) as f:
            measured = json.load(f)
    res = {"label": a.label, "started": started, "seconds": time.time() - t0, "git": _git(),
           "environment": environment(), "seed": a.seed, "steps": a.steps, "measure_from": a.measure_from,
           "bucket_cap_mb": a.bucket_cap_mb, "world_size": WORLD,
           "command": "python benchmarks/real_grad_error.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "models": measured}
    write_label(a.output, res)
    write_index(a.output)
    for m, r in measured.items():
        print(f"== {m}: {r['params']:,} parameters, {len(r['buckets'])} buckets, {r['seconds']:.0f} s")
        for c, v in r["codecs"].items():
            print(f"  {v['label']:<24s} whole NMSE {_g(v['whole_nmse']):>8s} (worst step {_g(v['whole_nmse_worst'])})"
                  f"  {v['bits_per_element']:.3f} bits/el  worst tensor {v['worst_tensor']} {_g(v['worst_tensor_nmse'])}"
                  f"  over 1.0: {v['tensors_over_limit']}")
    print(f"real_grad_error: wrote {a.output}/{a.label}.{{md,json,csv}} and README.md in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
