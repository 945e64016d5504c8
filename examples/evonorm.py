"""EvoNorm-B0 and -S0 against BatchNorm + ReLU on Fashion-MNIST, at batch 128 and batch 4.

    python examples/evonorm.py [--data DIR] [--train 3000] [--test 2000] [--batches 128 4] [--epochs 8]
                               [--seeds 0 1 2] [--quick] [--store]

About 11 minutes on 2 cores with the defaults; ``--quick`` about a minute. Needs Fashion-MNIST
(``apt-get install dataset-fashion-mnist``, or ``--data DIR``). What was cut to fit: 3,000 training
and 2,000 test images (fixed subsets of 60,000 and 10,000) at 16×16, a ResNet-8, 8 epochs.

A CIFAR-style ResNet-8 (the one from ``examples/bn_only.py``, 16×16 inputs) is built once per seed and
trained three ways from the same initial weights on the same batches: as built (BatchNorm + ReLU),
``normfx.evonorm(model, variant="B0")`` and ``normfx.evonorm(model, variant="S0", groups=8)``. The
paper's point is the small-batch regime, where BatchNorm's batch statistics are noisy: batch 4 is
that regime. SGD with momentum 0.9, one-cycle learning rate peaking at 0.1·batch/128 (linear
scaling), weight decay 5·10⁻⁴, the same number of epochs at each batch size. Per seed: test accuracy
and the median training-step time of each model (same process, steps interleaved). Results go to
``evonorm.json`` in ``examples/out/results/`` (``--store``: ``examples/results/``, rendered into
docs/evonorm.md by ``examples/render.py``).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import normfx
from _data import add_data_argument, load_fashion_mnist
from _digits import accuracy
from _results import config_of, mean_std, parse, record
from bn_only import CifarResNet

MODELS = ("BN-ReLU", "EvoNorm-B0", "EvoNorm-S0")


def build(seed: int, depth: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    base = CifarResNet(depth, in_channels=1)
    return {"BN-ReLU": copy.deepcopy(base), "EvoNorm-B0": normfx.evonorm(base, variant="B0"),
            "EvoNorm-S0": normfx.evonorm(base, variant="S0", groups=8)}


def run(seed: int, batch: int, args: argparse.Namespace, data: tuple) -> dict:
    x_tr, y_tr, x_te, y_te = data
    models = build(seed, args.depth)
    lr = 0.1 * batch / 128
    steps = -(-len(y_tr) // batch)
    opts = {k: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4) for k, m in models.items()}
    scheds = {k: torch.optim.lr_scheduler.OneCycleLR(o, lr, total_steps=args.epochs * steps) for k, o in opts.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    g = torch.Generator().manual_seed(seed)
    with tqdm(total=args.epochs * steps, desc=f"batch {batch}, seed {seed}", unit="step", leave=False) as bar:
        for _ in range(args.epochs):
            perm = torch.randperm(len(y_tr), generator=g)
            for i in range(steps):
                idx = perm[i * batch:(i + 1) * batch]
                if len(idx) < 2:   # a batch of one has no batch statistics
                    continue
                for k, m in models.items():
                    m.train()
                    t0 = time.perf_counter()
                    loss = F.cross_entropy(m(x_tr[idx]), y_tr[idx])
                    opts[k].zero_grad(set_to_none=True)
                    loss.backward()
                    opts[k].step()
                    times[k].append(time.perf_counter() - t0)
                    scheds[k].step()
                bar.update()
    out: dict = {}
    for k, m in models.items():
        out[k] = {"accuracy": accuracy(m, x_te, y_te), "step_ms": 1e3 * statistics.median(times[k])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(ap)
    ap.add_argument("--train", type=int, default=3000, help="training images (a fixed subset)")
    ap.add_argument("--test", type=int, default=2000, help="test images (a fixed subset)")
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 4])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--size", type=int, default=16)
    args = parse(ap, out=False, quick={"seeds": [0], "epochs": 2, "train": 500, "test": 500})
    data = load_fashion_mnist(args.data, train=args.train, test=args.test, size=args.size)
    runs = []
    for seed in args.seeds:
        runs.append({"seed": seed, **{str(b): run(seed, b, args, data) for b in args.batches}})
    config = {**config_of(args), "dataset": "Fashion-MNIST"}
    path = record("evonorm", config, runs, args.results)
    print(f"\nResNet-{args.depth} on Fashion-MNIST ({args.train} images at {args.size}×{args.size}), "
          f"{args.epochs} epochs, "
          f"seeds {args.seeds} ({path})")
    for b in args.batches:
        print(f"batch {b}:")
        base = statistics.fmean(r[str(b)]["BN-ReLU"]["step_ms"] for r in runs)
        for k in MODELS:
            acc = mean_std([r[str(b)][k]["accuracy"] for r in runs])
            ms = statistics.fmean(r[str(b)][k]["step_ms"] for r in runs)
            print(f"  {k:<11} test accuracy {acc}   step {ms:6.1f} ms ({ms / base:.2f}× BN-ReLU)")


if __name__ == "__main__":
    main()
