"""``calibrate``: set a fixed-point model's trainable binary points from observed ranges (post-training
quantization, or the start of QFX training). It changes the model it is given, as an optimizer step
does: no transform, no copy."""
from __future__ import annotations

from typing import Any, Iterable, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from normfx.batches import ForwardFn, run_batch
from normfx.nn.fixed_point import FixedPoint
from normfx.nn.sync_bn import world_size

__all__ = ["calibrate"]

M = TypeVar("M", bound=nn.Module)


def calibrate(model: M, batches: Iterable, *, steps: int | None = None,
              progress: bool = True, forward_fn: ForwardFn | None = None,
              process_group: Any = None, sync_ranks: bool = True) -> M:
    """Set every trainable fixed-point binary point from the ranges observed on ``batches``.

    Each cast records ``max |x|`` while the model runs (in eval mode, casts passing values through),
    then takes the smallest integer width that holds it. Training refines the binary points from
    there; without training this is post-training quantization. Returns ``model`` (modified in place).
    Batches follow ``normfx.batches``: a tensor, a tuple/list whose first item is the input (a
    DataLoader's ``(x, y)``), a dict of keyword arguments, or anything with ``forward_fn(model, batch)``.
    ``progress=False`` turns off the tqdm progress bar (for libraries that embed normfx).

    Under ``torch.distributed`` (more than one rank in ``process_group``, the default group when
    ``None``) every rank must call it, each with its own share of the batches: the observed ranges
    are reduced (the maximum over ranks) before the binary points are set, so every rank sets the
    same ones, those of one process on every rank's batches. ``sync_ranks=False`` keeps each rank's
    own (then broadcast the state yourself, or the ranks train different models).
    """
    casts = [m for m in model.modules() if isinstance(m, FixedPoint) and m.trainable
             and not _is_weight_cast(model, m)]
    if not casts:
        raise ValueError(f"{type(model).__name__} has no trainable FixedPoint cast: call normfx.fixed_point first")
    was = model.training
    model.eval()
    for q in casts:
        q.observed_max.zero_()
        q.observing = True
    try:
        with torch.no_grad():
            for i, batch in enumerate(tqdm(batches, total=steps, desc="calibrate fixed point", unit="batch",
                                             disable=not progress)):
                if steps is not None and i >= steps:
                    break
                run_batch(model, batch, forward_fn)
    finally:
        for q in casts:
            q.observing = False
    if sync_ranks and world_size(process_group) > 1:
        observed = torch.cat([q.observed_max for q in casts])
        dist.all_reduce(observed, op=dist.ReduceOp.MAX, group=process_group)
        for q, part in zip(casts, observed.split([q.observed_max.numel() for q in casts])):
            q.observed_max.copy_(part)
    for q in casts:
        q.calibrate_from_observed()
    model.train(was)
    return model


def _is_weight_cast(model: nn.Module, q: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) and any(q is p for plist in m.parametrizations.values() for p in plist)
               for m in model.modules())
