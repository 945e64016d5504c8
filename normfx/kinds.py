"""What a module is, by type (and, only where nothing else can tell, by its forward's source).

The lowest layer of normfx: torch only, imported by every other layer (trace, match, nn, passes,
cli), so no module needs an import inside a function to find out what another module is.
"""
from __future__ import annotations

import functools
import inspect
from typing import Literal

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = ["BNKind", "bn_kind", "is_frozen_bn", "is_conv_like", "is_plain_conv", "is_mode_dependent_leaf",
           "forward_source_has"]

BNKind = Literal["plain", "norm_act"]

# Eval-mode semantics of these forwards are exactly y = γ(x − μ̂)/sqrt(σ̂² + ε) + β.
_PLAIN_BN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}


def is_frozen_bn(m: nn.Module) -> bool:
    """torchvision's / timm's FrozenBatchNorm2d: BatchNorm math with all four tensors as buffers."""
    return type(m).__name__.startswith("FrozenBatchNorm") and all(
        hasattr(m, a) for a in ("weight", "bias", "running_mean", "running_var")
    )


def is_mode_dependent_leaf(m: nn.Module) -> bool:
    """A parameter-free module whose forward branches on ``self.training`` (DropPath, StochasticDepth,
    DropBlock): tracing through it would freeze the mode it had at trace time into the graph."""
    # Only the source can tell: the branch on ``self.training`` is inside forward.
    return forward_source_has(type(m), "self.training")[0] and next(m.parameters(), None) is None


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


@functools.lru_cache(maxsize=None)
def forward_source_has(cls: type, *needles: str) -> tuple[bool, ...]:
    """Whether the source of ``cls.forward`` contains each needle (all False if it has no source)."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return (False,) * len(needles)
    return tuple(n in src for n in needles)
