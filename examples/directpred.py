"""SimSiam on scikit-learn's digits with four predictors: two-layer with BatchNorm, trained linear,
DirectPred and DirectCopy (``normfx.directpred``).

    python examples/directpred.py [--epochs 15] [--seeds 0 1 2] [--out examples/out] [--results examples/results]

SimSiam (Chen & He 2021): two augmented views (random shifts of up to 2 pixels, contrast jitter,
Gaussian noise) of each 16×16 digit, a small conv encoder and a projector with BatchNorm, the
symmetric negative cosine loss with a stop-gradient on the target branch. The four runs of a seed
share the encoder's initial weights and every batch and augmentation; only the predictor differs:

* ``two_layer_bn``: Linear(64→32)-BN-ReLU-Linear(32→64), trained (SimSiam's own);
* ``linear``: Linear(64→64), trained;
* ``directpred``: ``normfx.directpred(model)``: W from the features' correlation, ρ = 0.3, ε = 0.01, p^½;
* ``directcopy``: ``normfx.directpred(model, mode="directcopy")``: W = F/‖F‖ + εI.

Evaluation on the frozen encoder: kNN (k = 5, cosine) and a linear probe (logistic regression on
the training split), test accuracy; ``init`` is the same evaluation of the encoder before training
(what a random conv encoder gives on digits, the floor the four runs are read against). The
eigenvalues of DirectPred's F (normalized by the largest)
are recorded over training and plotted for the first seed (``OUT/directpred_spectrum.png``). Results:
``results/directpred.json`` (rendered into docs/directpred.md by ``examples/render.py``).
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import normfx
from _digits import load_digits
from _results import config_of, mean_std, parse, record
from normfx.nn.directpred import step_all

PREDICTORS = ("two_layer_bn", "linear", "directpred", "directcopy")
DIM = 64


class SimSiam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.projector = nn.Sequential(nn.Linear(64, DIM), nn.BatchNorm1d(DIM), nn.ReLU(), nn.Linear(DIM, DIM),
                                       nn.BatchNorm1d(DIM))
        self.predictor: nn.Module = nn.Sequential(nn.Linear(DIM, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, DIM))

    def loss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        za, zb = self.projector(self.encoder(a)), self.projector(self.encoder(b))
        pa, pb = self.predictor(za), self.predictor(zb)
        return -0.5 * (F.cosine_similarity(pa, zb.detach()).mean() + F.cosine_similarity(pb, za.detach()).mean())


def build(seed: int) -> dict[str, SimSiam]:
    torch.manual_seed(seed)
    base = SimSiam()
    models = {"two_layer_bn": copy.deepcopy(base)}
    lin = copy.deepcopy(base)
    lin.predictor = nn.Linear(DIM, DIM)
    models["linear"] = lin
    models["directpred"] = normfx.directpred(base)
    models["directcopy"] = normfx.directpred(base, mode="directcopy")
    return models


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    out = torch.stack([torch.roll(img, (int(s[0]), int(s[1])), dims=(1, 2)) for img, s in zip(x, shifts)])
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
    return out * contrast + 0.3 * torch.randn(out.shape, generator=g)


@torch.no_grad()
def features(model: SimSiam, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return F.normalize(model.encoder(x), dim=1)


@torch.no_grad()
def knn(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor, k: int = 5) -> float:
    sim = test_f @ train_f.T
    idx = sim.topk(k, dim=1).indices
    votes = F.one_hot(train_y[idx], 10).sum(1)
    return (votes.argmax(1) == test_y).float().mean().item()


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor) -> float:
    torch.manual_seed(0)
    clf = nn.Linear(train_f.shape[1], 10)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(clf(train_f), train_y).backward()
        opt.step()
    with torch.no_grad():
        return (clf(test_f).argmax(1) == test_y).float().mean().item()


def run(seed: int, args: argparse.Namespace, data: tuple) -> dict:
    x_tr, y_tr, x_te, y_te = data
    models = build(seed)
    init = copy.deepcopy(models["two_layer_bn"])       # the shared encoder before any training: the floor
    opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=args.lr, momentum=0.9,
                               weight_decay=5e-4) for k, m in models.items()}
    steps = len(y_tr) // args.batch
    scheds = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, args.epochs * steps) for k, o in opts.items()}
    g = torch.Generator().manual_seed(seed)
    spectrum: list[list[float]] = []
    with tqdm(total=args.epochs * steps, desc=f"SimSiam seed {seed}", unit="step", leave=False) as bar:
        for _ in range(args.epochs):
            perm = torch.randperm(len(y_tr), generator=g)
            for i in range(steps):
                x = x_tr[perm[i * args.batch:(i + 1) * args.batch]]
                a, b = augment(x, g), augment(x, g)
                for k, m in models.items():
                    m.train()
                    loss = m.loss(a, b)
                    opts[k].zero_grad(set_to_none=True)
                    loss.backward()
                    opts[k].step()
                    scheds[k].step()
                    step_all(m)   # DirectPred/DirectCopy: fold this step's E[ffᵀ] into F, set W
                bar.update()
            corr = models["directpred"].predictor.corr
            eig = torch.linalg.eigvalsh(0.5 * (corr + corr.T)).flip(0)
            spectrum.append((eig / eig[0]).tolist())
    out: dict = {"spectrum": spectrum}
    for k, m in {"init": init, **models}.items():
        ftr, fte = features(m, x_tr), features(m, x_te)
        out[k] = {"knn": knn(ftr, y_tr, fte, y_te), "linear_probe": linear_probe(ftr, y_tr, fte, y_te)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    args = parse(ap, quick={"seeds": [0], "epochs": 1})
    x_tr, y_tr, x_te, y_te = load_digits(size=16)
    data = (x_tr[:, :1], y_tr, x_te[:, :1], y_te)     # one channel
    runs = [{"seed": s, **run(s, args, data)} for s in args.seeds]
    config = config_of(args)
    path = record("directpred", config, runs, args.results)
    print(f"\nSimSiam on digits, {args.epochs} epochs, seeds {args.seeds} ({path})")
    for k in PREDICTORS:
        print(f"  {k:<13} kNN {mean_std([r[k]['knn'] for r in runs])}   "
              f"linear probe {mean_std([r[k]['linear_probe'] for r in runs])}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = torch.tensor(runs[0]["spectrum"]).clamp_min(1e-6)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for j in range(spec.shape[1]):
        ax.plot(range(1, len(spec) + 1), spec[:, j], color=plt.cm.viridis(j / spec.shape[1]), lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("eigenvalue of F / largest")
    ax.set_title(f"DirectPred's F over training (seed {args.seeds[0]})")
    fig.tight_layout()
    fig.savefig(args.out / "directpred_spectrum.png", dpi=120)
    print(f"plot: {args.out / 'directpred_spectrum.png'}")


if __name__ == "__main__":
    main()
