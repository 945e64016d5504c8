"""SLAB on a small ViT or Swin: softmax attention + LayerNorm vs SLA + LayerNorm vs SLA + PRepBN, on digits.

    python examples/slab_vit.py [--model vit|swin] [--epochs 40] [--seeds 0 1 2] [--results examples/results]

``--model vit`` (default): the ViT of ``examples/prepbn_vit.py`` (16×16 digits, 4×4 patches, 4 layers,
4 heads, width 64). ``--model swin``: a two-stage torchvision Swin (2×2 patches, stages of 8×8 and 4×4
tokens, windows 4×4, 2 blocks each, widths 64/128, 4/8 heads); ``normfx.linear_attention`` swaps its
first stage (SLAB's ``LLSS`` is the first half of the stages) and the second keeps softmax windows.
The model is built once per seed; the runs share its initial weights and every batch:

* ``softmax_ln``: as built;
* ``sla_ln``: ``normfx.linear_attention(model)`` (the attention changes, LayerNorm stays);
* ``slab``: ``normfx.repbn(normfx.linear_attention(model), total_steps=...)``: SLA + PRepBN, λ from 1
  to 0 over the first 3/4 of training, then ``recalibrate_bn`` and ``normfx.deploy`` (no
  normalization, no softmax attention left);
* ``slab_distill``: the same SLAB model trained afterwards on the same batches with the trained
  ``softmax_ln`` model as its teacher: loss ``(1 − α)·CE(student, y) + α·τ²·KL(teacher ‖ student)`` at
  temperature τ (DeiT's soft distillation; ``--alpha``, ``--tau``).

AdamW (lr 2e-3, weight decay 0.05, cosine), batch 64. Per seed: test accuracy of each run and the
eval latency of each final model (batch 1, median of repeated runs, the three interleaved in one
process). Results: ``results/slab_vit.json`` / ``results/slab_swin.json`` (rendered into
docs/linear_attention.md).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import normfx
from _digits import accuracy, load_digits
from _results import config_of, mean_std, parse, record
from prepbn_vit import make_vit

RUNS = ("softmax_ln", "sla_ln", "slab", "slab_distill")


def make_swin() -> nn.Module:
    import torchvision

    return torchvision.models.SwinTransformer(patch_size=[2, 2], embed_dim=64, depths=[2, 2], num_heads=[4, 8],
                                              window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=10)


# model: (builder, normfx.linear_attention keywords)
MODELS = {"vit": (make_vit, {}), "swin": (make_swin, {"image_size": 16})}


def softmax_attention(m: nn.Module) -> int:
    """Softmax attention modules left: MultiheadAttention (torchvision's ViT), window attention (Swin)."""
    return sum(isinstance(x, nn.MultiheadAttention) or "WindowAttention" in type(x).__name__ for x in m.modules())


@torch.no_grad()
def latencies(models: dict[str, nn.Module], x: torch.Tensor, reps: int = 50) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.eval()(x)
    for _ in range(reps):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def train(models: dict[str, nn.Module], perms: list[torch.Tensor], args: argparse.Namespace, data: tuple,
          total: int, teacher: nn.Module | None = None) -> None:
    """Train ``models`` side by side on the batches ``perms`` gives (AdamW, cosine); with ``teacher``, soft
    distillation from its logits. A PRepBN model's λ follows its ``RepBNScheduler``."""
    x_tr, y_tr = data[0], data[1]
    scheds = [normfx.RepBNScheduler(m) for m in models.values()
              if any(isinstance(x, normfx.nn.ProgressiveRepBN) for x in m.modules())]
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.05) for k, m in models.items()}
    lrs = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, total) for k, o in opts.items()}
    steps = -(-len(y_tr) // args.batch)
    for perm in tqdm(perms, desc=", ".join(models) + (" (distilled)" if teacher is not None else ""), leave=False):
        for i in range(steps):
            idx = perm[i * args.batch:(i + 1) * args.batch]
            xb, yb = x_tr[idx], y_tr[idx]
            soft = None
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(xb) / args.tau, dim=1)
            for k, m in models.items():
                m.train()
                logits = m(xb)
                loss = F.cross_entropy(logits, yb)
                if soft is not None:
                    kl = F.kl_div(F.log_softmax(logits / args.tau, dim=1), soft, reduction="batchmean")
                    loss = (1 - args.alpha) * loss + args.alpha * args.tau ** 2 * kl
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
                lrs[k].step()
            for sched in scheds:
                sched.step()


def run(seed: int, args: argparse.Namespace, data: tuple) -> dict:
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    steps = -(-len(y_tr) // args.batch)
    total = args.epochs * steps
    build, kw = MODELS[args.model]
    base = build()
    models = {"softmax_ln": copy.deepcopy(base), "sla_ln": normfx.linear_attention(base, **kw),
              "slab": normfx.repbn(normfx.linear_attention(base, **kw), total_steps=int(0.75 * total))}
    student = normfx.repbn(normfx.linear_attention(base, **kw), total_steps=int(0.75 * total))
    g = torch.Generator().manual_seed(1000 + seed)
    perms = [torch.randperm(len(y_tr), generator=g) for _ in range(args.epochs)]
    train(models, perms, args, data, total)
    teacher = models["softmax_ln"].eval()
    train({"slab_distill": student}, perms, args, data, total, teacher=teacher)
    finals = {"softmax_ln": teacher, "sla_ln": models["sla_ln"]}
    out: dict = {}
    for k, m in (("slab", models["slab"]), ("slab_distill", student)):
        normfx.recalibrate_bn(m, (x_tr[i:i + 256] for i in range(0, len(y_tr), 256)), progress=False)
        finals[k] = deployed = normfx.deploy(m.eval())
        out[k] = {"normalization_left": sum(isinstance(x, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm))
                                            for x in deployed.modules()),
                  "softmax_left": softmax_attention(deployed),
                  "softmax_before": softmax_attention(base)}
    for k, m in finals.items():
        out.setdefault(k, {})["accuracy"] = accuracy(m, x_te, y_te)
    for k, ms in latencies(finals, x_te[:1]).items():
        out[k]["latency_ms"] = ms
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit", choices=list(MODELS))
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term (slab_distill)")
    ap.add_argument("--tau", type=float, default=1.0, help="distillation temperature (slab_distill)")
    args = parse(ap, out=False, quick={"seeds": [0], "epochs": 2})
    data = load_digits()
    runs = [{"seed": s, **run(s, args, data)} for s in args.seeds]
    path = record(f"slab_{args.model}", config_of(args), runs,
                  args.results)
    print(f"\n{args.model} on digits, {args.epochs} epochs, seeds {args.seeds} ({path})")
    for k in RUNS:
        print(f"  {k:<11} test accuracy {mean_std([r[k]['accuracy'] for r in runs])}   "
              f"eval latency {statistics.fmean(r[k]['latency_ms'] for r in runs):.2f} ms")


if __name__ == "__main__":
    main()
