"""Keep a layer's state-dict keys when normfx parametrizes one of its tensors.

``torch.nn.utils.parametrize`` moves ``conv.weight`` to ``conv.parametrizations.weight.original``,
which breaks every checkpoint. For the parametrizations normfx inserts (``RandomEntries``,
``FixedPoint``) these hooks save the tensor under its original key and load it from there; the
parametrization's own state (``...parametrizations.weight.0.<name>``) is saved after the layer's
keys and, when a checkpoint lacks it, filled in by the parametrization (``fill_state``).

A parametrization opts in with two members:

* ``saves_current`` (class attribute): save what the layer computes with (``True``) or the float
  original (``False``) under the original key;
* ``fill_state(state_dict, prefix, original)``: put its missing keys (``prefix`` + name) into a
  state dict being loaded, given the tensor loaded under the original key.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

__all__ = ["keep_state_dict_keys", "normfx_parametrized", "sharded", "full"]


def sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed`` DTensor (a parameter FSDP's ``fully_shard`` holds)."""
    return callable(getattr(t, "full_tensor", None))


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor gathered from every rank (a collective: every rank calls it), else ``t``.

    Outside FSDP's forward (its ``state_dict``, ``torch.distributed.checkpoint``'s key lookup) a
    parametrized tensor is computed from the sharded parameters; normfx's parametrizations compute it
    from the gathered ones, so the checkpoint holds the whole tensor under the original key."""
    return t.full_tensor() if sharded(t) else t  # type: ignore[attr-defined]


def _key(name: str, *rest: str) -> str:
    return ".".join(("parametrizations", name) + rest)


def normfx_parametrized(module: nn.Module) -> list[str]:
    """Names of ``module``'s tensors carrying exactly one normfx parametrization."""
    if not parametrize.is_parametrized(module):
        return []
    return [n for n, plist in module.parametrizations.items()
            if len(plist) == 1 and hasattr(plist[0], "fill_state")]


def _state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    names = normfx_parametrized(module)
    if not names:
        return
    # The hook runs after the module's whole subtree was saved: its keys are the dict's last ones,
    # so popping and re-inserting them keeps every other key where it was.
    moved = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    extras = {}
    values = {}
    for n in names:
        original = moved.pop(prefix + _key(n, "original"), None)
        p = module.parametrizations[n][0]
        values[n] = getattr(module, n).detach() if p.saves_current else original
        inner = prefix + _key(n, "0") + "."
        for k in [k for k in moved if k.startswith(inner)]:
            extras[k] = moved.pop(k)
    for n in getattr(module, "_normfx_own_keys", ()):
        if n in values:
            state_dict[prefix + n] = values[n]
        elif prefix + n in moved:
            state_dict[prefix + n] = moved.pop(prefix + n)
    state_dict.update(moved)
    state_dict.update(extras)


def _load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for n in normfx_parametrized(module):
        k = prefix + n
        if k not in state_dict:
            continue
        w = state_dict.pop(k)
        state_dict[prefix + _key(n, "original")] = w
        module.parametrizations[n][0].fill_state(state_dict, prefix + _key(n, "0") + ".", w)


def keep_state_dict_keys(module: nn.Module) -> None:
    """Register the hooks on ``module`` (once; call before its first parametrization)."""
    if hasattr(module, "_normfx_own_keys"):
        return
    module.__dict__["_normfx_own_keys"] = list(module._parameters) + list(module._buffers)
    getattr(module, "register_state_dict_post_hook", module._register_state_dict_hook)(_state_dict_hook)
    module._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
