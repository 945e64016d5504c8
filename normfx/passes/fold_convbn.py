"""Replaces ``BN(conv(x))`` with a Tune-mode block or with one folded conv (Deploy).

Math (exact): with ``c = γ/sqrt(σ̂² + ε)``, ``ω' = ω·c`` and ``b' = (b − μ̂)·c + β``, so
``conv_{ω',b'}(x) = BN_eval(conv_{ω,b}(x))``. In Deploy mode it is computed once, in float64, and
cast back to the weight's dtype. In Tune mode it is recomputed inside autograd every forward
(``normfx.nn.tune_convbn``). A BN directly before a conv folds forward into that conv in Deploy mode
where that is exact: the conv must not zero-pad (zeros would no longer pass through the affine).

Sites are BatchNorm calls: BatchNorm{1,2,3}d modules and subclasses, SyncBatchNorm, FrozenBatchNorm,
timm's BatchNormAct (the activation stays after the folded conv), functional ``F.batch_norm`` with
running statistics, and existing Tune blocks (Deploy folds them; Tune reports them as already done).
Every site is transformed or skipped with a ``SkipReason``.
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfx.errors import TrainingModeError
from normfx.functional import BNStats, bn_scale_shift, fold_bn_after, fold_bn_before, scale_is_safe
from normfx.kinds import bn_kind, eval_affine, fold_refusal, is_conv_like
from normfx.match import called_modules, inside_called_module, is_functional_bn, module_uses, set_module, set_param
from normfx.nn.convbn import TuneBN, tune_convbn, tuned_pair
from normfx.passes.merge_branches import merge_branches, merge_branches_outside
from normfx.passes.tune_blocks import make_tune_block, untune_modules, untune_node
from normfx.passes.convbn_sites import (Ctx, Site, Unsupported, dims_match, frozen, functional_name, guard,
                                        is_tune_node, producer_problem, prune_note, rank, set_weights, shape,
                                        single_conv_user, value_users)
from normfx.report import Change, PassResult, Skip, SkipReason
from normfx.analysis import Outside
from normfx.config import check_choice
from normfx.scope import EVERYWHERE, Scope
from normfx.transform import Step, Transform

__all__ = ["fold_convbn", "fold_convbn_outside", "ConvBNMode", "ConvBNConfig", "CONVBN", "TrainingModeError"]

ConvBNMode = Literal["tune", "deploy"]

def fold_convbn(gm: fx.GraphModule, scope: Scope = EVERYWHERE, *, mode: ConvBNMode) -> PassResult:
    """Replaces ``BN(conv(x))`` with ``tune_convbn(x, conv, bn)`` (tune) or one folded conv (deploy).

    Mutates ``gm`` in place and returns what it did, site by site.

    Raises:
        TrainingModeError: in Deploy mode, when a BatchNorm that could be folded is in training mode.
    """
    if mode not in ("tune", "deploy"):
        raise ValueError(f"mode must be 'tune' or 'deploy', got {mode!r}")
    graph = gm.graph
    ctx = Ctx(gm, dict(gm.named_modules(remove_duplicate=False)), module_uses(gm), called_modules(gm), scope, {})
    sites = []
    for node in list(graph.nodes):
        m = ctx.module(node) if node.op == "call_module" else None
        if m is not None and (bn_kind(m) is not None or _looks_like_bn(m) or eval_affine(m) is not None):
            sites.append(node)
        elif is_functional_bn(node) or is_tune_node(node):
            sites.append(node)
    changes: list[Change] = []
    skips: list[Skip] = []
    if mode == "deploy":
        for node in sites:
            if node.op == "call_module" or node.target is tune_convbn:
                m = ctx.module(node if node.op == "call_module" else node.args[2])
                name = str(node.target if node.op == "call_module" else node.args[2].target)
                if m is not None and m.training and bn_kind(m) is not None and not frozen(m) \
                        and scope.skip(name, (name, m)) is None:
                    raise TrainingModeError(
                        f"BatchNorm '{name}' is in training mode; call model.eval() before mode='deploy'"
                    )
    for node in sites:
        m = ctx.module(node) if node.op == "call_module" else None
        affine = m is not None and eval_affine(m) is not None
        result = _visit_affine(ctx, node, mode) if affine else _visit(ctx, node, mode)
        if isinstance(result, Change):
            changes.append(result)
        else:
            skips.append(result)
    if changes and not scope.plan:
        _drop_dead_attrs(gm)
        graph.lint()
        gm.recompile()
    return PassResult("fold_convbn", tuple(changes), tuple(skips))


def fold_convbn_outside(model: nn.Module, outside: list[Outside], scope: Scope = EVERYWHERE, *,
                        mode: ConvBNMode) -> PassResult:
    """BatchNorms no traced region calls: a fold needs the conv that feeds them, which only a graph
    shows, so each is reported with the reason its forward was not traced."""
    skips = []
    for o in outside:
        affine = eval_affine(o.module)
        if bn_kind(o.module) is not None or _looks_like_bn(o.module) or affine is not None:
            why = (SkipReason.UNSUPPORTED, affine) if isinstance(affine, str) else (SkipReason.UNTRACEABLE, o.why)
            skips.append(scope.skip(o.qualname, (o.qualname, o.module)) or Skip(o.qualname, *why))
    return PassResult("fold_convbn", (), tuple(skips))


def _visit_affine(ctx: Ctx, node: Any, mode: ConvBNMode) -> Change | Skip:
    """A normalization that is a constant affine ``x·γ + β`` (``normfx.kinds.eval_affine``: an EvoNorm
    without its nonlinearity, in training and eval alike) folds into the conv that produces it in
    Deploy, as a BatchNorm's affine does; one that says it is not one is skipped with its reason."""
    m, name = ctx.module(node), str(node.target)
    affine = eval_affine(m)
    if isinstance(affine, str):
        return Skip(name, SkipReason.UNSUPPORTED, affine)
    what = f"{type(m).__name__} without nonlinearity (x·γ + β)"
    if mode == "tune":
        return Skip(name, SkipReason.UNSUPPORTED, f"{what}: no statistics to tune with; Deploy folds it")
    producer = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    conv: Any = ctx.module(producer) if isinstance(producer, fx.Node) and producer.op == "call_module" else None
    if not is_conv_like(conv):
        return Skip(name, SkipReason.UNSUPPORTED, f"{what}: not fed by a conv/linear")
    if ctx.uses[id(m)] > 1:
        return Skip(name, SkipReason.SHARED_MODULE, f"{what}: called at several places")
    problem = producer_problem(ctx, producer, conv)
    if problem:
        return Skip(name, problem[0], f"{what}: {problem[1]}")
    hooked = guard(ctx, m, name, conv, producer.target)
    if hooked:
        return hooked
    assert affine is not None
    gamma, beta = affine
    if getattr(conv, "out_channels", None) != gamma.numel():     # a Linear has none: not channels-first
        return Skip(name, SkipReason.UNSUPPORTED,
                    f"{what}: '{producer.target}' is not a conv with {gamma.numel()} output channels")
    if fold_refusal(conv):
        return Skip(name, SkipReason.UNSUPPORTED, fold_refusal(conv))
    note = prune_note(conv, producer.target)
    if ctx.scope.plan:
        return Change(name, "fold", f"{what} into {producer.target}{note}")
    w, b = fold_bn_after(conv.weight, conv.bias, None, transposed=bool(getattr(conv, "transposed", False)),
                         groups=getattr(conv, "groups", 1),
                         scale_shift=(gamma.detach().to(torch.float64), beta.detach().to(torch.float64)))
    set_param(conv, "weight", w, requires_grad=conv.weight.requires_grad or gamma.requires_grad)
    set_param(conv, "bias", b, requires_grad=(conv.bias is not None and conv.bias.requires_grad)
              or gamma.requires_grad or beta.requires_grad)
    set_module(ctx.gm, name, nn.Identity().train(m.training))
    return Change(name, "fold", f"{what} into {producer.target}{note}")


def _looks_like_bn(m: Any | None) -> bool:
    """A BatchNorm subclass we cannot interpret: still a site, reported as unsupported."""
    return isinstance(m, _BatchNorm)


def _visit(ctx: Ctx, node: Any, mode: ConvBNMode) -> Change | Skip:
    gm, uses = ctx.gm, ctx.uses
    if mode == "tune" and is_tune_node(node):
        name = str(node.args[2].target) if node.target is tune_convbn else functional_name(
            node, {"running_mean": node.args[2]})
        return Skip(name, SkipReason.ALREADY_DONE, "already a Tune block")
    bn = ctx.module(node) if node.op == "call_module" else None
    if isinstance(bn, TuneBN):
        if mode == "tune":
            return Skip(str(node.target), SkipReason.ALREADY_DONE, "already a Tune block")
        conv_name = next((n for n, m in ctx.mods.items() if tuned_pair(m) is bn), "")
        excluded = ctx.scope.skip(str(node.target), (str(node.target), bn), (conv_name, ctx.mods.get(conv_name)))
        if excluded:
            return excluded
        if ctx.scope.plan:
            return Change(str(node.target), "fold", "Tune block: folded into its conv, or back to conv -> BN "
                          "where it cannot fold")
        untune_modules(ctx, bn)
        result = _visit(ctx, node, mode)
        if isinstance(result, Skip):
            # Deploy leaves no Tune block behind: an unfoldable one is conv -> BN again.
            return Change(result.site, "revert",
                          f"Tune block back to conv -> BN: {result.reason.value}: {result.detail}")
        return Change(result.site, result.action, f"Tune block {result.detail}")
    try:
        site = Site(ctx, node)
    except Unsupported as e:
        return Skip(node.name, SkipReason.UNSUPPORTED, str(e))
    if site.module is not None and bn_kind(site.module) is None:
        return Skip(site.name, SkipReason.UNSUPPORTED, f"{type(site.module).__name__} has its own forward")
    if site.stats is None:
        return Skip(site.name, SkipReason.NO_RUNNING_STATS, "BatchNorm uses batch statistics in eval mode")
    if site.extra:
        return Skip(site.name, SkipReason.UNSUPPORTED, "BatchNorm called with extra arguments")
    if node.op == "call_function" and not is_tune_node(node) and site.training:
        return Skip(site.name, SkipReason.TRAINING_MODE, "functional batch_norm traced with training=True")
    if site.module is not None and uses[id(site.module)] > 1:
        if mode == "deploy":
            return _fold_shared(ctx, site)
        return Skip(site.name, SkipReason.SHARED_MODULE, "BatchNorm module is called at several places")

    if is_tune_node(node):
        return _deploy_tune_block(ctx, site)

    producer = site.input
    conv = ctx.module(producer) if isinstance(producer, fx.Node) and producer.op == "call_module" else None
    if is_conv_like(conv):
        why = dims_match(conv, site.module, site.stats)
        if why:
            return Skip(site.name, SkipReason.UNSUPPORTED, why)
        problem = producer_problem(ctx, producer, conv)
        if problem:
            return Skip(site.name, *problem)
        if isinstance(conv, nn.Linear) and rank(producer) not in (None, 2):
            return Skip(site.name, SkipReason.UNSUPPORTED, "Linear output is not [N, C]")
        if mode == "tune":
            excluded = ctx.scope.skip(site.name, (site.name, site.module) if site.module is not None else ("", None),
                                      (str(producer.target), conv))
            if excluded or ctx.scope.plan:
                return excluded or Change(site.name, "tune", f"{producer.target} + {site.name}")
            return make_tune_block(gm, site, producer)
        return guard(ctx, site.module, site.name, conv, producer.target) or _fold_after(ctx, site, producer, conv)

    follower = single_conv_user(ctx, node)
    fold_after = _fold_after_layout(ctx, producer) if mode == "deploy" else None
    if fold_after is not None:
        after = fold_after(ctx, site)
        if isinstance(after, Change) or follower is None:
            return after     # else: it may still fold into the conv after it (InceptionNeXt's cat -> BN -> 1x1)
    if follower is not None and mode == "deploy":
        return (guard(ctx, site.module, site.name, ctx.module(follower), follower.target, before=True)
                or _fold_before(ctx, site, follower))
    if follower is not None:
        return Skip(site.name, SkipReason.UNSUPPORTED, "BatchNorm before a conv folds in deploy mode only")
    return Skip(site.name, SkipReason.NO_NEIGHBOUR, "input is not a conv/linear output" + _pre_activation(ctx, node))


def _fold_after_layout(ctx: Ctx, producer: Any) -> Any:
    """The Deploy fold for a BatchNorm whose input is a channel concatenation, a reshape or a channel
    split of conv outputs (``fold(ctx, site)``), else ``None``."""
    if _channel_cat(producer) is not None:
        return partial(_fold_after_cat, cat=producer)
    if _reshape_source(producer) is not None:
        return partial(_fold_through_reshape, reshaped=producer)
    part = _split_part(ctx, producer)
    return None if part is None else partial(_fold_after_split, part=producer, found=part)


def _pre_activation(ctx: Ctx, node: fx.Node) -> str:
    """``, and an activation separates it from the conv after it`` for a pre-activation BN → act →
    conv (a fold before the conv would need the activation to be linear), else ``""``."""
    if len(node.users) != 1:
        return ""
    act = next(iter(node.users))
    if len(act.users) == 1 and single_conv_user(ctx, act) is not None:
        return f", and '{act.name}' (an activation) separates it from the conv after it (pre-activation)"
    return ""


def _refused(site: Site, conv: Any) -> Skip | None:
    why = fold_refusal(conv)
    return Skip(site.name, SkipReason.UNSUPPORTED, why) if why else None


def _checked_fold(site: Site, conv: Any, plan: bool = False,
                  channels: slice | None = None) -> tuple[torch.Tensor, torch.Tensor] | Skip | None:
    """The folded ``(weight, bias)``, or why the fold is refused; ``plan``: only check (``None``).
    ``channels``: the BatchNorm normalizes only these output channels of the conv (the others are
    scaled by 1)."""
    refused = _refused(site, conv)
    if refused is not None:
        return refused
    c, t = bn_scale_shift(site.stats)
    if channels is not None:
        c_all, t_all = c.new_ones(conv.out_channels), t.new_zeros(conv.out_channels)
        c_all[channels], t_all[channels] = c, t
        c, t = c_all, t_all
    ok, why = scale_is_safe(c, conv.weight)
    if not ok:
        return Skip(site.name, SkipReason.NON_FINITE, why)
    if plan:
        return None
    return fold_bn_after(
        conv.weight, conv.bias, site.stats, transposed=bool(getattr(conv, "transposed", False)),
        groups=getattr(conv, "groups", 1), scale_shift=(c, t),
    )


def _replace_bn_by_tail(ctx: Ctx, site: Site, result: fx.Node) -> None:
    """Route the BN's users to ``result`` (the folded conv), keeping a norm-act's activation."""
    gm, node = ctx.gm, site.node
    if site.module is not None:
        # A leaf change: the BN's slot holds what is left of it (nn.Identity, or a norm-act
        # layer's activation), so the parent's forward needs no rewrite.
        set_module(gm, site.name, _tail(site.module))
        return
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)


def _tail(bn: Any) -> nn.Module:
    """What a folded BatchNorm leaves in its slot (in the BN's mode: a new module must not come
    back in training mode)."""
    if bn_kind(bn) != "norm_act":
        return nn.Identity().train(bn.training)
    return bn.act if isinstance(bn.drop, nn.Identity) else nn.Sequential(bn.drop, bn.act).train(bn.training)


def _fold_after(ctx: Ctx, site: Site, producer: Any, conv: Any) -> Change | Skip:
    folded = _checked_fold(site, conv, ctx.scope.plan)
    if isinstance(folded, Skip):
        return folded
    if folded is None:   # a dry run
        return Change(site.name, "fold", f"into {producer.target}{prune_note(conv, producer.target)}")
    note = set_weights(conv, producer.target, *folded, site)
    _replace_bn_by_tail(ctx, site, producer)
    return Change(site.name, "fold", f"into {producer.target}{note}")


def _fold_shared(ctx: Ctx, site: Site) -> Change | Skip:
    """A BatchNorm module called at several places (a Siamese backbone run on two views): the fold is
    exact when every call normalizes the output of the same conv, that conv is called nowhere else,
    and each of its outputs feeds only the BatchNorm. Folded once, at its first call; each call is
    reported."""
    bn = site.module
    first = ctx.shared_folds.get(id(bn))
    if first is not None:
        return Change(site.name, "fold", f"another call of the pair folded at its first call ({first})")
    calls = [n for n in ctx.gm.graph.nodes if n.op == "call_module" and ctx.mods.get(n.target) is bn]
    producers = [n.args[0] if len(n.args) == 1 and not n.kwargs else None for n in calls]
    convs = {id(ctx.module(p)) for p in producers if isinstance(p, fx.Node) and p.op == "call_module"}
    conv: Any = ctx.module(producers[0]) if isinstance(producers[0], fx.Node) else None
    shared = "BatchNorm module is called at several places"
    if len(convs) != 1 or None in producers or not is_conv_like(conv):
        return Skip(site.name, SkipReason.SHARED_MODULE, f"{shared}, not every call after the same conv/linear")
    if (ctx.uses[id(conv)] != len(calls) or any(len(p.users) > 1 for p in producers)
            or inside_called_module(ctx.called, str(producers[0].target))):
        return Skip(site.name, SkipReason.SHARED_MODULE,
                    f"{shared}; its conv '{producers[0].target}' is also called or used elsewhere")
    why = dims_match(conv, bn, site.stats)
    if why:
        return Skip(site.name, SkipReason.UNSUPPORTED, why)
    if isinstance(conv, nn.Linear) and any(rank(p) not in (None, 2) for p in producers):
        return Skip(site.name, SkipReason.UNSUPPORTED, "Linear output is not [N, C]")
    conv_name = producers[0].target
    skip = guard(ctx, bn, site.name, conv, conv_name)
    folded = skip or _checked_fold(site, conv, ctx.scope.plan)
    if isinstance(folded, Skip):
        return folded
    ctx.shared_folds[id(bn)] = site.name
    detail = f"into {conv_name} (the pair is called at {len(calls)} places: folded once)"
    if folded is None:   # a dry run
        return Change(site.name, "fold", detail)
    note = set_weights(conv, conv_name, *folded, site)
    set_module(ctx.gm, site.name, _tail(bn))
    return Change(site.name, "fold", detail + note)


def _channel_cat(node: Any) -> list | None:
    """The inputs of ``torch.cat(inputs, 1)`` (a concatenation along the channel axis), else ``None``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in (torch.cat, torch.concat)):
        return None
    args = dict(zip(("tensors", "dim"), node.args))
    args.update(node.kwargs)
    tensors = args.get("tensors")
    return list(tensors) if args.get("dim", 0) == 1 and isinstance(tensors, (list, tuple)) else None


def _fold_after_cat(ctx: Ctx, site: Site, cat: fx.Node) -> Change | Skip:
    """``BN(cat([conv_1(..), conv_2(..), ...], 1))`` (MixNet's mixed-kernel convs): the BatchNorm
    is per channel, so each conv takes the slice of it over its own output channels. Exact when every
    input is a conv's output used by the concatenation alone and each conv is called once."""
    inputs = _channel_cat(cat) or []
    convs: list[Any] = [ctx.module(n) if isinstance(n, fx.Node) and n.op == "call_module" else None for n in inputs]
    what = "BatchNorm after a concatenation"
    others = [n for n, c in zip(inputs, convs) if c is None or not is_conv_like(c) or isinstance(c, nn.Linear)]
    if not inputs or others:
        names = ", ".join(f"'{getattr(n, 'name', n)}'" for n in others[:2]) + (", ..." if len(others) > 2 else "")
        shared = sum(isinstance(n, fx.Node) and len(n.users) > 1 for n in inputs)
        return Skip(site.name, SkipReason.NO_NEIGHBOUR,
                    f"{what} of something other than conv outputs ({names})"
                    + (f"; {shared} of its {len(inputs)} inputs feed other layers too (a DenseNet-style "
                       "shared concatenation): no conv can take the BatchNorm" if shared else ""))
    if len(cat.users) > 1:
        return Skip(site.name, SkipReason.MULTI_USER, f"{what}: the concatenation has other users")
    if len(set(inputs)) != len(inputs):
        return Skip(site.name, SkipReason.MULTI_USER, f"{what}: one conv output is concatenated twice")
    for n, c in zip(inputs, convs):
        problem = producer_problem(ctx, n, c)
        if problem:
            return Skip(site.name, problem[0], f"{what}: {problem[1]}")
    widths = [c.out_channels for c in convs]
    if sum(widths) != site.stats.mean.numel():
        return Skip(site.name, SkipReason.UNSUPPORTED,
                    f"{what}: the convs produce {sum(widths)} channels, the BatchNorm has {site.stats.mean.numel()}")
    folds: list[tuple[fx.Node, Any, Site, tuple[torch.Tensor, torch.Tensor]]] = []
    start = 0
    for n, c, width in zip(inputs, convs, widths):
        part = slice(start, start + width)
        start += width
        st = site.stats
        piece = copy.copy(site)       # the site, with its BatchNorm's slice over this conv's channels
        piece.stats = BNStats(st.mean[part], st.var[part], None if st.weight is None else st.weight[part],
                              None if st.bias is None else st.bias[part], st.eps)
        skip = guard(ctx, site.module, site.name, c, n.target)
        folded = skip or _checked_fold(piece, c, ctx.scope.plan)
        if isinstance(folded, Skip):
            return folded
        if folded is not None:       # None: a dry run
            folds.append((n, c, piece, folded))
    names = ", ".join(str(n.target) for n in inputs)
    if ctx.scope.plan:
        return Change(site.name, "fold", f"split over the concatenated {names}")
    notes = "".join(set_weights(c, n.target, w, b, piece) for n, c, piece, (w, b) in folds)
    _replace_bn_by_tail(ctx, site, cat)
    return Change(site.name, "fold", f"split over the concatenated {names}{notes}")


_RESHAPE_METHODS = ("flatten", "reshape", "view", "reshape_as", "view_as", "contiguous")
_RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape)


def _reshape_source(node: Any) -> fx.Node | None:
    """The tensor a row-major reshape (``flatten``, ``reshape``, ``view``, ``reshape_as``, ...)
    reads its values from, else ``None``."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
            node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS):
        return node.args[0]
    return None


def _fold_through_reshape(ctx: Ctx, site: Site, reshaped: fx.Node) -> Change | Skip:
    """``BN(reshape(conv(x)))`` (LeViT: ``bn(linear(x).flatten(0, 1)).reshape_as(x)``): a reshape
    keeps the elements' row-major order, so every element keeps its conv/linear output channel when
    the BatchNorm's channel axis has as many channels, each as many elements apart, as the
    producer's: then the fold after the producer is exact. Which needs shapes (``example_inputs``);
    each reshape and the producer must have no other user that reads values."""
    chain = [reshaped]
    while (src := _reshape_source(chain[-1])) is not None and _reshape_source(src) is not None:
        chain.append(src)
    producer = _reshape_source(chain[-1])
    assert producer is not None
    conv = ctx.module(producer) if producer.op == "call_module" else None
    what = f"BatchNorm after a reshape of '{producer.name}'"
    if not is_conv_like(conv):
        return Skip(site.name, SkipReason.NO_NEIGHBOUR, f"{what}, not of a conv/linear output")
    what = f"BatchNorm after a reshape of '{producer.target}'"
    for n in chain:
        if len(value_users(n)) > 1:
            return Skip(site.name, SkipReason.MULTI_USER, f"{what}: the reshape '{n.name}' has other users")
    problem = producer_problem(ctx, producer, conv, shape_uses=True)
    if problem:
        return Skip(site.name, problem[0], f"{what}: {problem[1]}")
    before, after = shape(producer), shape(reshaped)
    if before is None or after is None:
        return Skip(site.name, SkipReason.NEEDS_SHAPES,
                    f"{what}: whether its channels are the output channels depends on shapes; "
                    "pass example_inputs= to deploy")
    axis = len(before) - 1 if isinstance(conv, nn.Linear) else 1
    if len(after) < 2 or after[1] != before[axis] or math.prod(after[2:]) != math.prod(before[axis + 1:]):
        return Skip(site.name, SkipReason.UNSUPPORTED,
                    f"{what}: the BatchNorm's channel axis of {list(after)} is not the output channels of "
                    f"{list(before)}")
    why = dims_match(conv, site.module, site.stats)
    if why:
        return Skip(site.name, SkipReason.UNSUPPORTED, why)
    return _fold_into(ctx, site, conv, producer.target, reshaped,
                      f"into {producer.target} through {len(chain)} reshape{'s' if len(chain) > 1 else ''}")


def _fold_into(ctx: Ctx, site: Site, conv: Any, conv_name: Any, result: fx.Node, detail: str,
               channels: slice | None = None) -> Change | Skip:
    """Guard, check and fold ``site`` into ``conv`` (on ``channels`` of it), ``result`` taking the
    BatchNorm's users; ``detail`` says where it went."""
    folded = guard(ctx, site.module, site.name, conv, conv_name) or _checked_fold(site, conv, ctx.scope.plan, channels)
    if isinstance(folded, Skip):
        return folded
    if folded is None:   # a dry run
        return Change(site.name, "fold", detail)
    note = set_weights(conv, conv_name, *folded, site)
    _replace_bn_by_tail(ctx, site, result)
    return Change(site.name, "fold", detail + note)


def _split_part(ctx: Ctx, node: Any) -> tuple[fx.Node, slice] | None:
    """``(conv output, its channels)`` when ``node`` is one part of a channel split of a conv's
    output (``torch.split(conv(x), sizes, 1)[i]``, ``.split``, ``.chunk``), else ``None``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[1], int) and isinstance(node.args[0], fx.Node)):
        return None
    split = node.args[0]
    kind = split.target if split.op in ("call_function", "call_method") else None
    names = {torch.split: "split", torch.chunk: "chunk", "split": "split", "chunk": "chunk"}
    if kind not in names or not split.args or not isinstance(split.args[0], fx.Node):
        return None
    args = dict(zip(("tensor", "n", "dim"), split.args))
    sizes_kw = ("split_size_or_sections", "split_size", "chunks")
    args.update({"n" if k in sizes_kw else k: v for k, v in split.kwargs.items()})
    src, n, dim = split.args[0], args.get("n"), args.get("dim", 0)
    conv = ctx.module(src) if src.op == "call_module" else None
    if dim != 1 or not is_conv_like(conv) or isinstance(conv, nn.Linear):
        return None
    total = conv.out_channels
    if names[kind] == "chunk" and isinstance(n, int) and n > 0:
        n = -(-total // n)
    if isinstance(n, int) and n > 0:
        sizes = [min(n, total - s) for s in range(0, total, n)]
    elif isinstance(n, (list, tuple)) and all(isinstance(v, int) for v in n) and sum(n) == total:
        sizes = list(n)
    else:
        return None
    i = node.args[1]
    if not -len(sizes) <= i < len(sizes):
        return None
    i %= len(sizes)
    return src, slice(sum(sizes[:i]), sum(sizes[:i + 1]))


def _fold_after_split(ctx: Ctx, site: Site, part: fx.Node, found: tuple[fx.Node, slice]) -> Change | Skip:
    """``BN(torch.split(conv(x), sizes, 1)[i])`` (timm's LambdaLayer normalizes q and v after one
    qkv conv): the BatchNorm folds into the conv's output channels of its part, the other channels
    keep their weights (scaled by 1). Exact when the conv's output feeds only the split and the part
    only the BatchNorm."""
    src, channels = found
    conv: Any = ctx.module(src)
    what = f"BatchNorm after a channel split of '{src.target}'"
    if len(value_users(src)) > 1 or len(value_users(part)) > 1:
        return Skip(site.name, SkipReason.MULTI_USER, f"{what}: the conv output or the part has other users")
    problem = producer_problem(ctx, src, conv, shape_uses=True)
    if problem:
        return Skip(site.name, problem[0], f"{what}: {problem[1]}")
    width = channels.stop - channels.start
    if site.stats.mean.numel() != width:
        return Skip(site.name, SkipReason.UNSUPPORTED,
                    f"{what}: the part has {width} channels, the BatchNorm {site.stats.mean.numel()}")
    return _fold_into(ctx, site, conv, src.target, part,
                      f"into channels {channels.start}:{channels.stop} of {src.target}", channels)


def _deploy_tune_block(ctx: Ctx, site: Site) -> Change | Skip:
    gm, node = ctx.gm, site.node
    conv_ref = site.conv_node
    conv = ctx.module(conv_ref)
    if ctx.uses[id(conv)] > 1:
        return Skip(site.name, SkipReason.SHARED_MODULE, f"'{conv_ref.target}' is used at several places")
    excluded = ctx.scope.skip(site.name, (site.name, site.module) if site.module is not None else ("", None),
                              (str(conv_ref.target), conv))
    if excluded:
        return excluded
    folded = guard(ctx, site.module, site.name, conv, conv_ref.target) or _checked_fold(site, conv, ctx.scope.plan)
    if folded is None or ctx.scope.plan:
        return Change(site.name, "revert" if isinstance(folded, Skip) else "fold", "Tune block")
    with gm.graph.inserting_before(node):
        conv_call = gm.graph.call_module(conv_ref.target, (site.input,))
    conv_call.meta = dict(node.meta)
    if isinstance(folded, Skip):
        # Deploy leaves no Tune block behind: an unfoldable one goes back to conv -> BN.
        untune_node(gm, site, conv_call)
        return Change(site.name, "revert", f"Tune block back to conv -> BN: {folded.reason.value}: {folded.detail}")
    note = set_weights(conv, conv_ref.target, *folded, site)
    _replace_bn_by_tail(ctx, site, conv_call)
    return Change(site.name, "fold", f"Tune block into {conv_ref.target}{note}")


def _fold_before(ctx: Ctx, site: Site, follower: fx.Node) -> Change | Skip:
    gm = ctx.gm
    conv: Any = ctx.module(follower)
    if ctx.uses[id(conv)] > 1:
        return Skip(site.name, SkipReason.SHARED_MODULE, f"'{follower.target}' is called at several places")
    if getattr(conv, "transposed", False):
        return Skip(site.name, SkipReason.UNSUPPORTED, "BatchNorm before a transposed conv is not exact to fold")
    zero_pad = isinstance(conv, nn.Conv1d | nn.Conv2d | nn.Conv3d) and conv.padding_mode == "zeros" and (
        isinstance(conv.padding, str) and conv.padding != "valid" or any(p != 0 for p in (
            conv.padding if not isinstance(conv.padding, str) else ()))
    )
    if zero_pad:
        return Skip(site.name, SkipReason.UNSUPPORTED,
                    f"'{follower.target}' zero-pads: folding a BatchNorm before it is not exact")
    if isinstance(conv, nn.Linear) and rank(site.node) not in (None, 2):
        return Skip(site.name, SkipReason.UNSUPPORTED, "BatchNorm1d input is not [N, C]")
    if site.module is not None and bn_kind(site.module) != "plain":
        return Skip(site.name, SkipReason.UNSUPPORTED, "activation between BatchNorm and conv")
    in_ch = conv.in_features if isinstance(conv, nn.Linear) else conv.in_channels
    if site.stats.mean.numel() != in_ch:
        return Skip(site.name, SkipReason.UNSUPPORTED, "channel counts differ")
    refused = _refused(site, conv)
    if refused is not None:
        return refused
    a, _ = bn_scale_shift(site.stats)
    ok, why = scale_is_safe(a, conv.weight)
    if not ok:
        return Skip(site.name, SkipReason.NON_FINITE, why)
    if ctx.scope.plan:
        return Change(site.name, "fold", f"forward into {follower.target}{prune_note(conv, follower.target)}")
    w, b = fold_bn_before(conv.weight, conv.bias, site.stats, groups=getattr(conv, "groups", 1))
    note = set_weights(conv, follower.target, w, b, site, before=True)
    if site.module is not None:
        set_module(gm, site.name, nn.Identity().train(site.module.training))   # a leaf change, as after a conv
    else:
        site.node.replace_all_uses_with(site.input)   # the conv, and users of the shape alone (same shape)
        gm.graph.erase_node(site.node)
    return Change(site.name, "fold", f"forward into {follower.target}{note}")


def _drop_dead_attrs(gm: fx.GraphModule) -> None:
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)


@dataclass(frozen=True)
class ConvBNConfig:
    """Options of ``normfx.convbn`` (see it for their meaning)."""

    mode: ConvBNMode = "tune"

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("tune", "deploy"))


def _steps(config: ConvBNConfig) -> tuple[Step, ...]:
    mode = config.mode
    fold = Step("fold_convbn", partial(fold_convbn, mode=mode), partial(fold_convbn_outside, mode=mode))
    if mode == "tune":
        return (fold,)
    # Deploy: then summed branches of one input (RepVGG/MobileOne/ACNet) become one conv.
    return (fold, Step("merge_branches", merge_branches, merge_branches_outside))


CONVBN = Transform(
    name="convbn", config=ConvBNConfig, steps=_steps, exact=True,
    summary="Conv/Linear + BatchNorm → Tune mode (Eval-mode gradients, Deploy-mode memory) or folded (Deploy)",
    paper="You et al., Efficient ConvBN Blocks for Transfer Learning and Beyond (ICLR 2024)",
    deploy=_steps(ConvBNConfig("deploy")),
    page="convbn.md",
    inspect=(("convbn_tune", ConvBNConfig("tune")), ("convbn_deploy", ConvBNConfig("deploy"))),
)
