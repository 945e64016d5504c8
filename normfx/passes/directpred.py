"""DirectPred: put the predictor in (``swap_predictor``) and take it out at deploy (``bake_directpred``).

The swap is a leaf change on a named submodule (no graph needed); deploy bakes each DirectPred's
current ``W`` into a bias-free ``nn.Linear`` in its slot, which exports like any Linear.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from normfx.analysis import Outside
from normfx.match import set_module
from normfx.nn.directpred import DirectPred
from normfx.report import Change, PassResult

__all__ = ["bake_directpred", "bake_directpred_outside", "as_linear"]


def as_linear(p: DirectPred) -> nn.Linear:
    """A bias-free Linear computing what ``p`` computes now (``W`` copied, frozen like ``W`` was)."""
    lin = nn.Linear(p.dim, p.dim, bias=False, device=p.weight.device, dtype=p.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(p.weight)
    lin.weight.requires_grad_(False)
    return lin.train(p.training)


def _bake(root: nn.Module, named: list[tuple[str, nn.Module]]) -> list[Change]:
    changes = []
    for name, m in named:
        if isinstance(m, DirectPred) and name:
            set_module(root, name, as_linear(m))
            changes.append(Change(name, "bake", f"DirectPred({m.dim}, {m.mode}) → Linear without bias, "
                                                f"W after {int(m.steps)} step(s)"))
    return changes


def bake_directpred(gm: fx.GraphModule) -> PassResult:
    """Deploy step: every DirectPred a region holds becomes a bias-free Linear holding its W."""
    return PassResult("bake_directpred", tuple(_bake(gm, list(gm.named_modules()))))


def bake_directpred_outside(model: nn.Module, outside: list[Outside]) -> PassResult:
    """``bake_directpred`` on the DirectPreds no traced region calls (a leaf swap in their slot)."""
    return PassResult("bake_directpred", tuple(_bake(model, [(o.qualname, o.module) for o in outside])))
