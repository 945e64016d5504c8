"""QFX on scikit-learn's digits: float vs post-training quantization vs trained binary points.

    python examples/fixed_point.py [--bits 4 6 8] [--epochs 20] [--qat-epochs 6] [--out examples/out]

A small CIFAR-style ResNet (the one from ``examples/bn_only.py``) is trained in float. Then, for each
word length W, ``normfx.fixed_point(model, bits=W, k_hot=2)`` casts weights, biases, activations,
BatchNorm (a fixed-point multiply-add with 2-hot scales) and residual adds to ``ap_fixed<W, I>``:

* ``PTQ``: binary points from ``normfx.calibrate`` on training batches, nothing trained;
* ``QFX``: the same start, then the weights and every binary point are trained (straight-through).

It prints a table of test accuracies, exports the QFX model at the widest W to ONNX and checks it
bit for bit in ONNX Runtime (with its ``ap_fixed`` sidecar JSON for HLS).
"""
from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import normfx
from _digits import accuracy, load_digits
from bn_only import CifarResNet


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int,
          desc: str, seed: int = 0) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = -(-len(y) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    with tqdm(total=epochs * steps, desc=desc, unit="step", leave=False) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(steps):
                idx = perm[i * batch:(i + 1) * batch]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8])
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--qat-epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k-hot", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("examples/out"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    x_tr, y_tr, x_te, y_te = load_digits(size=args.size)
    model = CifarResNet(args.depth)
    train(model, x_tr, y_tr, args.epochs, 3e-3, args.batch, "float")
    model.eval()
    results = {"float": {b: accuracy(model, x_te, y_te) for b in args.bits}}
    calib = [x_tr[i:i + 256] for i in range(0, len(x_tr), 256)]
    results["PTQ"], results["QFX"] = {}, {}
    qfx = {}
    for b in args.bits:
        q = normfx.fixed_point(model, bits=b, k_hot=args.k_hot).eval()
        normfx.calibrate(q, calib)
        results["PTQ"][b] = accuracy(q, x_te, y_te)
        t = copy.deepcopy(q)
        train(t, x_tr, y_tr, args.qat_epochs, 1e-3, args.batch, f"QFX {b}-bit")
        t.eval()
        results["QFX"][b] = accuracy(t, x_te, y_te)
        qfx[b] = t

    print(f"\nResNet-{args.depth} on digits ({args.size}x{args.size}), test accuracy; casts on weights, biases, "
          f"activations, BatchNorm ({args.k_hot}-hot scales) and residual adds")
    print(f"{'':<6}" + "".join(f"{f'W={b}':>9}" for b in args.bits))
    for k, row in results.items():
        print(f"{k:<6}" + "".join(f"{row[b]:>9.3f}" for b in args.bits))

    b = max(args.bits)
    report = normfx.export(qfx[b], x_te[:8], args.out / f"fixed_point_{b}bit.onnx", rtol=0.0, atol=0.0)
    print(f"\nexported the {b}-bit QFX model: max abs difference ONNX Runtime vs PyTorch "
          f"{report.outputs[0].max_abs}; QuantizeLinear {report.op_counts.get('QuantizeLinear', 0)}; "
          f"HLS types in {report.fixed_point_json}")


if __name__ == "__main__":
    main()
