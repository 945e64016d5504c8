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

from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

__all__ = ["RandomEntries", "add_random_entries", "keep_eval", "random_entries"]


class RandomEntries(nn.Module):
    """Parametrization ``W = W₀ with W₀.flatten()[index] replaced by values`` (``values`` trainable)."""

    def __init__(self, original: torch.Tensor, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.to(torch.long))
        self.values = nn.Parameter(original.detach().reshape(-1)[self.index].clone())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original.reshape(-1).index_put((self.index,), self.values).view_as(original)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} trainable entries"


def _key(name: str, *rest: str) -> str:
    return ".".join(("parametrizations", name) + rest)


def _state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """Save ``<prefix>weight`` (the current weight) where the original key stood, instead of
    ``parametrizations.weight.original``; the random entries' values/index keys come last."""
    names = _parametrized(module)
    if not names:
        return
    # The hook runs after the module's whole subtree was saved: its keys are the dict's last ones,
    # so popping and re-inserting them keeps every other key where it was.
    moved = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    extras = {}
    for n in names:
        moved.pop(prefix + _key(n, "original"), None)
        for leaf in ("values", "index"):
            k = prefix + _key(n, "0", leaf)
            if k in moved:
                extras[k] = moved.pop(k)
    for n in getattr(module, "_normfx_own_keys", ()):
        if n in names:
            state_dict[prefix + n] = getattr(module, n).detach()
        elif prefix + n in moved:
            state_dict[prefix + n] = moved.pop(prefix + n)
    state_dict.update(moved)
    state_dict.update(extras)


def _load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Accept ``<prefix>weight``: it becomes the original; missing values are read from it, so an
    ordinary checkpoint of the architecture loads into the random-control model (and vice versa)."""
    for n in _parametrized(module):
        k = prefix + n
        if k not in state_dict:
            continue
        w = state_dict.pop(k)
        state_dict[prefix + _key(n, "original")] = w
        entries = module.parametrizations[n][0]
        idx_key, val_key = prefix + _key(n, "0", "index"), prefix + _key(n, "0", "values")
        index = state_dict.get(idx_key, entries.index)
        state_dict.setdefault(idx_key, index)
        state_dict.setdefault(val_key, w.reshape(-1)[index.to(torch.long)])


def _parametrized(module: nn.Module) -> list[str]:
    if not parametrize.is_parametrized(module):
        return []
    return [n for n, plist in module.parametrizations.items()
            if len(plist) == 1 and isinstance(plist[0], RandomEntries)]


def add_random_entries(module: nn.Module, name: str, index: torch.Tensor) -> RandomEntries:
    """Make ``index`` (flat positions) of ``module.<name>`` trainable and the rest frozen."""
    if not hasattr(module, "_normfx_own_keys"):
        # Own state_dict keys in their original order (parameters, then buffers).
        module._normfx_own_keys = list(module._parameters) + list(module._buffers)
        getattr(module, "register_state_dict_post_hook", module._register_state_dict_hook)(_state_dict_hook)
        module._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
    original = getattr(module, name)
    original.requires_grad_(False)
    entries = RandomEntries(original, index)
    parametrize.register_parametrization(module, name, entries, unsafe=True)
    module.parametrizations[name].original.requires_grad_(False)
    return entries


def random_entries(module: nn.Module) -> dict[str, RandomEntries]:
    """The ``RandomEntries`` parametrizations on ``module``'s own tensors, by tensor name."""
    return {n: module.parametrizations[n][0] for n in _parametrized(module)}


def keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: run this BatchNorm in eval mode (``freeze_stats=True``)."""
    module.training = False
