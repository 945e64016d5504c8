"""Synchronizes batch statistics across processes: every BatchNorm that normalizes with batch
statistics in training computes them over the batch of every rank (``normfx.nn.sync_bn``).

Exact: with one process, or in eval mode, nothing changes; under ``DistributedDataParallel`` a
training step equals one process's step on the global batch. Each module keeps its object, slot,
parameters, keys and class (a subclass of its own, as Tune blocks are), so what a BatchNorm subclass
adds stays (timm's ``BatchNormAct2d`` keeps its activation; a Tune block stays a Tune block), where
``nn.SyncBatchNorm.convert_sync_batchnorm`` rebuilds subclasses as plain ``SyncBatchNorm`` (and
``SyncBatchNorm`` refuses CPU tensors). normfx's own layers that compute batch statistics in their
forward (``FixedPointBatchNorm``, EvoNorm-B0's batch variance) keep their class and synchronize
there. Skipped with their reason: a BatchNorm subclass with a forward of its own that normfx does not
know.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfx.kinds import bn_kind
from normfx.nn.sync_bn import is_synced, sync, synced_by_normfx, unsync
from normfx.report import Change, PassResult, Skip, SkipReason
from normfx.scope import Scope
from normfx.transform import Step, Transform

__all__ = ["sync_batchnorms", "SyncBNConfig", "SYNC_BN"]


@dataclass(frozen=True)
class SyncBNConfig:
    """Options of ``normfx.sync_bn``: the ``torch.distributed`` process group (``None``: the default)."""

    process_group: Any = None


def _site(name: str, m: nn.Module, scope: Scope) -> Change | Skip | None:
    own = getattr(m, "normfx_syncs_itself", False)
    if not (own or isinstance(m, _BatchNorm)):
        return None
    if is_synced(m):
        return Skip(name, SkipReason.ALREADY_DONE, f"already synchronized ({type(m).__name__})")
    if not own and bn_kind(m) is None:
        return Skip(name, SkipReason.UNSUPPORTED, f"{type(m).__name__} computes its statistics in its own forward; "
                    "not synchronized yet")
    return scope.skip(name, (name, m)) or Change(name, "sync", type(m).__name__)


def sync_batchnorms(model: nn.Module, scope: Scope, c: SyncBNConfig) -> tuple[PassResult, tuple[str, ...]]:
    """Every batch-statistics layer of ``model`` synchronizes over ``c.process_group`` (in place)."""
    changes, skips = [], []
    for name, m in model.named_modules():
        result = _site(name, m, scope)
        if isinstance(result, Change):
            changes.append(result)
            if not scope.plan:
                sync(m, c.process_group)
        elif result is not None:
            skips.append(result)
    return PassResult("sync_bn", tuple(changes), tuple(skips)), ()


def _unsync(root: nn.Module, named: list[tuple[str, nn.Module]], scope: Scope) -> PassResult:
    named, skips = scope.split(named, synced_by_normfx)
    changes = []
    for name, m in named:
        if synced_by_normfx(m):
            unsync(m)
            changes.append(Change(name, "unsync", "inference needs no synchronized statistics"))
    return PassResult("unsync_bn", tuple(changes), skips)


SYNC_BN = Transform(
    name="sync_bn", config=SyncBNConfig, exact=True, page="distributed.md",
    steps=lambda c: (Step("sync_bn", model_pass=partial(sync_batchnorms, c=c)),),
    summary="BatchNorm statistics over every rank's batch (torch.distributed, CPU included), each layer's "
            "own behaviour kept",
    deploy=(Step("unsync_bn", lambda gm, scope: _unsync(gm, list(gm.named_modules()), scope),
                 lambda model, outside, scope: _unsync(model, [(o.qualname, o.module) for o in outside], scope)),),
)
