"""DirectPred: put the predictor in (``swap_predictor``) and take it out at deploy (``bake_directpred``).

The swap is a leaf change on a named submodule (no graph needed); deploy bakes each DirectPred's
current ``W`` into a bias-free ``nn.Linear`` in its slot, which exports like any Linear.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.fx as fx
import torch.nn as nn

from normfx.analysis import Outside
from normfx.match import set_module
from normfx.config import check_choice, check_int
from normfx.errors import AlreadyTransformedError
from normfx.nn.directpred import DirectPred, Mode
from normfx.report import Change, PassResult
from normfx.scope import EVERYWHERE, Scope
from normfx.transform import Step, Transform

__all__ = ["bake_directpred", "bake_directpred_outside", "as_linear", "swap_predictor", "DirectPredConfig",
           "DIRECTPRED"]


def as_linear(p: DirectPred) -> nn.Linear:
    """A bias-free Linear computing what ``p`` computes now (``W`` copied, frozen like ``W`` was)."""
    lin = nn.Linear(p.dim, p.dim, bias=False, device=p.weight.device, dtype=p.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(p.weight)
    lin.weight.requires_grad_(False)
    return lin.train(p.training)


def _bake(root: nn.Module, named: list[tuple[str, nn.Module]], scope: Scope) -> PassResult:
    changes = []
    named, skips = scope.split(named, lambda m: isinstance(m, DirectPred))
    for name, m in named:
        if isinstance(m, DirectPred) and name:
            set_module(root, name, as_linear(m))
            changes.append(Change(name, "bake", f"DirectPred({m.dim}, {m.mode}) → Linear without bias, "
                                                f"W after {int(m.steps)} step(s)"))
    return PassResult("bake_directpred", tuple(changes), skips)


def bake_directpred(gm: fx.GraphModule, scope: Scope = EVERYWHERE) -> PassResult:
    """Deploy step: every DirectPred a region holds becomes a bias-free Linear holding its W."""
    return _bake(gm, list(gm.named_modules()), scope)


def bake_directpred_outside(model: nn.Module, outside: list[Outside], scope: Scope = EVERYWHERE) -> PassResult:
    """``bake_directpred`` on the DirectPreds no traced region calls (a leaf swap in their slot)."""
    return _bake(model, [(o.qualname, o.module) for o in outside], scope)


@dataclass(frozen=True)
class DirectPredConfig:
    """Options of ``normfx.directpred`` (see it for their meaning)."""

    predictor: str = "predictor"
    rho: float = 0.3
    eps: float = 0.01
    freq: int = 1
    power: float = 0.5
    mode: Mode = "directpred"
    dim: int | None = None
    floor: float = 1e-4
    trainable: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.predictor, str) or not self.predictor:
            raise ValueError(f"predictor must be a submodule's qualified name, got {self.predictor!r}")
        check_choice("mode", self.mode, ("directpred", "directcopy"))
        check_int("freq", self.freq, lo=1)
        if self.dim is not None:
            check_int("dim", self.dim, lo=1)


def _dim(model: nn.Module, c: DirectPredConfig) -> int:
    """The predictor's feature size (``c.dim``, else its first and last Linear's), after checking it."""
    names = dict(model.named_modules())
    if c.predictor not in names:
        close = [n for n in names if n and n.split(".")[-1] == c.predictor.split(".")[-1]]
        raise ValueError(f"{type(model).__name__} has no submodule {c.predictor!r}"
                         + (f"; did you mean {close[0]!r}?" if close else "; pass predictor='<qualified name>'"))
    old = names[c.predictor]
    if isinstance(old, DirectPred):
        raise AlreadyTransformedError(
            f"'{c.predictor}' is already a DirectPred predictor: normfx.directpred applies once. Call it on the "
            "model with its original predictor to change the options")
    if c.dim is not None:
        return c.dim
    linears = [m for m in old.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot read the feature size of {c.predictor!r} ({type(old).__name__}): pass dim=")
    if linears[0].in_features != linears[-1].out_features:
        raise ValueError(f"{c.predictor!r} maps {linears[0].in_features} features to {linears[-1].out_features}; "
                         "a DirectPred predictor maps a space to itself")
    return linears[0].in_features


def swap_predictor(model: nn.Module, scope: Scope, c: DirectPredConfig) -> tuple[PassResult, tuple[str, ...]]:
    """Replaces the submodule ``c.predictor`` with a ``DirectPred`` of its feature size (in place)."""
    old = model.get_submodule(c.predictor)
    new = DirectPred(_dim(model, c), rho=c.rho, eps=c.eps, freq=c.freq, power=c.power, mode=c.mode, floor=c.floor,
                     trainable=c.trainable)
    excluded = scope.skip(c.predictor, (c.predictor, old))
    if excluded:
        return PassResult("directpred", (), (excluded,)), ()
    if not scope.plan:
        ref = next(iter(old.parameters()), None)
        set_module(model, c.predictor, (new if ref is None else new.to(device=ref.device)).train(old.training))
    change = Change(c.predictor, "directpred", f"{type(old).__name__} → {new.extra_repr()}")
    return PassResult("directpred", (change,)), ()


def _check(model: nn.Module, c: DirectPredConfig) -> None:
    _dim(model, c)     # its errors, raised on the caller's model before anything is copied


DIRECTPRED = Transform(
    name="directpred", config=DirectPredConfig, exact=False, tensors="own",
    steps=lambda c: (Step("directpred", model_pass=partial(swap_predictor, c=c)),),
    check=_check,
    summary="a BYOL/SimSiam predictor → DirectPred, set from its inputs' correlation (deploy bakes a Linear)",
    paper="Tian et al., Understanding Self-Supervised Learning Dynamics without Contrastive Pairs (ICML 2021)",
    deploy=(Step("bake_directpred", bake_directpred, bake_directpred_outside),), page="directpred.md",
)
