"""Small helpers the passes share to find sites: module of a node, kinds of modules, use counts."""
from __future__ import annotations

import functools
import inspect
from collections import Counter
from typing import Literal

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from normfx.trace import is_frozen_bn

__all__ = [
    "module_uses", "bn_kind", "is_conv_like", "is_plain_conv", "BNKind",
    "get_attr", "set_module", "set_param", "forward_source_has", "module_tensors",
]

BNKind = Literal["plain", "norm_act"]

# Eval-mode semantics of these forwards are exactly y = γ(x − μ̂)/sqrt(σ̂² + ε) + β.
_PLAIN_BN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}


def module_uses(gm: fx.GraphModule) -> Counter[int]:
    """How many graph nodes refer to each module object (by ``id``), aliases counted together."""
    mods = dict(gm.named_modules(remove_duplicate=False))
    uses: Counter[int] = Counter()
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target in mods:
            uses[id(mods[node.target])] += 1
    return uses


def bn_kind(m: nn.Module) -> BNKind | None:
    """``"plain"`` for BatchNorm whose eval forward is plain BN (incl. Sync and Frozen BN),
    ``"norm_act"`` for timm-style BN followed by its own ``drop`` and ``act``, else None."""
    if is_frozen_bn(m):
        if hasattr(m, "act"):
            return "norm_act" if hasattr(m, "drop") else None
        return "plain"
    if not isinstance(m, _BatchNorm):
        return None
    fwd = type(m).forward
    if fwd in _PLAIN_BN_FORWARDS:
        return "plain"
    if isinstance(getattr(m, "act", None), nn.Module) and isinstance(getattr(m, "drop", None), nn.Module):
        return "norm_act"
    return None


def is_conv_like(m: nn.Module | None) -> bool:
    """Conv/ConvTranspose of any dimension, or Linear (subclasses included)."""
    return isinstance(m, (_ConvNd, nn.Linear))


def is_plain_conv(m: nn.Module) -> bool:
    """A conv/linear whose forward is torch's own, so we may call the op directly on new weights."""
    cls = type(m)
    if isinstance(m, nn.Linear):
        return cls.forward is nn.Linear.forward
    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        if isinstance(m, base):
            same_forward = cls.forward is base.forward
            same_conv = getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward", None)
            return same_forward and same_conv and not isinstance(m.padding, str)
    return False


def is_functional_bn(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (F.batch_norm,)


def get_attr(gm: nn.Module, target: str):
    """The object a ``get_attr`` target names (``"layer1.0.bn1.running_mean"``)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_module(gm: nn.Module, qualname: str, module: nn.Module) -> None:
    """Put ``module`` at ``qualname`` (the graph's nodes that call that name now call it)."""
    parent, _, name = qualname.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def module_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer object of ``model`` (tied ones once per holder)."""
    return [t for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]


def set_param(module: nn.Module, name: str, value: torch.Tensor, *, requires_grad: bool) -> None:
    """Replace ``module.<name>`` by a new Parameter holding ``value``; never writes into the old one.

    A parametrized tensor (``torch.nn.utils.parametrize``, e.g. ``normfx.freeze``'s random control)
    loses its parametrization: ``value`` is computed from what the parametrization produced, so it
    already holds the parametrized result.
    """
    if parametrize.is_parametrized(module, name):
        # leave_parametrized=False puts the untouched original back (True would ``set_`` it in place,
        # and the original may be shared with the caller's model).
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    setattr(module, name, nn.Parameter(value, requires_grad=requires_grad))


@functools.lru_cache(maxsize=None)
def forward_source_has(cls: type, *needles: str) -> tuple[bool, ...]:
    """Whether the source of ``cls.forward`` contains each needle (all False if it has no source)."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return (False,) * len(needles)
    return tuple(n in src for n in needles)
