"""Batch statistics synchronized across processes, on any device (``torch.distributed``, gloo included).

``nn.SyncBatchNorm`` refuses CPU tensors once a process group exists ("SyncBatchNorm expected input
tensor to be on GPU ..."). ``synced_moments(x, group)`` is the piece every normfx batch-statistics
layer needs instead: the per-channel mean and biased variance of ``x`` over the batch of *every*
rank (two all-reduces: the sums and counts, then the centred sums of squares), and in backward the
gradient of the loss summed over ranks (one all-reduce of the statistics' gradients), so that
``DistributedDataParallel``'s averaging of parameter gradients gives exactly the gradients of one
process on the global batch. Without an initialized process group, or with one rank, it is the
local computation.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from normfx.kinds import bn_kind

__all__ = ["synced_moments", "world_size", "update_running", "SyncBN", "synced_class", "sync", "unsync", "is_synced",
           "synced_by_normfx", "sync_group"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (1 without an initialized process group)."""
    return dist.get_world_size(group) if _distributed() else 1


class _SyncedMoments(torch.autograd.Function):
    # Tensor ops only (the global count stays a tensor): no Python number read from a tensor, so
    # torch.compile traces through without a graph break.
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any):  # type: ignore[override]
        dims = [d for d in range(x.dim()) if d != 1]
        local_n = x.numel() // x.shape[1]
        sums = torch.cat([x.sum(dims, dtype=torch.float64), x.new_full((1,), local_n, dtype=torch.float64)])
        dist.all_reduce(sums, group=group)
        n = sums[-1]
        mean = sums[:-1] / n
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x.double() - mean.view(shape)
        sq = centred.pow(2).sum(dims)
        dist.all_reduce(sq, group=group)
        var = sq / n
        ctx.save_for_backward(centred.to(x.dtype), n)
        ctx.group, ctx.shape = group, shape
        return mean.to(x.dtype), var.to(x.dtype), n.detach().clone()

    @staticmethod
    def backward(ctx, g_mean: torch.Tensor, g_var: torch.Tensor, _: torch.Tensor):  # type: ignore[override]
        centred, n = ctx.saved_tensors
        grads = torch.cat([g_mean, g_var]).double()
        dist.all_reduce(grads, group=ctx.group)     # the statistics are every rank's: sum their gradients
        c = g_mean.numel()
        gm, gv = grads[:c].view(ctx.shape), grads[c:].view(ctx.shape)
        gx = (gm + 2.0 * gv * centred.double()) / n
        return gx.to(centred.dtype), None


def synced_moments(x: torch.Tensor, group: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (axis 1) mean and biased variance of ``x`` over the batch of every rank in ``group``,
    and the number of values per channel they were taken over (a 0-dim tensor)."""
    if world_size(group) == 1:
        dims = [d for d in range(x.dim()) if d != 1]
        return x.mean(dims), x.var(dims, unbiased=False), x.new_full((), x.numel() // x.shape[1], dtype=torch.float64)
    return _SyncedMoments.apply(x, group)


@torch.no_grad()
def update_running(running_mean: torch.Tensor | None, running_var: torch.Tensor, mean: torch.Tensor | None,
                   var: torch.Tensor, n: float | torch.Tensor, momentum: float, *, unbiased: bool = True) -> None:
    """BatchNorm's running update from batch moments over ``n`` values per channel:
    ``r ← (1 − momentum)·r + momentum·s`` with the variance taken unbiased (``s²·n/(n − 1)``) unless
    ``unbiased=False``; ``running_mean`` may be ``None`` (EvoNorm-B0 keeps only a variance)."""
    k = (n / (n - 1.0).clamp_min(1.0) if isinstance(n, torch.Tensor) else n / max(n - 1.0, 1.0)) if unbiased else 1.0
    if running_mean is not None and mean is not None:
        running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1 - momentum).add_((var.detach() * k).to(running_var.dtype), alpha=momentum)


class _Group:
    """The process group a synchronized module keeps (in its ``__dict__``: no state_dict key). A copy
    of the module (``copy.deepcopy``, as every transform makes) shares the group; a pickle
    (``torch.save`` of the whole module) cannot hold a process group, so a non-default one comes
    back as lost and the module's next synchronized forward says how to set it again."""

    __slots__ = ("group", "lost")

    def __init__(self, group: Any = None, lost: bool = False) -> None:
        self.group, self.lost = group, lost

    def __deepcopy__(self, memo: dict) -> "_Group":
        return self

    def __reduce__(self) -> tuple:
        return (_Group, (None, self.lost or self.group is not None))

    def get(self, where: nn.Module) -> Any:
        if self.lost:
            raise RuntimeError(f"{type(where).__name__} was synchronized over a process group that a pickle cannot "
                               "keep: call normfx.sync_bn(model, process_group=..., inplace=True) again after loading")
        return self.group


def _group(m: nn.Module) -> Any:
    holder = m.__dict__.get("_normfx_group")
    return holder.get(m) if isinstance(holder, _Group) else holder


def synced_by_normfx(m: nn.Module) -> bool:
    """Whether ``normfx.sync_bn`` synchronizes ``m`` (``sync`` keeps its group on it)."""
    return "_normfx_group" in m.__dict__


def sync_group(m: nn.Module) -> tuple[bool, Any]:
    """``(synchronized, process group)`` of a module that computes its batch statistics in its own
    forward (``FixedPointBatchNorm``, ``EvoNorm2dB0``): what ``sync`` set on it."""
    synced = synced_by_normfx(m)
    return synced, _group(m) if synced and _distributed() else None


def is_synced(m: nn.Module) -> bool:
    """Whether ``normfx.sync_bn`` (or ``nn.SyncBatchNorm``) synchronizes ``m``'s batch statistics."""
    return isinstance(m, nn.SyncBatchNorm) or synced_by_normfx(m)


class SyncBN(nn.Module):
    """Mixin of a BatchNorm whose batch statistics are every rank's (``normfx.sync_bn``): the module
    keeps its object, slot, parameters, keys and class (a subclass of its own, as Tune blocks do).

    When it normalizes with batch statistics (training, or no running statistics) and more than one
    rank is in its group, it computes them with ``synced_moments`` and updates its running
    statistics as BatchNorm does (unbiased variance over the global count); a norm-act layer (timm's
    ``BatchNormAct2d``) then applies its ``drop`` and ``act``. Otherwise it is the module it was
    (a Tune block's BatchNorm keeps its eval-mode fused path)."""

    _normfx_sync_inner: type

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        bn: Any = self
        batch_stats = bn.training or bn.running_mean is None
        if not batch_stats or not _distributed() or world_size(group := _group(self)) == 1:
            return super().forward(x)
        mean, var, n = synced_moments(x, group)
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            bn.num_batches_tracked.add_(1)
            f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            update_running(bn.running_mean, bn.running_var, mean, var, n, f)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
        if bn.weight is not None:
            y = y * bn.weight.view(shape) + bn.bias.view(shape)
        if bn_kind(self) == "norm_act":
            y = bn.act(bn.drop(y))
        return y

    def __reduce_ex__(self, protocol):  # type: ignore[override]
        # The inner class may itself be made at run time (a Tune BatchNorm): reduce as it, then re-sync.
        self.__class__ = self._normfx_sync_inner
        try:
            inner = self.__reduce_ex__(protocol)
        finally:
            self.__class__ = synced_class(self.__class__)
        return (_resynced, (inner[0], inner[1]), *inner[2:])


_SYNCED: dict[type, type] = {}


def synced_class(inner: type) -> type:
    """``SyncBN`` over ``inner`` (one class per inner class; the name reads ``SyncBatchNorm2d``)."""
    if inner not in _SYNCED:
        namespace = {"_normfx_sync_inner": inner, "__module__": __name__,
                     "_normfx_base": getattr(inner, "_normfx_base", inner)}
        _SYNCED[inner] = type("Sync" + inner.__name__, (SyncBN, inner), namespace)
    return _SYNCED[inner]


def _resynced(rebuild: Any, args: tuple) -> nn.Module:
    obj = rebuild(*args)
    obj.__class__ = synced_class(type(obj))
    return obj


def sync(bn: nn.Module, group: Any) -> None:
    """Make ``bn`` synchronize its batch statistics over ``group`` (in place; the default group when
    ``None``). A module that computes them in its own forward (``normfx_syncs_itself``:
    ``FixedPointBatchNorm``, ``EvoNorm2dB0``) keeps its class and reads the group from ``sync_group``;
    any other BatchNorm becomes a ``SyncBN`` subclass of its class."""
    bn.__dict__["_normfx_group"] = group if isinstance(group, _Group) else _Group(group)
    if not getattr(bn, "normfx_syncs_itself", False):
        bn.__class__ = synced_class(bn._normfx_sync_inner if isinstance(bn, SyncBN) else type(bn))


def unsync(bn: nn.Module) -> None:
    """Give a synchronized BatchNorm its class back (a self-synchronizing one its local statistics)."""
    bn.__dict__.pop("_normfx_group", None)
    if isinstance(bn, SyncBN):
        bn.__class__ = bn._normfx_sync_inner
