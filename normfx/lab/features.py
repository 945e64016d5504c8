"""How many features BatchNorm disables (Frankle, Schwab & Morcos, ICLR 2021, §5).

A BatchNorm channel whose |γ| is near zero outputs (almost) the constant β whatever its input: the
feature it normalizes is switched off. The paper counts a feature as disabled when |γ| is below
0.01 — :data:`DEFAULT_THRESHOLD` — and finds BN-only training disables about a quarter to a third
of the features, far more than training every parameter does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["DEFAULT_THRESHOLD", "LayerGammas", "DisabledFeatures", "disabled_features"]

DEFAULT_THRESHOLD = 0.01
"""|γ| below this counts as a disabled feature (the paper's cut-off)."""


@dataclass(frozen=True)
class LayerGammas:
    """One BatchNorm layer: its qualified name, depth (0 = first BN in the model) and |γ| values."""

    name: str
    depth: int
    abs_gamma: torch.Tensor
    disabled: int

    @property
    def channels(self) -> int:
        return self.abs_gamma.numel()

    @property
    def fraction(self) -> float:
        return self.disabled / self.channels if self.channels else 0.0


@dataclass(frozen=True)
class DisabledFeatures:
    """Per-layer and overall fraction of BatchNorm channels with |γ| < ``threshold``."""

    threshold: float
    layers: tuple[LayerGammas, ...]

    @property
    def channels(self) -> int:
        return sum(layer.channels for layer in self.layers)

    @property
    def disabled(self) -> int:
        return sum(layer.disabled for layer in self.layers)

    @property
    def fraction(self) -> float:
        """Disabled channels over all channels (every BN layer weighted by its width)."""
        return self.disabled / self.channels if self.channels else 0.0

    def as_rows(self) -> list[dict]:
        """One plain dict per layer: name, depth, channels, disabled, fraction."""
        return [dict(name=layer.name, depth=layer.depth, channels=layer.channels, disabled=layer.disabled,
                     fraction=layer.fraction) for layer in self.layers]

    def plot(self, path: str | os.PathLike, *, title: str | None = None) -> None:
        """Save a figure: a histogram of |γ| per depth (log scale, threshold marked) and the
        disabled fraction per depth."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("plotting needs matplotlib: pip install 'normfx[lab]'") from e
        import numpy as np

        depths = len(self.layers)
        lo = max(min([float(g.abs_gamma.min()) for g in self.layers if g.channels] + [self.threshold / 2]), 1e-6)
        hi = max((float(g.abs_gamma.max()) for g in self.layers if g.channels), default=1.0)
        bins = np.logspace(np.log10(lo), np.log10(max(hi, lo * 10)), 40)
        grid = np.stack([np.histogram(g.abs_gamma.clamp_min(lo).numpy(), bins=bins)[0] / max(g.channels, 1)
                         for g in self.layers], axis=1) if depths else np.zeros((39, 1))
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                       gridspec_kw=dict(height_ratios=[3, 1]))
        ax1.pcolormesh(np.arange(depths + 1) - 0.5, bins, grid, cmap="viridis", shading="flat")
        ax1.set_yscale("log")
        ax1.axhline(self.threshold, color="w", ls="--", lw=1)
        ax1.set_ylabel("|γ| (colour: share of the layer's channels)")
        ax1.set_title(title or f"|γ| per BatchNorm depth; {100 * self.fraction:.1f}% below {self.threshold:g}")
        ax2.bar(range(depths), [g.fraction for g in self.layers], color="tab:red")
        ax2.set_ylabel(f"|γ| < {self.threshold:g}")
        ax2.set_xlabel("BatchNorm depth")
        ax2.set_ylim(0, 1)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def summary(self) -> str:
        return (f"{self.disabled:,} of {self.channels:,} BatchNorm features disabled "
                f"({100 * self.fraction:.1f}%, |γ| < {self.threshold:g}) over {len(self.layers)} layers")

    def __str__(self) -> str:
        return self.summary()


def disabled_features(model: nn.Module, *, threshold: float = DEFAULT_THRESHOLD,
                      plot: str | os.PathLike | None = None) -> DisabledFeatures:
    """Fraction of channels per BatchNorm layer whose |γ| is below ``threshold``.

    Every BatchNorm with an affine γ counts (BatchNorm1d/2d/3d, SyncBatchNorm, subclasses such as
    timm's ``BatchNormAct2d``, the BN inside a Tune-mode block or a RepBN), in module order.

    Args:
        model: any model; read only.
        threshold: |γ| below it is a disabled feature; the paper's 0.01 by default.
        plot: also save :meth:`DisabledFeatures.plot` to this file.

    Raises:
        ValueError: ``model`` has no BatchNorm with an affine γ.

    Example:
        >>> d = normfx.lab.disabled_features(torchvision.models.resnet18())
        >>> d.fraction
        0.0
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    layers: list = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.weight is not None:
            g = m.weight.detach().abs().float().cpu()
            layers.append(LayerGammas(name, len(layers), g, int((g < threshold).sum())))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with an affine γ to measure")
    out = DisabledFeatures(float(threshold), tuple(layers))
    if plot is not None:
        out.plot(plot)
    return out
