"""BatchNorm against memorization: corrupted modular arithmetic (Doshi et al., "To grok or not to grok:
disentangling generalization and memorization on corrupted algorithmic datasets", ICLR 2024).

A network learns ``(a ∘ b) mod p`` from one-hot pairs while a fraction of its training labels are
wrong. Generalizing neurons are periodic in their inputs (a few Fourier frequencies), memorizing
ones are not: the inverse participation ratio (IPR) of a neuron's Fourier spectrum tells them apart.
These tools build the data, measure IPR per neuron, prune by it and set it against BatchNorm's |γ|.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

__all__ = ["ModularData", "modular_arithmetic", "ipr", "neuron_ipr", "prune_by_ipr", "NeuronStats",
           "neuron_stats", "plot_ipr"]

Op = Literal["add", "sub", "mul"]


@dataclass(frozen=True)
class ModularData:
    """Every pair ``(a, b)`` of ``Z_p`` one-hot encoded as ``[onehot(a), onehot(b)]`` (2p inputs).

    ``y_train`` holds the labels the network is trained on (corrupted where ``corrupted`` is True),
    ``clean_train`` the true ones; the test split is clean and disjoint from training."""

    p: int
    op: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    clean_train: torch.Tensor
    corrupted: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_pairs: torch.Tensor
    test_pairs: torch.Tensor


def _labels(a: torch.Tensor, b: torch.Tensor, p: int, op: str) -> torch.Tensor:
    if op == "add":
        return (a + b) % p
    if op == "sub":
        return (a - b) % p
    if op == "mul":
        return (a * b) % p
    raise ValueError(f"op must be 'add', 'sub' or 'mul', got {op!r}")


def modular_arithmetic(p: int = 97, op: Op = "add", train_fraction: float = 0.5, corruption: float = 0.0,
                       seed: int = 0) -> ModularData:
    """The corrupted modular-arithmetic dataset.

    Args:
        p: the modulus (a prime in the paper: 97).
        op: ``"add"``, ``"sub"`` or ``"mul"``.
        train_fraction: share of the p² pairs in the training split (rounded to a count).
        corruption: share ξ of the training labels replaced by a wrong class drawn uniformly from
            the p − 1 wrong ones (exactly ``round(ξ·n_train)`` of them).
        seed: the split, the corrupted examples and their labels.

    Raises:
        ValueError: ``p < 2``, an unknown op, or fractions outside their range.

    Example:
        >>> d = normfx.lab.modular_arithmetic(p=7, train_fraction=0.5, corruption=0.2)
        >>> d.x_train.shape, int(d.corrupted.sum()), bool((d.y_train[d.corrupted] != d.clean_train[d.corrupted]).all())
        (torch.Size([24, 14]), 5, True)
    """
    if p < 2:
        raise ValueError(f"p must be at least 2, got {p}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if not 0.0 <= corruption <= 1.0:
        raise ValueError(f"corruption must be in [0, 1], got {corruption}")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
    y = _labels(pairs[:, 0], pairs[:, 1], p, op)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(p * p, generator=g)
    n_train = min(max(1, round(train_fraction * p * p)), p * p - 1)
    tr, te = perm[:n_train], perm[n_train:]

    def onehot(idx: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(len(idx), 2 * p)
        x[torch.arange(len(idx)), pairs[idx, 0]] = 1.0
        x[torch.arange(len(idx)), p + pairs[idx, 1]] = 1.0
        return x

    clean = y[tr]
    corrupted = torch.zeros(n_train, dtype=torch.bool)
    corrupted[torch.randperm(n_train, generator=g)[:round(corruption * n_train)]] = True
    noisy = clean.clone()
    shift = torch.randint(1, p, (int(corrupted.sum()),), generator=g)   # 1..p-1: never the true class
    noisy[corrupted] = (clean[corrupted] + shift) % p
    return ModularData(p, op, onehot(tr), noisy, clean, corrupted, onehot(te), y[te], pairs[tr], pairs[te])


def ipr(weights: torch.Tensor, r: int = 2) -> torch.Tensor:
    """Inverse participation ratio of each row's Fourier spectrum: ``Σ_k (A_k/‖A‖₂)^{2r}`` over the
    amplitudes ``A = |rfft(row)|``. 1 for a pure sinusoid (one frequency); about ``2/len(A)`` for
    white noise at r = 2 (every frequency takes part). A zero row gives 0.

    Example:
        >>> n = torch.arange(97.0)
        >>> round(float(normfx.lab.ipr(torch.cos(2 * torch.pi * 5 * n / 97)[None])[0]), 4)
        1.0
    """
    if r < 1:
        raise ValueError(f"r must be a positive integer, got {r}")
    w = weights.detach().double()
    amp = torch.fft.rfft(w, dim=-1).abs()
    norm = amp.norm(dim=-1, keepdim=True)
    share = torch.where(norm > 0, amp / norm.clamp_min(1e-300), torch.zeros_like(amp))
    return (share ** (2 * r)).sum(-1).float()


def _hidden_and_readout(model: nn.Module, layer: str, readout: str | None) -> tuple[nn.Linear, nn.Linear, str]:
    mods = dict(model.named_modules())
    if layer not in mods or not isinstance(mods[layer], nn.Linear):
        raise ValueError(f"{layer!r} is not an nn.Linear of {type(model).__name__}; pass the hidden layer's name")
    hidden = mods[layer]
    if readout is None:
        names = list(mods)
        after = names[names.index(layer) + 1:]
        readout = next((n for n in after if isinstance(mods[n], nn.Linear)
                        and mods[n].in_features == hidden.out_features), None)
        if readout is None:
            raise ValueError(f"no nn.Linear after {layer!r} reads its {hidden.out_features} neurons; pass readout=")
    if not isinstance(mods.get(readout), nn.Linear) or mods[readout].in_features != hidden.out_features:
        raise ValueError(f"{readout!r} is not an nn.Linear reading the {hidden.out_features} neurons of {layer!r}")
    return hidden, mods[readout], readout


def neuron_ipr(model: nn.Module, layer: str, *, readout: str | None = None, r: int = 2) -> dict[str, torch.Tensor]:
    """Per hidden neuron of ``layer`` (an ``nn.Linear(2p → N)`` on the one-hot pairs): the IPR of its
    input-a weights, its input-b weights and its output weights (column of ``readout``, the Linear
    that reads the N neurons; found after ``layer`` when not given), and ``"mean"`` of the three."""
    hidden, out, _ = _hidden_and_readout(model, layer, readout)
    if hidden.in_features % 2:
        raise ValueError(f"{layer!r} takes {hidden.in_features} inputs; expected the 2p of one-hot pairs")
    p = hidden.in_features // 2
    w = hidden.weight
    res = {"a": ipr(w[:, :p], r), "b": ipr(w[:, p:], r), "out": ipr(out.weight.T, r)}
    res["mean"] = (res["a"] + res["b"] + res["out"]) / 3
    return res


@torch.no_grad()
def prune_by_ipr(model: nn.Module, layer: str, fraction: float, order: Literal["lowest", "highest"] = "lowest", *,
                 readout: str | None = None, r: int = 2) -> tuple[nn.Module, torch.Tensor]:
    """A copy of ``model`` with the ``round(fraction·N)`` hidden neurons of lowest (or highest) mean
    IPR removed: their incoming weights (and bias) in ``layer`` and their outgoing weights in
    ``readout`` are zeroed, so whatever sits between (x², BatchNorm) they contribute nothing.

    Returns:
        ``(pruned copy, indices of the pruned neurons)``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if order not in ("lowest", "highest"):
        raise ValueError(f"order must be 'lowest' or 'highest', got {order!r}")
    scores = neuron_ipr(model, layer, readout=readout, r=r)["mean"]
    k = round(fraction * scores.numel())
    idx = scores.argsort(descending=order == "highest")[:k].sort().values
    out = copy.deepcopy(model)
    hidden, read, _ = _hidden_and_readout(out, layer, readout)
    hidden.weight[idx] = 0.0
    if hidden.bias is not None:
        hidden.bias[idx] = 0.0
    read.weight[:, idx] = 0.0
    return out, idx


@dataclass(frozen=True)
class NeuronStats:
    """Per hidden neuron: its mean IPR and the |γ| of the BatchNorm that scales it."""

    ipr: torch.Tensor
    abs_gamma: torch.Tensor


def neuron_stats(model: nn.Module, layer: str, bn: str, *, readout: str | None = None, r: int = 2) -> NeuronStats:
    """IPR and BatchNorm |γ| per hidden neuron: the paper's de-amplification evidence (memorizing,
    low-IPR neurons get small |γ| in the BN runs)."""
    mods = dict(model.named_modules())
    norm = mods.get(bn)
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.weight is None:
        raise ValueError(f"{bn!r} is not a BatchNorm with an affine γ in {type(model).__name__}")
    scores = neuron_ipr(model, layer, readout=readout, r=r)["mean"]
    if norm.weight.numel() != scores.numel():
        raise ValueError(f"{bn!r} has {norm.weight.numel()} channels, {layer!r} {scores.numel()} neurons")
    return NeuronStats(scores, norm.weight.detach().abs().float().cpu())


def plot_ipr(runs: dict[str, torch.Tensor], path: str | os.PathLike, *, gamma: NeuronStats | None = None,
             title: str = "") -> None:
    """Save IPR histograms (one per run, e.g. ``{"no reg.": ..., "BN": ...}``) and, given ``gamma``,
    |γ| against IPR (needs matplotlib: ``pip install "normfx[lab]"``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'normfx[lab]'") from e
    cols = 2 if gamma is not None else 1
    fig, axes = plt.subplots(1, cols, figsize=(5 * cols, 3.5), squeeze=False)
    ax = axes[0][0]
    for name, values in runs.items():
        ax.hist(values.numpy(), bins=40, range=(0, 1), alpha=0.5, label=name)
    ax.set_xlabel("IPR (mean of input-a, input-b, output)")
    ax.set_ylabel("neurons")
    ax.legend()
    if gamma is not None:
        ax2 = axes[0][1]
        ax2.scatter(gamma.ipr.numpy(), gamma.abs_gamma.numpy(), s=6)
        ax2.set_xlabel("IPR")
        ax2.set_ylabel("|γ|")
        ax2.set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
