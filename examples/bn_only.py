"""Training BatchNorm and only BatchNorm (Frankle, Schwab & Morcos, ICLR 2021) on Fashion-MNIST.

    python examples/bn_only.py [--data DIR] [--train 3000] [--test 2000] [--depths 14 20 32] [--epochs 15]
                               [--seeds 0 1 2] [--bn-init ones|uniform] [--quick] [--store]

About 17 minutes per depth-14 run of the six configurations on 2 cores (3 seeds; deeper networks
take longer, not measured here); ``--quick`` about a minute. Needs Fashion-MNIST (``apt-get install
dataset-fashion-mnist``, or ``--data DIR``). What was cut to fit: 3,000 training and 2,000 test
images (fixed subsets of 60,000 and 10,000) at 28×28, 15 epochs.

A CIFAR-style ResNet (He et al. 2016: 3 stages of 16/32/64 channels, depth 6n + 2; convs at
Kaiming-normal init) is trained six ways from the same initial weights and the same batches:

* ``all``: every parameter;
* ``bn_only``: ``normfx.freeze(model, keep=("norm",))``: only BatchNorm's γ and β (output layer frozen);
* ``bn_head``: ``keep=("norm", "head")``: BatchNorm and the output layer;
* ``random_channel``: ``keep=(), random="per_channel"``: the paper's control, two random entries in
  each output channel of every conv/linear (as many as the BatchNorms after them hold, plus the
  output layer's 2 × 10);
* ``random_uniform``: ``keep=(), random=N`` with N the per-channel control's count, drawn uniformly
  from every frozen tensor (a second control, not the paper's);
* ``head_only``: ``keep=("head",)``: a linear probe on random features.

``--bn-init uniform`` draws γ ~ U[0, 1) and sets β = 0 first (the paper's code base, open_lth's
``bn_initializers.uniform``); ``ones`` keeps torch's γ = 1, β = 0. Each depth in ``--depths`` is a
run of its own; each seed draws its own initial weights, batch order and random control. Per depth,
the per-seed results go to ``results/bn_only_resnet<D>_<E>ep_<init>.json`` (rendered into the docs
by ``examples/render.py``): test accuracy, the share of BN features with |γ| < 0.01 and the share of
ReLU units never positive on the test split (``normfx.lab.inactive_units``). The first seed's
|γ| plots go to ``OUT/bn_only_gamma_<config>.png``.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import normfx
from _data import add_data_argument, load_fashion_mnist
from _digits import accuracy
from _results import config_of, mean_std, parse, record

CONFIGS = {
    "all": None,
    "bn_only": dict(keep=("norm",)),
    "bn_head": dict(keep=("norm", "head")),
    "random_channel": dict(keep=(), random="per_channel"),
    "random_uniform": dict(keep=()),  # + random=<random_channel's trainable count>, set in run()
    "head_only": dict(keep=("head",)),
}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs, as in He et al. (2016) §4.2 and Frankle et al."""

    def __init__(self, depth: int = 14, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 (14, 20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def run(args: argparse.Namespace, depth: int, data: tuple, plots: bool = True) -> dict[str, dict]:
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = data
    base = CifarResNet(depth, in_channels=1)
    if args.bn_init == "uniform":  # open_lth's bn_initializers.uniform: γ ~ U[0, 1), β = 0
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.0, 1.0)
                nn.init.zeros_(m.bias)
    n_channel = normfx.trainable_summary(normfx.freeze(base, keep=(), random="per_channel")).trainable
    models = {}
    for name, kwargs in CONFIGS.items():
        if name in args.configs:
            if kwargs is None:
                models[name] = copy.deepcopy(base)
            else:
                extra = dict(random=n_channel) if name == "random_uniform" else {}
                models[name] = normfx.freeze(base, seed=args.seed, **kwargs, **extra)
    opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=args.lr, momentum=0.9,
                               weight_decay=args.wd) for k, m in models.items()}
    steps_per_epoch = -(-len(y_tr) // args.batch)
    total = args.epochs * steps_per_epoch
    scheds = {k: torch.optim.lr_scheduler.OneCycleLR(o, args.lr, total_steps=total) for k, o in opts.items()}
    g = torch.Generator().manual_seed(args.seed)
    desc = f"ResNet-{depth} seed {args.seed}, {len(models)} configs"
    with tqdm(total=total * len(models), desc=desc, unit="step") as bar:
        for _ in range(args.epochs):
            perm = torch.randperm(len(y_tr), generator=g)  # one order per epoch, shared by every config
            for i in range(steps_per_epoch):
                idx = perm[i * args.batch:(i + 1) * args.batch]
                for k, m in models.items():
                    m.train()
                    loss = F.cross_entropy(m(x_tr[idx]), y_tr[idx])
                    opts[k].zero_grad(set_to_none=True)
                    loss.backward()
                    opts[k].step()
                    scheds[k].step()
                    bar.update()
    results = {}
    for k, m in models.items():
        d = normfx.lab.disabled_features(m, plot=args.out / f"bn_only_gamma_{k}.png" if plots else None)
        u = normfx.lab.inactive_units(m, x_te.split(128))
        results[k] = dict(trainable=normfx.trainable_summary(m).trainable, accuracy=accuracy(m, x_te, y_te),
                          disabled=d.fraction, inactive=u.fraction)
    return results


def result_name(depth: int, epochs: int, bn_init: str) -> str:
    return f"bn_only_resnet{depth}_{epochs}ep_{bn_init}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(ap)
    ap.add_argument("--train", type=int, default=3000, help="training images (a fixed subset)")
    ap.add_argument("--test", type=int, default=2000, help="test images (a fixed subset)")
    ap.add_argument("--depths", type=int, nargs="+", default=[14], help="6n + 2: 14, 20, 32, 56, ...")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--bn-init", choices=("ones", "uniform"), default="ones")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parse(ap, quick={"seeds": [0], "epochs": 2, "train": 500, "test": 500})
    data = load_fashion_mnist(args.data, train=args.train, test=args.test)

    for depth in args.depths:
        runs = []
        for i, seed in enumerate(args.seeds):
            args.seed = seed
            runs.append({"seed": seed, **run(args, depth, data, plots=i == 0 and depth == args.depths[0])})
        config = {**config_of(args, "seed", "depths"), "dataset": "Fashion-MNIST"}
        path = record(result_name(depth, args.epochs, args.bn_init), {**config, "depth": depth}, runs, args.results)
        print(f"\nResNet-{depth} on Fashion-MNIST ({args.train} images, 28×28), {args.epochs} epochs, "
              f"BN init {args.bn_init}, seeds {args.seeds} ({path})")
        print(f"{'config':<15} {'trainable':>10} {'test acc':>15} {'|γ|<0.01':>9} {'ReLU dead':>10}")
        for k in args.configs:
            acc = mean_std([r[k]["accuracy"] for r in runs])
            disabled = statistics.fmean(r[k]["disabled"] for r in runs)
            inactive = statistics.fmean(r[k]["inactive"] for r in runs)
            print(f"{k:<15} {runs[0][k]['trainable']:>10,} {acc:>15} {100 * disabled:>8.1f}% {100 * inactive:>9.1f}%")
    print(f"|γ| plots in {args.out}/bn_only_gamma_*.png")


if __name__ == "__main__":
    main()
