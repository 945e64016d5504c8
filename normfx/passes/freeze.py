"""Parameter roles found from the graph and module types, and the freeze that uses them.

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

import copy
import logging
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from normfx.errors import AlreadyTransformedError
from normfx.kinds import is_conv_like, is_norm_layer
from normfx.match import module_tensors, set_param
from normfx.nn.freeze import RandomEntries, add_random_entries, keep_eval, random_entries
from normfx.report import Change, PassResult, Skip, SkipReason
from normfx.trace import Outside, trace_regions, untraceable_modules

__all__ = [
    "ROLES", "is_norm_layer", "param_roles", "head_layers", "TrainableSummary", "trainable_summary",
    "freeze_model", "bake_random_entries", "bake_random_entries_outside",
]

logger = logging.getLogger("normfx")

ROLES = ("norm", "head", "bias")
"""The roles ``normfx.freeze(keep=...)`` accepts."""

_FUNCTIONAL_HEADS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                     F.conv_transpose3d}


def _owner(param_name: str) -> str:
    """The layer a parameter belongs to: ``conv.parametrizations.weight.original`` -> ``conv``."""
    head, sep, _ = param_name.partition(".parametrizations.")
    if sep:
        return head
    if param_name.startswith("parametrizations."):
        return ""
    return param_name.rpartition(".")[0]


def _tensor_name(param_name: str) -> str:
    """``conv.parametrizations.weight.original`` -> ``weight``; ``conv.bias`` -> ``bias``."""
    _, sep, rest = param_name.rpartition("parametrizations.")
    return rest.split(".")[0] if sep else param_name.rpartition(".")[2]


def head_layers(model: nn.Module) -> tuple[list[str], list[Skip]]:
    """Qualified names of the output layer(s), found from the graph, and what blocked the search.

    ``model`` must be traced (``normfx.trace``); a model whose root could not be traced has no graph
    to search, which the returned Skip says.
    """
    heads: list[str] = []
    skips: list[Skip] = []
    if not isinstance(model, fx.GraphModule):
        why = dict(untraceable_modules(model)).get("", "the model's forward could not be traced")
        return [], [Skip("<output>", SkipReason.UNTRACEABLE, f"no graph to find the head in: {why}")]
    opaque = {q for q, _ in untraceable_modules(model)}
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
        layer = _owner(name)
        m = mods.get(layer)
        tensor = _tensor_name(name)
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


def _summarize(model: nn.Module, roles: dict[str, frozenset[str]], heads: Iterable[str]) -> TrainableSummary:
    by_role = {r: 0 for r in (*ROLES, "random", "other")}
    by_layer: dict[str, list[int]] = {}
    total = trainable = 0
    for name, p in model.named_parameters():
        layer = _owner(name)
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
    return _summarize(model, param_roles(model, heads), heads)


def find_heads(model: nn.Module) -> tuple[list[str], list[Skip]]:
    """``head_layers`` of ``model`` found on a traced twin that shares its tensors: the graph is
    only read, and ``model`` (whose module tree the result names) is left as it is."""
    if isinstance(model, fx.GraphModule):
        return head_layers(model)
    twin = copy.deepcopy(model, {id(t): t for t in module_tensors(model)})
    return head_layers(trace_regions(twin))


def frozen_entries(model: nn.Module, roles: dict[str, frozenset[str]],
                   keep: set[str]) -> list[tuple[str, nn.Parameter]]:
    """Parameters ``keep`` does not select, in ``named_parameters`` order (floating point only)."""
    return [(n, p) for n, p in model.named_parameters()
            if p.is_floating_point() and not (roles[n] & keep) and "random" not in roles[n]]


def choose_entries(sizes: list[int], count: int, seed: int) -> list[torch.Tensor]:
    """``count`` distinct flat positions drawn uniformly over tensors of ``sizes`` entries, split per
    tensor (sorted). Deterministic in ``seed``."""
    total = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    if count * 4 >= total:
        flat = torch.randperm(total, generator=g)[:count]
    else:
        picked = torch.empty(0, dtype=torch.long)
        while picked.numel() < count:
            more = torch.randint(total, (2 * (count - picked.numel()) + 16,), generator=g)
            picked = torch.cat([picked, more])
            picked = picked[_first_occurrence(picked)]
        flat = picked[:count]
    flat, _ = flat.sort()
    out, start = [], 0
    for n in sizes:
        lo = torch.searchsorted(flat, start)
        hi = torch.searchsorted(flat, start + n)
        out.append(flat[lo:hi] - start)
        start += n
    return out


def _first_occurrence(x: torch.Tensor) -> torch.Tensor:
    """Indices of the first occurrence of each value, in order of appearance (draw order kept)."""
    _, inverse = torch.unique(x, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), x.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(x.numel()), reduce="amin")
    return first.sort().values


def freeze_stats(model: nn.Module, keep: set[str]) -> list[str]:
    """Put every BatchNorm whose γ/β are frozen into permanent eval mode; returns their names."""
    done = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                continue
            m.training = False
            if keep_eval not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(keep_eval)
            done.append(name)
    return done



def freeze_model(model: nn.Module, keep: set[str], random: int | str, seed: int,
                 stats: bool) -> tuple[PassResult, tuple[str, ...]]:
    """Set every parameter's ``requires_grad`` from its roles; add the random control; report.

    ``model`` owns its tensors and keeps its module tree: only flags change, and the random control
    adds parametrizations. The graph is read from a traced twin. Sites are the layers that own
    parameters: each is reported with its trainable count.
    """
    heads, skips = find_heads(model)
    roles = param_roles(model, heads)
    _check_selects(model, keep, roles, heads, skips)
    for name, p in model.named_parameters():
        p.requires_grad_(bool(roles[name] & keep))
    selected = sum(p.numel() for _, p in model.named_parameters() if p.requires_grad)
    if random == "match" and not selected:
        raise ValueError(
            f"random='match' draws as many entries as keep={tuple(sorted(keep))} selects, which is none here. "
            "For the paper's control pass the count: random=normfx.trainable_summary(normfx.freeze(model)).trainable"
        )
    count = selected if random == "match" else int(random)
    existing = {f"{n}.{t}" if n else t: e for n, m in model.named_modules() for t, e in random_entries(m).items()}
    have = sum(e.index.numel() for e in existing.values())
    if existing and count and count != have:
        raise AlreadyTransformedError(
            f"{type(model).__name__} already has a random control of {have:,} entries (normfx.freeze(random=...)); "
            f"asked for {count:,}. Freeze the original model instead, or normfx.deploy(model) to bake the control "
            "first."
        )
    if existing and count:
        # Applied to its own output: the control in place is the one asked for; keep it training.
        for site, e in existing.items():
            e.values.requires_grad_(True)
            skips.append(Skip(site, SkipReason.ALREADY_DONE,
                              f"random control already in place ({e.index.numel():,} entries)"))
    elif count:
        skips += _add_random(model, roles, keep, count, seed)
    notes = []
    if stats:
        frozen_bn = freeze_stats(model, keep)
        notes.append(f"freeze_stats: {len(frozen_bn)} BatchNorm(s) with frozen γ/β run in eval mode")
        if not frozen_bn:
            logger.warning("freeze_stats=True but no BatchNorm has frozen γ/β (keep=%s)", sorted(keep))
    summary = _summarize(model, param_roles(model, heads), heads)
    changes = []
    for layer, (t, n) in summary.by_layer.items():
        action = "train" if t == n else "freeze" if t == 0 else "partial"
        changes.append(Change(layer or "<root>", action, f"{t:,} of {n:,} entries trainable"))
    notes.insert(0, summary.summary())
    if heads:
        notes.append("head: " + ", ".join(heads))
    return PassResult("freeze", tuple(changes), tuple(skips)), tuple(notes)


def _check_selects(model: nn.Module, keep: set[str], roles: dict[str, frozenset[str]], heads: list[str],
                   skips: list[Skip]) -> None:
    found = {r for rs in roles.values() for r in rs}
    name = type(model).__name__
    if "norm" in keep and "norm" not in found:
        bufs_only = sorted({type(m).__name__ for m in model.modules() if is_norm_layer(m)})
        extra = (f" (its {', '.join(bufs_only)} layers have no affine parameters)" if bufs_only else "")
        raise ValueError(
            f"keep includes 'norm' but {name} has no normalization layer with parameters{extra}: "
            "there is nothing to train. Add normalization layers, or keep other roles "
            "(keep=('head',) trains the output layer)."
        )
    if "head" in keep and not heads:
        why = "; ".join(f"{s.site}: {s.detail}" for s in skips) or "no Linear/Conv feeds the output"
        raise ValueError(f"keep includes 'head' but the output layer of {name} was not found from the graph: "
                         f"{why}")
    if "bias" in keep and "bias" not in found:
        logger.warning("keep includes 'bias' but %s has no Linear/Conv bias", name)


def _add_random(model: nn.Module, roles: dict[str, frozenset[str]], keep: set[str], count: int,
                seed: int) -> list[Skip]:
    """Train ``count`` random entries of the frozen parameters (each in a ``RandomEntries``)."""
    skips = []
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    pool = []
    for name, p in frozen_entries(model, roles, keep):
        if owners.get(id(p), 0) > 1:
            skips.append(Skip(name, SkipReason.SHARED_MODULE, "tied parameter: not in the random control's pool"))
        elif ".parametrizations." in name or name.startswith("parametrizations."):
            skips.append(Skip(name, SkipReason.UNSUPPORTED, "already parametrized: not in the random control's pool"))
        else:
            pool.append((name, p))
    available = sum(p.numel() for _, p in pool)
    if count > available:
        raise ValueError(f"random={count:,} is more than the {available:,} frozen entries of "
                         f"{type(model).__name__} that can be drawn from")
    for (name, _), index in zip(pool, choose_entries([p.numel() for _, p in pool], count, seed)):
        if index.numel():
            add_random_entries(model.get_submodule(_owner(name)), _tensor_name(name), index)
    return skips


def bake_random_entries(gm: fx.GraphModule) -> PassResult:
    """Deploy step: write each random control's trainable entries into its weight (a plain Parameter
    again, requiring grad since some of its entries did). A leaf change: the same step serves
    modules outside traced regions (``bake_random_entries_outside``)."""
    return PassResult("bake_random_entries", tuple(_bake(list(gm.named_modules()))))


def bake_random_entries_outside(model: nn.Module, outside: list[Outside]) -> PassResult:
    """``bake_random_entries`` on the modules no traced region calls."""
    return PassResult("bake_random_entries", tuple(_bake([(o.qualname, o.module) for o in outside])))


def _bake(named: list[tuple[str, nn.Module]]) -> list[Change]:
    changes = []
    for name, m in named:
        for tensor, entries in random_entries(m).items():
            value = getattr(m, tensor).detach().clone()
            set_param(m, tensor, value, requires_grad=True)
            changes.append(Change(f"{name}.{tensor}" if name else tensor, "bake",
                                  f"{entries.index.numel():,} random entries written into the weight"))
    return changes
