"""What ``normfx.freeze`` puts into a model: trainable random entries, and BatchNorms kept in eval.

* ``RandomEntries`` is a ``torch.nn.utils.parametrize`` parametrization: the weight is the frozen
  original with ``index`` entries replaced by the trainable ``values``. The frozen entries are not
  part of any trainable tensor, so no optimizer (momentum, AdamW's decoupled decay) can move them.
* A parametrized tensor's state_dict key stays the original one (``conv.weight``, holding the
  current weight); only ``<module>.parametrizations.<name>.0.values`` and ``.index`` are added.
* ``keep_eval`` is the forward pre-hook behind ``freeze_stats=True``: the BatchNorm runs in eval mode
  (running statistics used, never updated) whatever ``model.train()`` says.
"""
from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from normfx.nn.param_keys import full, keep_state_dict_keys, normfx_parametrized, sharded

__all__ = ["RandomEntries", "add_random_entries", "keep_eval", "random_entries"]


class RandomEntries(nn.Module):
    """Parametrization ``W = W₀ with W₀.flatten()[index] replaced by values`` (``values`` trainable)."""

    saves_current = True  # the saved weight holds the trained entries: the plain architecture loads it

    def __init__(self, original: torch.Tensor, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.to(torch.long))
        self.values = nn.Parameter(original.detach().reshape(-1)[self.index].clone())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        index = cast(torch.Tensor, self.index)
        values: torch.Tensor = self.values
        if sharded(original) or sharded(values):   # FSDP's state_dict (see normfx.nn.param_keys.full)
            original, values = full(original), full(values)
        return original.reshape(-1).index_put((index,), values).view_as(original)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} trainable entries"

    def fill_state(self, state_dict: dict, prefix: str, original: torch.Tensor) -> None:
        """A checkpoint without the control's keys: keep this index, read the values from it."""
        index = state_dict.setdefault(prefix + "index", self.index)
        state_dict.setdefault(prefix + "values", original.reshape(-1)[index.to(torch.long)])


def add_random_entries(module: nn.Module, name: str, index: torch.Tensor) -> RandomEntries:
    """Make ``index`` (flat positions) of ``module.<name>`` trainable and the rest frozen."""
    keep_state_dict_keys(module)
    original = getattr(module, name)
    original.requires_grad_(False)
    entries = RandomEntries(original, index)
    parametrize.register_parametrization(module, name, entries, unsafe=True)
    module.parametrizations[name].original.requires_grad_(False)
    return entries


def random_entries(module: nn.Module) -> dict[str, RandomEntries]:
    """The ``RandomEntries`` parametrizations on ``module``'s own tensors, by tensor name."""
    found = {n: module.parametrizations[n][0] for n in normfx_parametrized(module)}
    return {n: p for n, p in found.items() if isinstance(p, RandomEntries)}


def keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: run this BatchNorm in eval mode (``freeze_stats=True``)."""
    module.training = False
