"""Train a small ViT on scikit-learn's digits with LayerNorm and with PRepBN, then deploy and export.

    python examples/prepbn_vit.py [--epochs 40] [--out examples/out]

Both runs start from the same initial weights and see the same batches. The PRepBN run moves λ from
1 (LayerNorm) to 0 (RepBN) over the first 3/4 of training (SLAB's progressive schedule), then the
BatchNorm statistics are recalibrated, the model is deployed (every RepBN folded into a Linear, no
normalization left) and exported to ONNX, verified in ONNX Runtime. Accuracy and λ curves are
plotted to ``OUT/prepbn_vit.png``.
"""
from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import normfx
from _digits import accuracy, load_digits


def make_vit() -> nn.Module:
    import torchvision

    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
        num_classes=10, dropout=0.0, attention_dropout=0.0,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=Path("examples/out"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    x_tr, y_tr, x_te, y_te = load_digits()
    steps_per_epoch = -(-len(y_tr) // args.batch)
    total = args.epochs * steps_per_epoch
    ramp = int(0.75 * total)

    base = make_vit()
    models = {"LayerNorm": copy.deepcopy(base), "PRepBN": normfx.repbn(base, total_steps=ramp)}
    print(normfx.last_report(models["PRepBN"]).summary())
    sched = normfx.RepBNScheduler(models["PRepBN"])
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.05) for k, m in models.items()}
    lrs = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, total) for k, o in opts.items()}
    curves: dict[str, list[float]] = {k: [] for k in models}
    lams: list[float] = []

    g = torch.Generator().manual_seed(1)
    for _ in tqdm(range(args.epochs), desc="training LayerNorm and PRepBN ViTs"):
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
            sched.step()
        lams.append(sched.lam)
        for k, m in models.items():
            curves[k].append(accuracy(m, x_te, y_te))

    prep = models["PRepBN"]
    normfx.recalibrate_bn(prep, (x_tr[i:i + 256] for i in range(0, len(y_tr), 256)))
    final = {k: accuracy(m, x_te, y_te) for k, m in models.items()}
    final["PRepBN (recalibrated)"] = accuracy(prep, x_te, y_te)
    print("test accuracy:", ", ".join(f"{k} {v:.3f}" for k, v in final.items()))

    deployed = normfx.deploy(prep.eval())
    print(normfx.last_report(deployed).summary())
    left = sum(isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)) for m in deployed.modules())
    with torch.no_grad():
        err = ((deployed(x_te) - prep(x_te)).norm() / prep(x_te).norm()).item()
    print(f"deployed: {left} normalization modules left, relative error vs the PRepBN model {err:.1e}, "
          f"accuracy {accuracy(deployed, x_te, y_te):.3f}")
    report = normfx.export(deployed, x_te[:4], args.out / "prepbn_vit.onnx")
    print(f"ONNX: LayerNormalization {report.op_counts.get('LayerNormalization', 0)}, BatchNormalization "
          f"{report.op_counts.get('BatchNormalization', 0)}, max rel err {report.outputs[0].max_rel:.1e}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = range(1, args.epochs + 1)
    for k, c in curves.items():
        ax.plot(epochs, c, label=f"{k} test accuracy")
    ax.plot(epochs, lams, "k--", label="λ (PRepBN)")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    ax.set_title("ViT on digits: LayerNorm vs progressive RepBN")
    fig.tight_layout()
    fig.savefig(args.out / "prepbn_vit.png", dpi=120)
    print(f"plot: {args.out / 'prepbn_vit.png'}")


if __name__ == "__main__":
    main()
