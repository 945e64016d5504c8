"""BatchNorm against memorization on corrupted modular arithmetic (Doshi et al., ICLR 2024).

    python examples/grokking.py [--p 97] [--train-fraction 0.5] [--corruption 0.3] [--batch 64]
                                [--steps 4000] [--width 256] [--seeds 0 1 2] [--phase | --batch-sweep B ...]
                                [--out examples/out] [--results examples/results]

The paper's model, as its code builds it: Linear(2p → N, no bias) → x² → [BatchNorm1d(N)] →
Linear(N → p, no bias), weights N(0, σ²) with σ = 0.5/(2N)^{1/3}; MSE on one-hot targets;
AdamW(β = (0.9, 0.98)), lr = 1e-2·√(batch/256). Three runs on the same corrupted data and batches:
``none`` (no regularization), ``wd`` (weight decay 1.0), ``bn`` (BatchNorm, weight decay 0). Per run:
accuracy on the corrupted training examples (against their wrong labels), on the clean ones, on the
test split, over training; IPR of every hidden neuron; for the BN run |γ| against IPR; and a pruning
curve (lowest- vs highest-IPR neurons first). Results: ``results/grokking.json``; plots in ``OUT``.

``--phase`` runs instead a coarse phase diagram: train fraction × ξ, 5 × 5, for ``wd`` and ``bn``, every
seed (about 2.5 min per seed at the defaults), stored as ``results/grokking_phase.json`` with each seed's
run time. ``--batch-sweep B ...`` runs instead ``none`` against ``bn`` at each batch size.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import normfx
from _results import config_of, mean_std, parse, record

RUNS = {"none": dict(bn=False, wd=0.0), "wd": dict(bn=False, wd=1.0), "bn": dict(bn=True, wd=0.0)}


class MLP(nn.Module):
    def __init__(self, p: int, width: int, bn: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(2 * p, width, bias=False)
        self.bn = nn.BatchNorm1d(width) if bn else nn.Identity()
        self.readout = nn.Linear(width, p, bias=False)
        sigma = 0.5 / (2 * width) ** (1 / 3)
        with torch.no_grad():
            self.embed.weight.normal_(0, sigma)
            self.readout.weight.normal_(0, sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.bn(self.embed(x) ** 2))


@torch.no_grad()
def accuracies(m: nn.Module, d: normfx.lab.ModularData) -> dict[str, float]:
    m.eval()
    pred = m(d.x_train).argmax(1)
    out = {"corrupted": (pred[d.corrupted] == d.y_train[d.corrupted]).float().mean().item() if d.corrupted.any()
           else float("nan"),
           "clean": (pred[~d.corrupted] == d.y_train[~d.corrupted]).float().mean().item(),
           "test": (m(d.x_test).argmax(1) == d.y_test).float().mean().item()}
    m.train()
    return out


def train(d: normfx.lab.ModularData, args: argparse.Namespace, seed: int, bn: bool, wd: float,
          curve_every: int = 0) -> tuple[nn.Module, list]:
    torch.manual_seed(seed)
    m = MLP(d.p, args.width, bn)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2 * math.sqrt(args.batch / 256), betas=(0.9, 0.98),
                            weight_decay=wd)
    target = F.one_hot(d.y_train, d.p).float()
    g = torch.Generator().manual_seed(1000 + seed)
    curve = []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(d.y_train), (args.batch,), generator=g)
        loss = F.mse_loss(m(d.x_train[idx]), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if curve_every and (step % curve_every == 0 or step == args.steps):
            curve.append({"step": step, **accuracies(m, d)})
    return m, curve


def prune_curve(m: nn.Module, d: normfx.lab.ModularData, fractions: list[float]) -> dict:
    out: dict = {}
    for order in ("lowest", "highest"):
        out[order] = []
        for f in fractions:
            pruned, _ = normfx.lab.prune_by_ipr(m, "embed", f, order=order)
            out[order].append({"fraction": f, **accuracies(pruned, d)})
    return out


def batch_sweep(args: argparse.Namespace) -> None:
    """No regularization vs BatchNorm on the same corrupted data at each batch size."""
    t0 = time.perf_counter()
    runs = []
    for seed in tqdm(args.seeds, desc="seeds"):
        d = normfx.lab.modular_arithmetic(args.p, args.op, args.train_fraction, args.corruption, seed=seed)
        run: dict = {"seed": seed}
        for b in args.batch_sweep:
            sub = argparse.Namespace(**{**vars(args), "batch": b, "steps": 2000 * 256 // b})
            run[str(b)] = {name: accuracies(train(d, sub, seed, cfg["bn"], cfg["wd"])[0], d)
                           for name, cfg in RUNS.items() if name in ("none", "bn")}
        runs.append(run)
    config = config_of(args)
    path = record("grokking_batch", {**config, "seconds": time.perf_counter() - t0}, runs, args.results)
    print(f"\np = {args.p}, N = {args.width}, train fraction {args.train_fraction}, ξ = {args.corruption} ({path})")
    for b in args.batch_sweep:
        cells = [f"{name} corrupted {mean_std([r[str(b)][name]['corrupted'] for r in runs])}"
                 for name in ("none", "bn")]
        print(f"  batch {b:<4} " + "   ".join(cells))


PHASE_TRAIN_FRACTIONS = [0.3, 0.4, 0.5, 0.6, 0.7]
PHASE_CORRUPTIONS = [0.0, 0.1, 0.2, 0.3, 0.4]


def phase_diagram(args: argparse.Namespace) -> None:
    """Weight decay and BatchNorm over train fraction × ξ, each cell on its own data, every seed."""
    runs = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        run: dict = {"seed": seed, "wd": [], "bn": []}
        for tf in tqdm(PHASE_TRAIN_FRACTIONS, desc=f"phase, seed {seed}"):
            for name in ("wd", "bn"):
                row = []
                for xi in PHASE_CORRUPTIONS:
                    d = normfx.lab.modular_arithmetic(args.p, args.op, tf, xi, seed=seed)
                    row.append(accuracies(train(d, args, seed, RUNS[name]["bn"], RUNS[name]["wd"])[0], d))
                run[name].append(row)
        run["seconds"] = time.perf_counter() - t0
        runs.append(run)
    config = config_of(args)
    config.update(train_fractions=PHASE_TRAIN_FRACTIONS, corruptions=PHASE_CORRUPTIONS)
    path = record("grokking_phase", config, runs, args.results)
    print(f"\nphase diagram, seeds {args.seeds}: corrupted-label / test accuracy, mean over seeds ({path})")
    for name in ("wd", "bn"):
        print(f"  {name}")
        for i, tf in enumerate(PHASE_TRAIN_FRACTIONS):
            cells = [f"{sum(r[name][i][j]['corrupted'] for r in runs) / len(runs):.2f}/"
                     f"{sum(r[name][i][j]['test'] for r in runs) / len(runs):.2f}"
                     for j in range(len(PHASE_CORRUPTIONS))]
            print(f"    tf {tf}: " + "  ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p", type=int, default=97)
    ap.add_argument("--op", default="add", choices=["add", "sub", "mul"])
    ap.add_argument("--train-fraction", type=float, default=0.5)
    ap.add_argument("--corruption", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--phase", action="store_true",
                    help="instead of the three runs: a 5×5 phase diagram (train fraction × ξ) for weight decay and "
                         "BN, every seed, stored as results/grokking_phase.json")
    ap.add_argument("--batch-sweep", type=int, nargs="+", metavar="BATCH",
                    help="instead of the three runs: no regularization vs BN at each batch size (steps "
                         "2000·256/batch, lr scaled as in the paper), stored as results/grokking_batch.json")
    args = parse(ap, quick={"seeds": [0], "steps": 300})

    if args.batch_sweep:
        batch_sweep(args)
        return
    if args.phase:
        phase_diagram(args)
        return
    fractions = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    runs = []
    first_models: dict[str, nn.Module] = {}
    for seed in tqdm(args.seeds, desc="seeds"):
        d = normfx.lab.modular_arithmetic(args.p, args.op, args.train_fraction, args.corruption, seed=seed)
        run: dict = {"seed": seed}
        for name, cfg in RUNS.items():
            m, curve = train(d, args, seed, cfg["bn"], cfg["wd"], curve_every=max(1, args.steps // 20))
            iprs = normfx.lab.neuron_ipr(m, "embed")["mean"]
            run[name] = {"final": curve[-1], "curve": curve, "ipr": iprs.tolist(),
                         "prune": prune_curve(m, d, fractions)}
            if name == "bn":
                run[name]["abs_gamma"] = normfx.lab.neuron_stats(m, "embed", "bn").abs_gamma.tolist()
            if seed == args.seeds[0]:
                first_models[name] = m
        runs.append(run)
    config = config_of(args)
    path = record("grokking", {**config, "prune_fractions": fractions}, runs, args.results)

    print(f"\np = {args.p}, train fraction {args.train_fraction}, ξ = {args.corruption}, batch {args.batch}, "
          f"{args.steps} steps, seeds {args.seeds} ({path})")
    for name in RUNS:
        cells = [f"{k} {mean_std([r[name]['final'][k] for r in runs])}" for k in ("corrupted", "clean", "test")]
        print(f"  {name:<5} " + "   ".join(cells))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r0 = runs[0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), sharey=True)
    for ax, name in zip(axes, RUNS):
        steps = [c["step"] for c in r0[name]["curve"]]
        for k, color in (("corrupted", "tab:red"), ("clean", "tab:blue"), ("test", "tab:green")):
            ax.plot(steps, [c[k] for c in r0[name]["curve"]], color=color, label=k)
        ax.set_title(name)
        ax.set_xlabel("step")
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.out / "grokking_curves.png", dpi=120)
    plt.close(fig)
    normfx.lab.plot_ipr({k: torch.tensor(r0[k]["ipr"]) for k in RUNS}, args.out / "grokking_ipr.png",
                        gamma=normfx.lab.neuron_stats(first_models["bn"], "embed", "bn"),
                        title=f"seed {args.seeds[0]}: IPR per neuron; |γ| against IPR (BN run)")
    print(f"plots: {args.out}/grokking_curves.png, {args.out}/grokking_ipr.png")


if __name__ == "__main__":
    main()
