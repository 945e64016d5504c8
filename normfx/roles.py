"""Parameter roles, found from the graph and module types, and what trains in a model.

Roles (a parameter may have several):

* ``"norm"``: every parameter a normalization layer owns itself (γ/β of BatchNorm of any kind,
  LayerNorm, GroupNorm, InstanceNorm, RMSNorm, timm's norm/norm-act/EvoNorm layers, normfx's
  RepBN/ProgressiveRepBN incl. RepBN's η). A Tune-mode ConvBN block keeps its BatchNorm module, so
  its γ/β are found the same way.
* ``"head"``: the output layer: walking the graph back from the output, the first Linear/Conv (or
  ``F.linear``/``F.conv*`` on a module's weight) on every path.
* ``"bias"``: the additive bias of Linear/Conv/ConvTranspose layers and of MultiheadAttention.
* ``"random"``: the trainable entries of the random control (``RandomEntries.values``).
* ``"other"``: everything else (frozen unless chosen at random).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from normfx.kinds import is_conv_like, is_norm_layer
from normfx.nn.freeze import RandomEntries
from normfx.report import Skip, SkipReason
from normfx.analysis import analyze
from normfx.trace import untraceable_modules

__all__ = ["ROLES", "param_roles", "head_layers", "find_heads", "owner_layer", "tensor_name", "TrainableSummary",
           "summarize", "trainable_summary"]

ROLES = ("norm", "head", "bias")
"""The roles ``normfx.freeze(keep=...)`` accepts."""

_FUNCTIONAL_HEADS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                     F.conv_transpose3d}


def owner_layer(param_name: str) -> str:
    """The layer a parameter belongs to: ``conv.parametrizations.weight.original`` -> ``conv``."""
    head, sep, _ = param_name.partition(".parametrizations.")
    if sep:
        return head
    if param_name.startswith("parametrizations."):
        return ""
    return param_name.rpartition(".")[0]


def tensor_name(param_name: str) -> str:
    """``conv.parametrizations.weight.original`` -> ``weight``; ``conv.bias`` -> ``bias``."""
    _, sep, rest = param_name.rpartition("parametrizations.")
    return rest.split(".")[0] if sep else param_name.rpartition(".")[2]


def head_layers(model: nn.Module) -> tuple[list[str], list[Skip]]:
    """Qualified names of the output layer(s), found from the graph, and what blocked the search.

    ``model`` must be traced (``normfx.trace``); a model whose root could not be traced has no graph
    to search, which the returned Skip says. ``find_heads`` does the same on any model.
    """
    if not isinstance(model, fx.GraphModule):
        why = dict(untraceable_modules(model)).get("", "the model's forward could not be traced")
        return [], [_no_graph(why)]
    return _heads_in(model, {q for q, _ in untraceable_modules(model)})


def _no_graph(why: str) -> Skip:
    return Skip("<output>", SkipReason.UNTRACEABLE, f"no graph to find the head in: {why}")


def _heads_in(model: fx.GraphModule, opaque: set[str]) -> tuple[list[str], list[Skip]]:
    """Walk the root graph back from the output to the first Linear/Conv on every path."""
    heads: list[str] = []
    skips: list[Skip] = []
    output = next(n for n in model.graph.nodes if n.op == "output")
    stack, seen = list(output.all_input_nodes), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module":
            m = model.get_submodule(n.target)
            if is_conv_like(m):
                heads.append(n.target)
                continue
            if isinstance(m, nn.MultiheadAttention):
                heads.append(f"{n.target}.out_proj")
                continue
            if n.target in opaque and not is_norm_layer(m) and next(m.parameters(), None) is not None:
                skips.append(Skip(n.target, SkipReason.UNTRACEABLE,
                                  "the output passes through this untraceable module; a head inside it "
                                  "is not marked"))
                continue
        elif n.op == "call_function" and n.target in _FUNCTIONAL_HEADS:
            w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                heads.append(w.target.rpartition(".")[0])
                continue
        stack.extend(n.all_input_nodes)
    return sorted(set(heads)), skips


def param_roles(model: nn.Module, heads: Iterable[str] = ()) -> dict[str, frozenset[str]]:
    """Roles of every parameter of ``model`` by qualified name (tied parameters: first name only)."""
    heads = set(heads)
    mods = dict(model.named_modules())
    roles: dict[str, frozenset[str]] = {}
    for name, _ in model.named_parameters():
        if name.endswith(".values") or name == "values":
            m = mods.get(name.rpartition(".")[0])
            if isinstance(m, RandomEntries):
                roles[name] = frozenset({"random"})
                continue
        layer = owner_layer(name)
        m = mods.get(layer)
        tensor = tensor_name(name)
        r = set()
        if m is not None:
            if is_norm_layer(m):
                r.add("norm")
            if (is_conv_like(m) and tensor == "bias") or (
                isinstance(m, nn.MultiheadAttention) and tensor in ("in_proj_bias", "bias_k", "bias_v")
            ):
                r.add("bias")
        if layer in heads:
            r.add("head")
        roles[name] = frozenset(r) if r else frozenset({"other"})
    return roles


@dataclass(frozen=True)
class TrainableSummary:
    """What trains in a model, in entries (scalars), not tensors.

    ``by_role``: trainable entries per role; an entry with two roles (a head's bias) counts in both.
    ``by_layer``: ``{layer: (trainable, total)}`` for every layer that owns parameters; the random
    control's entries count in the layer whose weight they belong to, and ``total`` counts each
    weight once.
    """

    total: int
    trainable: int
    by_role: dict[str, int] = field(default_factory=dict)
    by_layer: dict[str, tuple[int, int]] = field(default_factory=dict)
    heads: tuple[str, ...] = ()

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def summary(self) -> str:
        roles = ", ".join(f"{r} {n:,}" for r, n in self.by_role.items())
        return f"trainable: {self.trainable:,} of {self.total:,} ({100 * self.fraction:.3g}%): {roles}"

    def table(self) -> str:
        """A plain-text table, one row per layer."""
        w = max([len("layer")] + [len(k) for k in self.by_layer])
        rows = [f"{'layer':<{w}}  {'trainable':>12}  {'total':>12}"]
        rows += [f"{k or '<root>':<{w}}  {t:>12,}  {n:>12,}" for k, (t, n) in self.by_layer.items()]
        return "\n".join(rows + [self.summary()])

    def __str__(self) -> str:
        return self.summary()


def summarize(model: nn.Module, roles: dict[str, frozenset[str]], heads: Iterable[str]) -> TrainableSummary:
    by_role = {r: 0 for r in (*ROLES, "random", "other")}
    by_layer: dict[str, list[int]] = {}
    total = trainable = 0
    for name, p in model.named_parameters():
        layer = owner_layer(name)
        slot = by_layer.setdefault(layer, [0, 0])
        is_values = "random" in roles.get(name, ())
        if not is_values:
            slot[1] += p.numel()
            total += p.numel()
        if p.requires_grad:
            slot[0] += p.numel()
            trainable += p.numel()
            for r in roles.get(name, ("other",)):
                by_role[r] += p.numel()
    return TrainableSummary(total, trainable, by_role, {k: (t, n) for k, (t, n) in by_layer.items()},
                            tuple(heads))


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count what trains in ``model`` (entries per role and per layer); prints nothing.

    Works on any model: roles are found by tracing a structural copy (the model is not modified).

    Example:
        >>> m = normfx.freeze(torchvision.models.resnet18())
        >>> s = normfx.trainable_summary(m)
        >>> s.by_role["norm"], s.trainable
        (9600, 9600)
    """
    heads, _ = find_heads(model)
    return summarize(model, param_roles(model, heads), heads)


def find_heads(model: nn.Module) -> tuple[list[str], list[Skip]]:
    """``head_layers`` of any model: the root's graph is read from an analysis, which leaves
    ``model`` (whose module tree the result names) as it is and copies nothing."""
    analysis = analyze(model)
    root = next((gm for prefix, gm in analysis.regions if prefix == ""), None)
    if root is None:
        why = dict(analysis.untraceable).get("", "the model's forward could not be traced")
        return [], [_no_graph(why)]
    return _heads_in(root, {q for q, _ in analysis.untraceable})
