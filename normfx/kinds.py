"""What a module is, by type (and, only where nothing else can tell, by its forward's source).

The lowest layer of normfx: torch only, imported by every other layer (trace, match, nn, passes,
cli), so no module needs an import inside a function to find out what another module is.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as _prune
from torch.nn.modules import module as _torch_module   # torch's registries of global module hooks
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.conv import _ConvNd

__all__ = ["BNKind", "original_class", "bn_kind", "is_frozen_bn", "is_norm_layer", "is_conv_like", "is_plain_conv",
           "eval_affine", "fold_refusal",
           "is_mode_dependent_leaf",
           "forward_source_has", "Hook", "hooks_on", "pruning_hooks"]

Hook = Literal["forward", "forward_pre", "backward", "backward_pre"]
_HOOK_ATTRS: dict[str, tuple[str, str]] = {
    # kind: (the module's registry, torch's global registry)
    "forward": ("_forward_hooks", "_global_forward_hooks"),
    "forward_pre": ("_forward_pre_hooks", "_global_forward_pre_hooks"),
    "backward": ("_backward_hooks", "_global_backward_hooks"),
    "backward_pre": ("_backward_pre_hooks", "_global_backward_pre_hooks"),
}


def hooks_on(m: nn.Module, kinds: tuple[Hook, ...] = ("forward", "forward_pre", "backward", "backward_pre")) -> str:
    """Which of ``kinds`` of hooks would run around ``m``'s call — its own or torch's global module
    hooks — as a phrase for a report (``"forward hooks on 'conv1'"`` is the caller's to word), or
    ``""`` when none. A rewrite that changes what such a hook sees, or removes the module, must not
    happen silently."""
    found = []
    for kind in kinds:
        own, glob = _HOOK_ATTRS[kind]
        name = kind.replace("_", "-")
        if getattr(m, own, None):
            found.append(f"{name} hooks")
        elif getattr(_torch_module, glob, None):
            found.append(f"global {name} hooks")
    return ", ".join(found)

BNKind = Literal["plain", "norm_act"]

# Eval-mode semantics of these forwards are exactly y = γ(x − μ̂)/sqrt(σ̂² + ε) + β.
_PLAIN_BN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}


def original_class(m: nn.Module) -> type[nn.Module]:
    """The class ``m`` had before normfx swapped it for a subclass (a Tune block's conv or BN); the
    module's own class otherwise. Kinds are decided on it, so a swapped module stays what it was."""
    return getattr(type(m), "_normfx_base", type(m))


def is_frozen_bn(m: nn.Module) -> bool:
    """torchvision's / timm's FrozenBatchNorm2d: BatchNorm math with all four tensors as buffers."""
    return original_class(m).__name__.startswith("FrozenBatchNorm") and all(
        hasattr(m, a) for a in ("weight", "bias", "running_mean", "running_var")
    )


def is_mode_dependent_leaf(m: nn.Module) -> bool:
    """A parameter-free module whose forward branches on ``self.training`` (DropPath, StochasticDepth,
    DropBlock): tracing through it would freeze the mode it had at trace time into the graph."""
    # Only the source can tell: the branch on ``self.training`` is inside forward.
    cls: Any = type(m)
    return forward_source_has(cls, "self.training")[0] and next(m.parameters(), None) is None


_NORM_TYPES: tuple[type, ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
# timm keeps its normalization layers (and norm-act layers, EvoNorm) in these modules.
_NORM_MODULES = ("timm.layers.norm", "timm.layers.norm_act", "timm.layers.evo_norm",
                 "timm.models.layers.norm", "timm.models.layers.norm_act", "timm.models.layers.evo_norm")


def is_norm_layer(m: nn.Module) -> bool:
    """Whether ``m`` is a normalization layer: torch's (BatchNorm/InstanceNorm of any kind,
    LayerNorm, GroupNorm, LocalResponseNorm, RMSNorm), FrozenBatchNorm, timm's norm and norm-act
    layers, and normfx's own (classes that set ``normfx_norm_layer = True``: RepBN, PRepBN)."""
    cls = original_class(m)
    return (isinstance(m, _NORM_TYPES) or is_frozen_bn(m) or cls.__module__ in _NORM_MODULES
            or bool(getattr(cls, "normfx_norm_layer", False)))


def bn_kind(m: nn.Module) -> BNKind | None:
    """``"plain"`` for BatchNorm whose eval forward is plain BN (incl. Sync and Frozen BN),
    ``"norm_act"`` for timm-style BN followed by its own ``drop`` and ``act``, else None."""
    if is_frozen_bn(m):
        if hasattr(m, "act"):
            return "norm_act" if hasattr(m, "drop") else None
        return "plain"
    if not isinstance(m, _BatchNorm):
        return None
    fwd = original_class(m).forward
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
    cls = original_class(m)
    if isinstance(m, nn.Linear):
        return cls.forward is nn.Linear.forward
    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        if isinstance(m, base):
            same_forward = cls.forward is base.forward
            same_conv = getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward", None)
            return same_forward and same_conv and not isinstance(m.padding, str)
    return False


@functools.lru_cache(maxsize=None)
def forward_source_has(cls: Any, *needles: str) -> tuple[bool, ...]:  # cls: a module class (hashable)
    """Whether the source of ``cls.forward`` contains each needle (all False if it has no source)."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return (False,) * len(needles)
    return tuple(n in src for n in needles)


def pruning_hooks(m: nn.Module) -> dict[int, Any]:
    """``m``'s ``torch.nn.utils.prune`` reparametrizations (hook id -> the pruning method, whose
    ``_tensor_name`` is the pruned tensor): ``m.<name>`` is then a tensor recomputed as
    ``<name>_orig · <name>_mask`` before every forward, not a Parameter."""
    return {k: h for k, h in m._forward_pre_hooks.items() if isinstance(h, _prune.BasePruningMethod)}


def eval_affine(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | str | None:
    """A normalization that is a constant per-channel affine ``x·scale + shift`` in eval mode, as a fold
    needs it: ``(scale, shift)``; why it is not one (a string), for a module that says so; ``None`` for
    a module that is no such normalization. Modules answer through their ``eval_affine()`` method
    (normfx's EvoNorm); BatchNorms are read from their statistics by the ConvBN pass itself."""
    method = getattr(m, "eval_affine", None)
    return method() if callable(method) else None


def fold_refusal(m: nn.Module) -> str:
    """Why the weights of ``m`` must not be rewritten by a fold (a parametrization that says so in its
    ``refuses_fold``, e.g. a fixed-point cast), or ``""``."""
    plists = m.parametrizations.values() if parametrize.is_parametrized(m) else ()
    return next((str(p.refuses_fold) for plist in plists for p in plist if getattr(p, "refuses_fold", "")), "")
