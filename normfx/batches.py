"""How normfx runs a model on a batch: one convention for every function that takes batches.

``calibrate`` and ``recalibrate_bn`` take an iterable of batches, each one of:

* a tensor: ``model(batch)``;
* a tuple or list whose first item is the input (a DataLoader's ``(x, y)``): ``model(batch[0])``;
* a dict of keyword arguments (a Hugging Face batch): ``model(**batch)``;
* anything else, with ``forward_fn=``: ``forward_fn(model, batch)`` (several inputs, a device
  move, a custom call).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

__all__ = ["ForwardFn", "run_batch"]

ForwardFn = Callable[[nn.Module, Any], Any]


def run_batch(model: nn.Module, batch: Any, forward_fn: ForwardFn | None = None) -> Any:
    """Call ``model`` on one ``batch`` by the convention above.

    Raises:
        TypeError: a batch of another kind without ``forward_fn``, or an empty tuple/list.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> run_batch(net, (torch.randn(3, 4), torch.tensor([0, 1, 1]))).shape
        torch.Size([3, 2])
    """
    if forward_fn is not None:
        return forward_fn(model, batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise TypeError("an empty tuple/list is not a batch: its first item must be the model's input")
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(f"cannot call {type(model).__name__} on a batch of type {type(batch).__name__}: pass a tensor, "
                    "a tuple/list whose first item is the input, a dict of keyword arguments, or "
                    "forward_fn=lambda model, batch: ...")
