"""Features a ReLU network never uses: the activation measure of disabled features.

Frankle et al. (§5) count a BatchNorm feature as disabled from its γ. The activation measure asks
the network instead: a ReLU unit (a channel of a ReLU's output) that is never positive on held-out
data passes nothing on, whatever its BatchNorm's γ. The two measures differ where β < 0 with a
large γ (a channel kept dead by its shift) or where a small γ still sits on a positive β.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ReluSite", "InactiveUnits", "inactive_units"]

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_RELU_METHODS = ("relu", "relu_")


@dataclass(frozen=True)
class ReluSite:
    """One ReLU call in the traced graph: its name, channels and how many never fired."""

    name: str
    channels: int
    inactive: int

    @property
    def fraction(self) -> float:
        return self.inactive / self.channels if self.channels else 0.0


@dataclass(frozen=True)
class InactiveUnits:
    """Per ReLU call, the channels whose output was never positive on the data given."""

    sites: tuple[ReluSite, ...]
    samples: int
    untraced: tuple[str, ...]

    @property
    def channels(self) -> int:
        return sum(s.channels for s in self.sites)

    @property
    def inactive(self) -> int:
        return sum(s.inactive for s in self.sites)

    @property
    def fraction(self) -> float:
        """Never-positive channels over all ReLU channels (each call weighted by its width)."""
        return self.inactive / self.channels if self.channels else 0.0

    def summary(self) -> str:
        return (f"{self.inactive:,} of {self.channels:,} ReLU units never positive ({100 * self.fraction:.1f}%) "
                f"over {len(self.sites)} ReLU calls and {self.samples:,} samples")

    def __str__(self) -> str:
        return self.summary()


class _Probe(nn.Module):
    """Records, per channel (dim 1), the largest value seen; returns its input unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.max: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.detach()
        cur = y.float().transpose(0, 1).reshape(y.shape[1], -1).amax(dim=1) if y.dim() >= 2 else y.float().amax()[None]
        self.max = cur if self.max is None else torch.maximum(self.max, cur)
        return x


def _is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.ReLU)
    return False


@torch.no_grad()
def inactive_units(model: nn.Module, batches: Iterable[torch.Tensor]) -> InactiveUnits:
    """Share of ReLU units (channels on dim 1 of each ReLU call's output) never positive on ``batches``.

    The model runs in eval mode (BatchNorm's running statistics) on a traced copy with a probe after
    every ReLU call (``F.relu``, ``torch.relu``, ``x.relu()``, ``nn.ReLU``); a module called twice is
    two sites. ReLUs inside modules that do not trace are not seen: ``untraced`` names those modules.

    Args:
        model: read only (a deep copy is traced).
        batches: held-out inputs, each a tensor the model takes as its single argument.

    Raises:
        ValueError: no batch was given, or the traced model has no ReLU call.

    Example:
        >>> m = torchvision.models.resnet18().eval()
        >>> u = normfx.lab.inactive_units(m, [torch.randn(4, 3, 64, 64)])
        >>> len(u.sites), u.channels
        (17, 3904)
    """
    from normfx.trace import trace, untraceable_modules

    twin = trace(copy.deepcopy(model))
    graphs = [g for g in twin.modules() if isinstance(g, fx.GraphModule)]
    probes: dict[str, _Probe] = {}
    for g in graphs:
        prefix = next((n for n, m in twin.named_modules() if m is g), "")
        for node in list(g.graph.nodes):
            if not _is_relu(node, g):
                continue
            site = f"{prefix}.{node.name}" if prefix else node.name
            probe = _Probe()
            attr = f"_normfx_probe_{len(probes)}"
            g.add_submodule(attr, probe)
            with g.graph.inserting_after(node):
                new = g.graph.call_module(attr, (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
            probes[site] = probe
        g.recompile()
    if not probes:
        raise ValueError(f"{type(model).__name__} has no traced ReLU call to measure")
    twin.eval()
    samples = 0
    for x in batches:
        twin(x)
        samples += x.shape[0]
    if not samples:
        raise ValueError("inactive_units needs at least one batch of held-out inputs")
    sites = []
    for site, probe in probes.items():
        mx = probe.max if probe.max is not None else torch.zeros(0)
        sites.append(ReluSite(site, mx.numel(), int((mx <= 0).sum())))
    return InactiveUnits(tuple(sites), samples, tuple(n for n, _ in untraceable_modules(twin)))
