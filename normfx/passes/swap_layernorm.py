"""Replaces ``LN(x)`` with ``ProgressiveRepBN(x) = λ·LN(x) + (1 − λ)·(BN(x) + η·x)`` (SLAB's PRepBN).

Not exact while λ < 1 (it is a different normalization, trained into the model); at λ = 1 it equals
the LayerNorm exactly, and at λ = 0 it is RepBN, which in eval mode is a per-channel affine that
``normfx.deploy`` folds into a neighbouring Linear (``fold_repbn``).

Sites: ``nn.LayerNorm`` modules and subclasses (timm's), channels-first LayerNorm2d (ConvNeXt:
BN over C), and functional ``F.layer_norm`` over the last dimension. Skipped: LayerNorms over several
dimensions, and q/k norms inside attention (normalizing per head is what they are for).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from normfx.kinds import forward_source_has
from normfx.match import free_name, get_attr, set_module
from normfx.nn.repbn import ProgressiveRepBN, RepBN
from normfx.report import Change, PassResult, Skip, SkipReason
from normfx.analysis import Outside
from normfx.config import check_int
from normfx.passes.fold_affine import fold_repbn, fold_repbn_outside
from normfx.scope import EVERYWHERE, Scope
from normfx.transform import Step, Transform

__all__ = ["swap_layernorm", "swap_layernorm_outside", "is_channels_first_ln", "RepBNConfig", "REPBN"]


def is_channels_first_ln(m: nn.Module) -> bool:
    """timm's / torchvision's LayerNorm2d: LayerNorm over C of a ``[B, C, H, W]`` tensor."""
    cls: Any = type(m)
    return isinstance(m, nn.LayerNorm) and cls.forward is not nn.LayerNorm.forward and \
        forward_source_has(cls, "permute(0, 2, 3, 1)")[0]


def _qk_norm(target: str) -> bool:
    # q/k norms are told apart from token norms by where they sit; their attribute names are the
    # only structural mark timm and torchvision give them.
    return target.rpartition(".")[2] in ("q_norm", "k_norm", "norm_q", "norm_k", "q_ln", "k_ln")


def _swap_module(root: nn.Module, site: str, m: nn.Module, total_steps: int, eta_init: float,
                 scope: Scope) -> Change | Skip | None:
    """The decision for one LayerNorm module (a leaf change: it needs no graph). None: not a site."""
    if isinstance(m, ProgressiveRepBN):
        return Skip(site, SkipReason.ALREADY_DONE, "already a ProgressiveRepBN")
    if not isinstance(m, nn.LayerNorm):
        return None
    if len(m.normalized_shape) != 1:
        return Skip(site, SkipReason.UNSUPPORTED, f"normalizes over {len(m.normalized_shape)} dims")
    if _qk_norm(site):
        return Skip(site, SkipReason.UNSUPPORTED, "q/k norm inside attention")
    channels_first = is_channels_first_ln(m)
    if type(m).forward is not nn.LayerNorm.forward and not channels_first and not _is_last_dim_subclass(type(m)):
        return Skip(site, SkipReason.UNSUPPORTED, f"{type(m).__name__} has its own forward")
    excluded = scope.skip(site, (site, m))
    if excluded:
        return excluded
    if not scope.plan:
        set_module(root, site, _progressive(m, m.normalized_shape[0], m.eps, channels_first, total_steps, eta_init))
    return Change(site, "prepbn", "channels-first" if channels_first else "tokens")


def swap_layernorm(gm: fx.GraphModule, scope: Scope = EVERYWHERE, *, total_steps: int,
                   eta_init: float = 1.0) -> PassResult:
    """Replaces every last-dim (or channels-first 2d) LayerNorm with a ``ProgressiveRepBN``.

    Mutates ``gm`` in place. The LayerNorm module (with its parameters) becomes the new module's
    ``norm``; its RepBN starts at identity statistics (mean 0, var 1) with ``η = eta_init``.
    """
    changes: list[Change] = []
    skips: list[Skip] = []
    mods = dict(gm.named_modules())
    seen: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(node.target, str) and node.target not in seen:
            seen.add(node.target)  # a module called twice is one site
            result = _swap_module(gm, node.target, mods[node.target], total_steps, eta_init, scope)
            if result is not None:
                if isinstance(result, Change):
                    changes.append(result)
                else:
                    skips.append(result)
        elif node.op == "call_function" and node.target is F.layer_norm:
            change = _swap_functional(gm, node, total_steps, eta_init, scope)
            if isinstance(change, Change):
                changes.append(change)
            else:
                skips.append(change)
    if any(c.detail.startswith("functional") for c in changes) and not scope.plan:
        gm.graph.lint()
        gm.recompile()
    return PassResult("swap_layernorm", tuple(changes), tuple(skips))


def swap_layernorm_outside(model: nn.Module, outside: list[Outside], scope: Scope = EVERYWHERE, *,
                           total_steps: int, eta_init: float = 1.0) -> PassResult:
    """LayerNorm modules no traced region calls are swapped in their slot all the same: the
    untraced forward calls ``self.<name>(x)``, whatever module is there. Only a functional
    ``F.layer_norm`` inside such a forward stays out of reach."""
    changes: list[Change] = []
    skips: list[Skip] = []
    for site, m, *_ in outside:
        result = _swap_module(model, site, m, total_steps, eta_init, scope)
        if result is not None:
            if isinstance(result, Change):
                changes.append(result)
            else:
                skips.append(result)
    return PassResult("swap_layernorm", tuple(changes), tuple(skips))


def _is_last_dim_subclass(cls: Any) -> bool:
    """A LayerNorm subclass that normalizes the last dim its own way (timm's fast-norm LayerNorm)."""
    ln, permute, transpose = forward_source_has(cls, "layer_norm", "permute", "transpose")
    return ln and not permute and not transpose


def _progressive(norm: nn.Module, c: int, eps: float, channels_first: bool, total_steps: int,
                 eta_init: float) -> ProgressiveRepBN:
    ref = next(iter(norm.parameters()), None)
    repbn = RepBN(c, eta_init=eta_init, eps=eps, channels_last=not channels_first)
    if ref is not None:
        repbn = repbn.to(device=ref.device, dtype=ref.dtype)
    new = ProgressiveRepBN(norm, repbn, total_steps=total_steps)
    new.train(norm.training)
    return new


class _LayerNorm(nn.Module):
    """A functional ``F.layer_norm`` call as a module, holding the same weight/bias tensors."""

    def __init__(self, shape: tuple[int, ...], weight, bias, eps: float) -> None:
        super().__init__()
        self.normalized_shape = shape
        self.eps = eps
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def _swap_functional(gm: fx.GraphModule, node: fx.Node, total_steps: int, eta_init: float,
                     scope: Scope) -> Change | Skip:
    names = ["input", "normalized_shape", "weight", "bias", "eps"]
    a = {"weight": None, "bias": None, "eps": 1e-5, **dict(zip(names, node.args)), **node.kwargs}
    raw: Any = a["normalized_shape"]
    shape: tuple | None = (raw,) if isinstance(raw, int) else tuple(raw) if isinstance(raw, (list, tuple)) else None
    site = node.name
    if shape is None or any(isinstance(d, fx.Node) for d in shape):
        return Skip(site, SkipReason.UNSUPPORTED, "normalized_shape is computed in the graph")
    if len(shape) != 1:
        return Skip(site, SkipReason.UNSUPPORTED, f"normalizes over {len(shape)} dims")
    tensors: list[Any] = []
    for key in ("weight", "bias"):
        arg = a[key]
        if arg is None:
            tensors.append(None)
        elif isinstance(arg, fx.Node) and arg.op == "get_attr":
            tensors.append(get_attr(gm, str(arg.target)))
            site = str(arg.target).rsplit(".", 1)[0] or site
        else:
            return Skip(site, SkipReason.UNSUPPORTED, "affine parameters are computed in the graph")
    excluded = scope.skip(site, ("", None))
    if excluded or scope.plan:
        return excluded or Change(f"{node.name}_prepbn", "prepbn", f"functional layer_norm at '{site}'")
    eps: Any = a["eps"]
    norm = _LayerNorm(shape, tensors[0], tensors[1], float(eps))
    new = _progressive(norm, int(shape[0]), float(eps), False, total_steps, eta_init)
    name = free_name(gm, f"{node.name}_prepbn")
    gm.add_submodule(name, new)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(name, (a["input"],))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return Change(name, "prepbn", f"functional layer_norm at '{site}'")


@dataclass(frozen=True)
class RepBNConfig:
    """Options of ``normfx.repbn`` (see it for their meaning)."""

    total_steps: int
    eta_init: float = 1.0

    def __post_init__(self) -> None:
        check_int("total_steps", self.total_steps, lo=1)
        if isinstance(self.eta_init, bool) or not isinstance(self.eta_init, (int, float)):
            raise ValueError(f"eta_init must be a number, got {self.eta_init!r}")


def _steps(config: RepBNConfig) -> tuple[Step, ...]:
    opts: dict[str, Any] = dict(total_steps=config.total_steps, eta_init=float(config.eta_init))
    return (Step("swap_layernorm", partial(swap_layernorm, **opts), partial(swap_layernorm_outside, **opts),
                 view="module"),)


REPBN = Transform(
    name="repbn", config=RepBNConfig, steps=_steps, exact=False,
    summary="LayerNorm → progressive re-parameterized BatchNorm, folded away by deploy (SLAB's PRepBN)",
    paper="Guo et al., SLAB (ICML 2024)",
    deploy=(Step("fold_repbn", fold_repbn, fold_repbn_outside),),
    page="repbn.md",
    inspect=(("repbn", RepBNConfig(total_steps=1)),), example=RepBNConfig(total_steps=10_000),
)
