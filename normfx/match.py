"""Small graph helpers the passes share: use counts, attribute paths, module and parameter swaps.
(What a module *is* lives in ``normfx.kinds``.)"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from normfx.kinds import pruning_hooks

__all__ = ["module_uses", "is_functional_bn", "free_name", "get_attr", "set_module", "set_param", "module_tensors"]


def module_uses(gm: fx.GraphModule) -> Counter[int]:
    """How many graph nodes refer to each module object (by ``id``), aliases counted together."""
    mods = dict(gm.named_modules(remove_duplicate=False))
    uses: Counter[int] = Counter()
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target in mods:
            uses[id(mods[node.target])] += 1
    return uses


def called_modules(gm: fx.GraphModule) -> frozenset[str]:
    """The qualified names of the modules ``gm``'s graph calls."""
    return frozenset(str(n.target) for n in gm.graph.nodes if n.op == "call_module")


def inside_called_module(called: frozenset[str], qualname: str) -> str:
    """The module among ``called`` (``called_modules``) whose subtree holds ``qualname`` (a leaf the
    tracer kept, which may call it from a forward no graph shows), or ``""``: a change to
    ``qualname`` would reach that call."""
    parts = qualname.split(".")
    return next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in called), "")


def is_functional_bn(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (F.batch_norm,)


def free_name(gm: nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: the first attribute name ``gm`` does not have yet."""
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


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
    # Where ``name`` stood among the module's parameters (state_dict order): pruning and
    # parametrizations re-register it last, so it goes back to its place.
    order = list(module.__dict__.get("_normfx_own_keys") or
                 [name if k == name + "_orig" else k for k in module._parameters])
    unprune(module, name)
    if parametrize.is_parametrized(module, name):
        # leave_parametrized=False puts the untouched original back (True would ``set_`` it in place,
        # and the original may be shared with the caller's model).
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    setattr(module, name, nn.Parameter(value, requires_grad=requires_grad))
    if name in order:
        params = module._parameters
        ranked = sorted(params.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
        params.clear()
        params.update(ranked)


def unprune(module: nn.Module, name: str) -> bool:
    """Drop ``torch.nn.utils.prune``'s reparametrization of ``module.<name>`` (its hook, ``<name>_orig``
    and ``<name>_mask``) so that a new ``<name>`` can be set; whatever replaces it must already be
    computed from the pruned tensor. Unlike ``prune.remove`` it never writes into ``<name>_orig``
    (it may be shared with the caller's model). Returns whether there was one."""
    hooks = [k for k, h in pruning_hooks(module).items() if h._tensor_name == name]
    for k in hooks:
        del module._forward_pre_hooks[k]
        module._parameters.pop(name + "_orig", None)
        module._buffers.pop(name + "_mask", None)
        module.__dict__.pop(name, None)
    return bool(hooks)
