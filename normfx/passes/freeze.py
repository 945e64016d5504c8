"""The freeze that BN-only training needs (Frankle et al.): ``requires_grad`` from each parameter's
role (``normfx.roles``), the random control as its own parameters, and the deploy step that bakes it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Collection, Literal

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfx.errors import AlreadyTransformedError
from normfx.kinds import is_conv_like, is_norm_layer
from normfx.match import set_param
from normfx.nn.freeze import add_random_entries, keep_eval, random_entries
from normfx.report import Change, PassResult, Skip, SkipReason
from normfx.analysis import Outside
from normfx.config import check_int
from normfx.roles import ROLES, find_heads, owner_layer, param_roles, summarize, tensor_name
from normfx.scope import EVERYWHERE, Scope
from normfx.transform import Step, Transform

__all__ = ["freeze_model", "choose_entries", "choose_per_channel", "output_channels", "PER_CHANNEL",
           "bake_random_entries", "bake_random_entries_outside", "Role", "FreezeConfig", "FREEZE"]

PER_CHANNEL = 2
"""Entries the ``random="per_channel"`` control trains in each output channel of a conv/linear
weight: as many as a BatchNorm after it has (γ and β)."""

logger = logging.getLogger("normfx")

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


def output_channels(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The output channel of every entry of a conv/linear ``weight``, flattened (``long``).

    Conv and Linear hold output channels on dim 0; a transposed conv holds ``(in, out/groups, ...)``:
    the output channel of entry ``[i, j, ...]`` is ``(i // (in/groups)) · out/groups + j``."""
    shape = weight.shape
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        per_group_in = shape[0] // module.groups
        group = torch.arange(shape[0]) // per_group_in
        oc = group[:, None] * shape[1] + torch.arange(shape[1])[None, :]
        return oc.reshape(shape[0], shape[1], *([1] * (len(shape) - 2))).expand(shape).reshape(-1)
    return torch.arange(shape[0]).reshape(-1, *([1] * (len(shape) - 1))).expand(shape).reshape(-1)


def choose_per_channel(channels: torch.Tensor, per_channel: int, generator: torch.Generator) -> torch.Tensor:
    """``per_channel`` distinct flat positions drawn uniformly within each output channel (all of a
    channel's entries when it has fewer), sorted. ``channels[i]`` is entry ``i``'s output channel."""
    keys = torch.rand(channels.numel(), generator=generator)
    order = keys.argsort()
    order = order[channels[order].argsort(stable=True)]          # by channel, random within a channel
    sorted_ch = channels[order]
    starts = torch.searchsorted(sorted_ch, sorted_ch, right=False)
    rank = torch.arange(channels.numel()) - starts
    return order[rank < per_channel].sort().values


def _first_occurrence(x: torch.Tensor) -> torch.Tensor:
    """Indices of the first occurrence of each value, in order of appearance (draw order kept)."""
    _, inverse = torch.unique(x, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), x.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(x.numel()), reduce="amin")
    return first.sort().values


def freeze_stats(model: nn.Module, keep: set[str], excluded: Collection[str] = ()) -> list[str]:
    """Put every BatchNorm whose γ/β are frozen into permanent eval mode (but those in ``excluded``,
    which the caller keeps as they are); returns their names."""
    done = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats and name not in excluded:
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                continue
            m.training = False
            if keep_eval not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(keep_eval)
            done.append(name)
    return done



def freeze_model(model: nn.Module, keep: set[str], random: int | str, seed: int,
                 stats: bool, scope: Scope = EVERYWHERE) -> tuple[PassResult, tuple[str, ...]]:
    """Set every parameter's ``requires_grad`` from its roles; add the random control; report.

    ``model`` owns its tensors and keeps its module tree: only flags change, and the random control
    adds parametrizations. The graph is read from a traced twin. Sites are the layers that own
    parameters: each is reported with its trainable count; a layer ``scope`` excludes keeps its
    flags as they are and gives no entry to the random control.
    """
    heads, skips = find_heads(model)
    roles = param_roles(model, heads)
    _check_selects(model, keep, roles, heads, skips)
    excluded = _excluded_layers(model, scope)
    if scope.plan:
        return _plan(model, keep, roles, excluded, skips), ()
    for name, p in model.named_parameters():
        if owner_layer(name) not in excluded:
            p.requires_grad_(bool(roles[name] & keep))
    selected = sum(p.numel() for _, p in model.named_parameters() if p.requires_grad)
    if random == "match" and not selected:
        raise ValueError(
            f"random='match' draws as many entries as keep={tuple(sorted(keep))} selects, which is none here. "
            "For the paper's control pass the count: random=normfx.trainable_summary(normfx.freeze(model)).trainable"
        )
    existing = {f"{n}.{t}" if n else t: e for n, m in model.named_modules() for t, e in random_entries(m).items()}
    have = 0
    for e in existing.values():
        have += int(e.index.numel())
    per_channel = random == "per_channel"
    count = have if per_channel and existing else selected if random == "match" else 0 if per_channel else int(random)
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
    elif per_channel:
        skips += _add_per_channel(model, roles, keep, seed, excluded)
    elif count:
        skips += _add_random(model, roles, keep, count, seed, excluded)
    notes = []
    if stats:
        frozen_bn = freeze_stats(model, keep, excluded)
        notes.append(f"freeze_stats: {len(frozen_bn)} BatchNorm(s) with frozen γ/β run in eval mode")
        if not frozen_bn:
            logger.warning("freeze_stats=True but no BatchNorm has frozen γ/β (keep=%s)", sorted(keep))
    summary = summarize(model, param_roles(model, heads), heads)
    changes = []
    for layer, (t, n) in summary.by_layer.items():
        if layer in excluded:
            skips.append(excluded[layer])
            continue
        changes.append(Change(layer or "<root>", _action(t, n), f"{t:,} of {n:,} entries trainable"))
    notes.insert(0, summary.summary())
    if heads:
        notes.append("head: " + ", ".join(heads))
    return PassResult("freeze", tuple(changes), tuple(skips)), tuple(notes)


def _action(trainable: int, total: int) -> str:
    return "train" if trainable == total else "freeze" if trainable == 0 else "partial"


def _excluded_layers(model: nn.Module, scope: Scope) -> dict[str, Skip]:
    """The layers owning parameters that ``scope`` excludes, with the skip each reports."""
    if scope.everywhere:
        return {}
    layers = {owner_layer(n) for n, _ in model.named_parameters()}
    out = {}
    for layer in layers:
        skip = scope.skip(layer or "<root>", (layer, model.get_submodule(layer)))
        if skip is not None:
            out[layer] = skip
    return out


def _plan(model: nn.Module, keep: set[str], roles: dict[str, frozenset[str]], excluded: dict[str, Skip],
          skips: list[Skip]) -> PassResult:
    """What ``freeze`` would make trainable, layer by layer (the random control not drawn)."""
    counts: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        slot = counts.setdefault(owner_layer(name), [0, 0])
        slot[0] += p.numel() if roles[name] & keep else 0
        slot[1] += p.numel()
    changes = [Change(layer or "<root>", _action(t, n), f"{t:,} of {n:,} entries trainable")
               for layer, (t, n) in counts.items() if layer not in excluded]
    return PassResult("freeze", tuple(changes), tuple(skips) + tuple(excluded[k] for k in counts if k in excluded))


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


def _pool(model: nn.Module, roles: dict[str, frozenset[str]], keep: set[str],
          skips: list[Skip], excluded: dict[str, Skip]) -> list[tuple[str, nn.Parameter]]:
    """The frozen parameters a random control may draw from (tied and already parametrized ones are
    reported in ``skips`` and left out)."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    pool = []
    for name, p in frozen_entries(model, roles, keep):
        if owner_layer(name) in excluded:
            continue
        if owners.get(id(p), 0) > 1:
            skips.append(Skip(name, SkipReason.SHARED_MODULE, "tied parameter: not in the random control's pool"))
        elif ".parametrizations." in name or name.startswith("parametrizations."):
            skips.append(Skip(name, SkipReason.UNSUPPORTED, "already parametrized: not in the random control's pool"))
        else:
            pool.append((name, p))
    return pool


def _add_per_channel(model: nn.Module, roles: dict[str, frozenset[str]], keep: set[str], seed: int,
                     excluded: dict[str, Skip]) -> list[Skip]:
    """Frankle et al.'s control: ``PER_CHANNEL`` random entries in each output channel of every frozen
    conv/linear weight. Other frozen tensors (biases, norm parameters, embeddings) are not drawn from."""
    skips: list[Skip] = []
    g = torch.Generator().manual_seed(seed)
    drawn = 0
    for name, p in _pool(model, roles, keep, skips, excluded):
        layer = model.get_submodule(owner_layer(name))
        if tensor_name(name) != "weight" or not is_conv_like(layer) or p.dim() < 2:
            continue
        index = choose_per_channel(output_channels(layer, p), PER_CHANNEL, g)
        add_random_entries(layer, "weight", index)
        drawn += index.numel()
    if not drawn:
        raise ValueError(f"random='per_channel' found no frozen conv/linear weight in {type(model).__name__} "
                         "to draw from; use random=N to draw from every frozen tensor")
    return skips


def _add_random(model: nn.Module, roles: dict[str, frozenset[str]], keep: set[str], count: int,
                seed: int, excluded: dict[str, Skip]) -> list[Skip]:
    """Train ``count`` random entries of the frozen parameters (each in a ``RandomEntries``)."""
    skips: list[Skip] = []
    pool = _pool(model, roles, keep, skips, excluded)
    available = sum(p.numel() for _, p in pool)
    if count > available:
        raise ValueError(f"random={count:,} is more than the {available:,} frozen entries of "
                         f"{type(model).__name__} that can be drawn from")
    for (name, _), index in zip(pool, choose_entries([p.numel() for _, p in pool], count, seed)):
        if index.numel():
            add_random_entries(model.get_submodule(owner_layer(name)), tensor_name(name), index)
    return skips


def bake_random_entries(gm: fx.GraphModule, scope: Scope = EVERYWHERE) -> PassResult:
    """Deploy step: write each random control's trainable entries into its weight (a plain Parameter
    again, requiring grad since some of its entries did). A leaf change: the same step serves
    modules outside traced regions (``bake_random_entries_outside``)."""
    return _bake(list(gm.named_modules()), scope)


def bake_random_entries_outside(model: nn.Module, outside: list[Outside], scope: Scope = EVERYWHERE) -> PassResult:
    """``bake_random_entries`` on the modules no traced region calls."""
    return _bake([(o.qualname, o.module) for o in outside], scope)


def _bake(named: list[tuple[str, nn.Module]], scope: Scope) -> PassResult:
    changes = []
    named, skips = scope.split(named, lambda m: bool(random_entries(m)))
    for name, m in named:
        for tensor, entries in random_entries(m).items():
            value = getattr(m, tensor).detach().clone()
            set_param(m, tensor, value, requires_grad=True)
            changes.append(Change(f"{name}.{tensor}" if name else tensor, "bake",
                                  f"{entries.index.numel():,} random entries written into the weight"))
    return PassResult("bake_random_entries", tuple(changes), skips)


Role = Literal["norm", "head", "bias"]
"""A parameter role ``freeze(keep=...)`` can keep trainable (``normfx.roles.ROLES``)."""


@dataclass(frozen=True)
class FreezeConfig:
    """Options of ``normfx.freeze`` (see it for their meaning)."""

    keep: tuple[Role, ...] = ("norm",)
    random: int | Literal["match", "per_channel"] = 0
    seed: int = 0
    freeze_stats: bool = False

    def __post_init__(self) -> None:
        keep = (self.keep,) if isinstance(self.keep, str) else tuple(self.keep)
        unknown = [r for r in keep if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown role(s) {unknown} in keep; the roles are {list(ROLES)}")
        object.__setattr__(self, "keep", keep)
        if not (self.random in ("match", "per_channel")
                or (isinstance(self.random, int) and not isinstance(self.random, bool) and self.random >= 0)):
            raise ValueError(f"random must be a non-negative int, 'match' or 'per_channel', got {self.random!r}")
        check_int("seed", self.seed)


def _freeze_step(model: nn.Module, scope: Scope, c: FreezeConfig) -> tuple[PassResult, tuple[str, ...]]:
    return freeze_model(model, set(c.keep), c.random, c.seed, c.freeze_stats, scope)


FREEZE = Transform(
    name="freeze", config=FreezeConfig, exact=False, tensors="own",
    steps=lambda c: (Step("freeze", model_pass=partial(_freeze_step, c=c)),),
    summary="train the roles kept (BatchNorm's γ/β by default) and freeze the rest; the random controls",
    paper="Frankle et al., Training BatchNorm and Only BatchNorm (ICLR 2021)",
    deploy=(Step("bake_random_entries", bake_random_entries, bake_random_entries_outside),),
    page="freeze.md",
    inspect=(("freeze", FreezeConfig()),),
)
