"""Train a small ViT on scikit-learn's digits with LayerNorm and with PRepBN, then deploy and export.

    python examples/prepbn_vit.py [--epochs 40] [--seeds 0 1 2] [--out examples/out]
                                  [--results examples/results]

Per seed, every run starts from the same initial weights and sees the same batches:

* ``LayerNorm``: the ViT as built;
* ``PRepBN``: λ from 1 (LayerNorm) to 0 (RepBN) over the first 3/4 of training (SLAB's progressive
  schedule: its DeiT-S config reaches λ = 0 after 300k of about 375k iterations);
* ``PRepBN_ramp50``: the same, λ = 0 after half of training (a shorter ramp, longer at λ = 0);
* ``PRepBN_warm``: λ = 1 for the first quarter (SLAB's ``warm``), then the ramp to 0 by 3/4;
* ``RepBN``: λ = 0 from the first step (what SLAB's DeiT-T config does: ``norm_layer=RepBN``).

Each RepBN run is measured at λ = 0 as training left it, then again after ``recalibrate_bn`` (two
measurements, both stored). The ``PRepBN`` run is deployed (every RepBN folded into a Linear, no
normalization left). The per-seed accuracies go to ``results/prepbn_vit.json`` (``examples/render.py``
renders the docs tables). The first seed's deployed model is exported to ONNX and verified in ONNX
Runtime, and its accuracy and λ curves are plotted to ``OUT/prepbn_vit.png``.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import normfx
from _digits import accuracy, load_digits
from _results import config_of, mean_std, parse, record


def make_vit() -> nn.Module:
    import torchvision

    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
        num_classes=10, dropout=0.0, attention_dropout=0.0,
    )


# RepBN variants: (warm-up, end of the ramp) as fractions of training; λ = 0 from the start for RepBN.
VARIANTS = {"PRepBN": (0.0, 0.75), "PRepBN_ramp50": (0.0, 0.5), "PRepBN_warm": (0.25, 0.75), "RepBN": (0.0, 0.0)}


def run_seed(seed: int, args: argparse.Namespace, data: tuple) -> tuple[dict, dict, list[float], nn.Module]:
    """Train the LayerNorm ViT and each RepBN variant from one initialization; the accuracies, curves and
    the deployed PRepBN model."""
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    steps_per_epoch = -(-len(y_tr) // args.batch)
    total = args.epochs * steps_per_epoch

    base = make_vit()
    models = {"LayerNorm": copy.deepcopy(base)}
    scheds = {}
    for name in args.variants:
        warm, end = VARIANTS[name]
        models[name] = normfx.repbn(base, total_steps=max(1, int((end - warm) * total)))
        scheds[name] = normfx.RepBNScheduler(models[name], warmup_steps=int(warm * total))
        if end == 0.0:
            scheds[name].step()   # λ = 0 before the first step
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.05) for k, m in models.items()}
    lrs = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, total) for k, o in opts.items()}
    curves: dict[str, list[float]] = {k: [] for k in models}
    lams: list[float] = []

    g = torch.Generator().manual_seed(1000 + seed)
    for _ in tqdm(range(args.epochs), desc=f"LayerNorm and PRepBN ViTs (seed {seed})", leave=False):
        perm = torch.randperm(len(y_tr), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch:(i + 1) * args.batch]
            for k, m in models.items():
                m.train()
                loss = F.cross_entropy(m(x_tr[idx]), y_tr[idx])
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
                lrs[k].step()
            for sched in scheds.values():
                sched.step()
        lams.append(scheds["PRepBN"].lam)
        for k, m in models.items():
            curves[k].append(accuracy(m, x_te, y_te))

    run = {"seed": seed, "LayerNorm": accuracy(models["LayerNorm"], x_te, y_te)}
    for name in args.variants:
        run[name] = accuracy(models[name], x_te, y_te)            # λ = 0, statistics as training left them
        normfx.recalibrate_bn(models[name], (x_tr[i:i + 256] for i in range(0, len(y_tr), 256)), progress=False)
        run[f"{name}_recalibrated"] = accuracy(models[name], x_te, y_te)
    prep = models["PRepBN"]
    deployed = normfx.deploy(prep.eval())
    with torch.no_grad():
        run["deploy_rel_err"] = ((deployed(x_te) - prep(x_te)).norm() / prep(x_te).norm()).item()
    run["deployed"] = accuracy(deployed, x_te, y_te)
    run["normalization_left"] = sum(isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm))
                                    for m in deployed.modules())
    run["folded"] = sum(c.action == "fold" for c in normfx.last_report(deployed).get("fold_repbn").changes)
    return run, curves, lams, deployed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="RepBN runs next to LayerNorm (PRepBN is always run: it is the one deployed)")
    args = parse(ap, quick={"seeds": [0], "epochs": 2})
    args.variants = ["PRepBN"] + [v for v in args.variants if v != "PRepBN"]

    data = load_digits()
    runs, first = [], None
    for seed in args.seeds:
        run, curves, lams, deployed = run_seed(seed, args, data)
        runs.append(run)
        first = first or (curves, lams, deployed)
    curves, lams, deployed = first
    x_te = data[2]
    report = normfx.export(deployed, x_te[:4], args.out / "prepbn_vit.onnx")
    runs[0]["onnx"] = {"LayerNormalization": report.op_counts.get("LayerNormalization", 0),
                       "BatchNormalization": report.op_counts.get("BatchNormalization", 0),
                       "max_rel": report.outputs[0].max_rel}
    config = config_of(args)
    path = record("prepbn_vit", config, runs, args.results)
    print(f"test accuracy over seeds {args.seeds} ({path}):")
    keys = ["LayerNorm"] + [k for v in args.variants for k in (v, f"{v}_recalibrated")] + ["deployed"]
    for key in keys:
        print(f"  {key:<28} {mean_std([r[key] for r in runs])}")
    print(f"deployed: {runs[0]['normalization_left']} normalization modules left, {runs[0]['folded']} RepBNs folded, "
          f"relative error vs the PRepBN model {max(r['deploy_rel_err'] for r in runs):.1e} (worst seed)")

    print(f"ONNX: LayerNormalization {report.op_counts.get('LayerNormalization', 0)}, BatchNormalization "
          f"{report.op_counts.get('BatchNormalization', 0)}, max rel err {report.outputs[0].max_rel:.1e}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = range(1, args.epochs + 1)
    for k in ("LayerNorm", "PRepBN"):
        ax.plot(epochs, curves[k], label=f"{k} test accuracy")
    ax.plot(epochs, lams, "k--", label="λ (PRepBN)")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    ax.set_title(f"ViT on digits: LayerNorm vs progressive RepBN (seed {args.seeds[0]})")
    fig.tight_layout()
    fig.savefig(args.out / "prepbn_vit.png", dpi=120)
    print(f"plot: {args.out / 'prepbn_vit.png'}")


if __name__ == "__main__":
    main()
