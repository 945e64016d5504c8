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

import inspect
from collections import Counter
from typing import Any, Literal, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from normfx.errors import TrainingModeError
from normfx.functional import BNStats, bn_scale_shift, fold_bn_after, fold_bn_before, scale_is_safe
from normfx.kinds import bn_kind, hooks_on, is_conv_like, original_class, pruning_hooks
from normfx.match import get_attr, is_functional_bn, module_uses, set_module, set_param
from normfx.nn.evonorm import EvoNorm2dB0, EvoNorm2dS0
from normfx.nn.convbn import TuneBN, bn_stats, tune, tune_convbn, tune_convbn_functional, tuned_pair, untune
from normfx.nn.fixed_point import FixedPoint
from normfx.report import Change, PassResult, Skip, SkipReason
from normfx.analysis import Outside

__all__ = ["fold_convbn", "fold_convbn_outside", "ConvBNMode", "TrainingModeError"]

ConvBNMode = Literal["tune", "deploy"]

_BN_PARAMS = list(inspect.signature(F.batch_norm).parameters)  # input, running_mean, ... eps


def _fn_args(node: Any) -> dict:
    args = dict(zip(_BN_PARAMS, node.args))
    args.update(node.kwargs)
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    return {**defaults, **args}


def _is_tune_node(node: Any) -> bool:
    return node.op == "call_function" and node.target in (tune_convbn, tune_convbn_functional)


def _tensor(gm: fx.GraphModule, arg) -> Any:
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return get_attr(gm, str(arg.target))
    raise _Unsupported("its statistics are computed in the graph, not stored attributes")


class _Unsupported(Exception):
    pass


class _Ctx(NamedTuple):
    """What every site visit needs: the graph module, a name -> module map built once, and how
    often each module is used."""

    gm: fx.GraphModule
    mods: dict[str, nn.Module]
    uses: Counter

    def module(self, node) -> Any:
        if not isinstance(node, fx.Node) or node.op not in ("call_module", "get_attr"):
            return None
        return self.mods.get(node.target) if isinstance(node.target, str) else None


class _Site:
    """A BatchNorm call in the graph, normalized across module, functional and Tune forms."""

    def __init__(self, ctx: _Ctx, node: Any) -> None:
        gm = ctx.gm
        self.node = node
        # Duck-typed: a BatchNorm-like module, graph arguments, statistics (see the branches below).
        self.module: Any = None
        self.conv_node: Any = None  # only for existing Tune blocks
        self.input: Any = None
        self.stats: Any = None
        if node.op == "call_module":
            self.module = ctx.module(node)
            self.name = str(node.target)
            self.input = node.args[0] if node.args else None
            self.training = bool(self.module.training) and not _frozen(self.module)
            self.stats = bn_stats(self.module) if self.module.running_mean is not None else None
            self.extra = len(node.args) != 1 or bool(node.kwargs)
        elif _is_tune_node(node):
            self.conv_node = node.args[1]
            self.input = node.args[0]
            if node.target is tune_convbn:
                self.module = ctx.module(node.args[2])
                self.name = str(node.args[2].target)
                self.training = bool(self.module.training) and not _frozen(self.module)
                self.stats = bn_stats(self.module)
            else:
                _, _, mean, var, w, b, eps = node.args
                self.name = _functional_name(node, {"running_mean": mean})
                self.training = False
                self.stats = BNStats(_tensor(gm, mean), _tensor(gm, var), _tensor(gm, w), _tensor(gm, b),
                                     float(eps))  # type: ignore[arg-type]
            self.extra = False
        else:
            a = _fn_args(node)
            self.name = _functional_name(node, a)
            self.input = a["input"]
            self.training = bool(a["training"]) if not isinstance(a["training"], fx.Node) else True
            self.extra = False
            mean, var = a["running_mean"], a["running_var"]
            if mean is None or var is None:
                self.stats = None
            else:
                self.stats = BNStats(
                    _tensor(gm, mean), _tensor(gm, var), _tensor(gm, a["weight"]), _tensor(gm, a["bias"]),
                    float(a["eps"]),
                )


def _frozen(m: Any) -> bool:
    return not hasattr(m, "track_running_stats")  # FrozenBatchNorm has no train-mode behaviour


def _functional_name(node: Any, a: dict) -> str:
    mean = a.get("running_mean")
    if isinstance(mean, fx.Node) and mean.op == "get_attr":
        return str(mean.target).rsplit(".", 1)[0] or node.name
    return node.name


def _dims_match(conv: Any, bn: Any, stats: BNStats) -> str:
    out = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    if stats.mean.numel() != out:
        return f"BatchNorm has {stats.mean.numel()} channels, {type(conv).__name__} produces {out}"
    if bn is not None and isinstance(conv, nn.Linear) and not isinstance(bn, (nn.BatchNorm1d,)):
        return f"{type(bn).__name__} after Linear"
    return ""


def _set_weights(conv: Any, conv_name: Any, w: torch.Tensor, b: torch.Tensor, site: _Site, *,
                 before: bool = False) -> str:
    """Install the folded ``(w, b)``. Each requires grad when any tensor it was computed from did
    (the conv's weight or bias, the BN's γ/β; a forward fold's bias also reads the conv's weight),
    so a partly frozen model (``normfx.freeze``) stays trainable where it was and only there.
    Returns what the report adds when this made the conv's pruning permanent (``_prune_note``)."""
    note = _prune_note(conv, conv_name)
    st = site.stats
    affine = any(t is not None and t.requires_grad for t in (st.weight, st.bias))
    w_grad = conv.weight.requires_grad or (st.weight is not None and st.weight.requires_grad)
    b_grad = (conv.bias is not None and conv.bias.requires_grad) or affine or (before and conv.weight.requires_grad)
    set_param(conv, "weight", w, requires_grad=w_grad)
    set_param(conv, "bias", b, requires_grad=b_grad)
    return note


def fold_convbn(gm: fx.GraphModule, *, mode: ConvBNMode) -> PassResult:
    """Replaces ``BN(conv(x))`` with ``tune_convbn(x, conv, bn)`` (tune) or one folded conv (deploy).

    Mutates ``gm`` in place and returns what it did, site by site.

    Raises:
        TrainingModeError: in Deploy mode, when a BatchNorm that could be folded is in training mode.
    """
    if mode not in ("tune", "deploy"):
        raise ValueError(f"mode must be 'tune' or 'deploy', got {mode!r}")
    graph = gm.graph
    ctx = _Ctx(gm, dict(gm.named_modules(remove_duplicate=False)), module_uses(gm))
    sites = []
    for node in list(graph.nodes):
        m = ctx.module(node) if node.op == "call_module" else None
        if m is not None and (bn_kind(m) is not None or _looks_like_bn(m) or isinstance(m, EVONORMS)):
            sites.append(node)
        elif is_functional_bn(node) or _is_tune_node(node):
            sites.append(node)
    changes: list[Change] = []
    skips: list[Skip] = []
    if mode == "deploy":
        for node in sites:
            if node.op == "call_module" or node.target is tune_convbn:
                m = ctx.module(node if node.op == "call_module" else node.args[2])
                if m is not None and m.training and bn_kind(m) is not None and not _frozen(m):
                    name = node.target if node.op == "call_module" else node.args[2].target
                    raise TrainingModeError(
                        f"BatchNorm '{name}' is in training mode; call model.eval() before mode='deploy'"
                    )
    for node in sites:
        m = ctx.module(node) if node.op == "call_module" else None
        result = _visit_evonorm(ctx, node, mode) if isinstance(m, EVONORMS) else _visit(ctx, node, mode)
        if isinstance(result, Change):
            changes.append(result)
        else:
            skips.append(result)
    if changes:
        _drop_dead_attrs(gm)
        graph.lint()
        gm.recompile()
    return PassResult("fold_convbn", tuple(changes), tuple(skips))


def fold_convbn_outside(model: nn.Module, outside: list[Outside], *, mode: ConvBNMode) -> PassResult:
    """BatchNorms no traced region calls: a fold needs the conv that feeds them, which only a graph
    shows, so each is reported with the reason its forward was not traced."""
    skips = [Skip(o.qualname, SkipReason.UNSUPPORTED, _EVONORM_WHY) if isinstance(o.module, EVONORMS)
             else Skip(o.qualname, SkipReason.UNTRACEABLE, o.why) for o in outside
             if bn_kind(o.module) is not None or _looks_like_bn(o.module) or isinstance(o.module, EVONORMS)]
    return PassResult("fold_convbn", (), tuple(skips))


EVONORMS = (EvoNorm2dB0, EvoNorm2dS0)
_EVONORM_WHY = ("EvoNorm is not folded: it normalizes with per-sample statistics (and B0 with per-batch ones "
                "in training); it stays a layer of its own")


def _visit_evonorm(ctx: _Ctx, node: Any, mode: ConvBNMode) -> Change | Skip:
    """An EvoNorm with its nonlinearity normalizes with per-sample statistics: not foldable. Without it,
    it is ``x·γ + β`` in training and in eval alike (the paper's definition), so Deploy folds it into the
    conv that produces it, as a BatchNorm's affine."""
    m, name = ctx.module(node), str(node.target)
    if m.apply_act:
        return Skip(name, SkipReason.UNSUPPORTED, _EVONORM_WHY)
    what = "EvoNorm without nonlinearity (x·γ + β)"
    if mode == "tune":
        return Skip(name, SkipReason.UNSUPPORTED, f"{what}: no statistics to tune with; Deploy folds it")
    producer = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    conv: Any = ctx.module(producer) if isinstance(producer, fx.Node) and producer.op == "call_module" else None
    if not is_conv_like(conv):
        return Skip(name, SkipReason.UNSUPPORTED, f"{what}: not fed by a conv/linear")
    if ctx.uses[id(m)] > 1:
        return Skip(name, SkipReason.SHARED_MODULE, f"{what}: called at several places")
    problem = _producer_problem(ctx, producer, conv)
    if problem:
        return Skip(name, problem[0], f"{what}: {problem[1]}")
    hooked = _hook_problem(m, name, conv, producer.target)
    if hooked:
        return hooked
    if getattr(conv, "out_channels", None) != m.num_features:     # a Linear has none: not channels-first
        return Skip(name, SkipReason.UNSUPPORTED,
                    f"{what}: '{producer.target}' is not a conv with {m.num_features} output channels")
    gamma, beta = m.weight.detach().to(torch.float64), m.bias.detach().to(torch.float64)
    w, b = fold_bn_after(conv.weight, conv.bias, None, transposed=bool(getattr(conv, "transposed", False)),
                         groups=getattr(conv, "groups", 1), scale_shift=(gamma, beta))
    note = _prune_note(conv, producer.target)
    set_param(conv, "weight", w, requires_grad=conv.weight.requires_grad or m.weight.requires_grad)
    set_param(conv, "bias", b, requires_grad=(conv.bias is not None and conv.bias.requires_grad)
              or m.weight.requires_grad or m.bias.requires_grad)
    set_module(ctx.gm, name, nn.Identity().train(m.training))
    return Change(name, "fold", f"{what} into {producer.target}{note}")


def _producer_problem(ctx: _Ctx, producer: Any, conv: Any) -> tuple[SkipReason, str] | None:
    """Why the conv that produces a norm's input cannot take a fold after it, or ``None``: its output
    feeds something else too, the module is called elsewhere, or it is called with extra arguments."""
    if len(producer.users) > 1:
        return SkipReason.MULTI_USER, f"output of '{producer.target}' has other users"
    if ctx.uses[id(conv)] > 1:
        return SkipReason.SHARED_MODULE, f"'{producer.target}' is called at several places"
    if len(producer.args) != 1 or producer.kwargs:
        return SkipReason.UNSUPPORTED, f"'{producer.target}' is called with extra arguments"
    return None


def _hook_problem(norm: Any, norm_name: str, conv: Any, conv_name: Any, *, before: bool = False) -> Skip | None:
    """A fold removes the norm module and changes what its conv computes: hooks on the norm would
    stop firing, and the conv's hooks would see other values (its output's, for a fold after it;
    its input's, for a fold before it; its gradients' either way). Such a site is skipped."""
    on_norm = hooks_on(norm) if norm is not None else ""
    if on_norm:
        return Skip(norm_name, SkipReason.HOOKED, f"'{norm_name}' has {on_norm}: folding would remove the module")
    seen = ("forward_pre", "backward", "backward_pre") if before else ("forward", "backward", "backward_pre")
    on_conv = hooks_on(conv, seen)  # type: ignore[arg-type]
    if on_conv:
        what = "input" if before else "output"
        return Skip(norm_name, SkipReason.HOOKED,
                    f"'{conv_name}' has {on_conv}: folding would change the {what} and gradients they see")
    return None


def _prune_note(conv: Any, name: Any) -> str:
    """What the report adds when the folded conv was pruned (``torch.nn.utils.prune``): its folded
    weights keep the pruned zeros as plain Parameters, without the mask."""
    pruned = sorted(h._tensor_name for h in pruning_hooks(conv).values())
    return f"; pruning of {', '.join(repr(f'{name}.{t}') for t in pruned)} made permanent" if pruned else ""


def _looks_like_bn(m: Any | None) -> bool:
    """A BatchNorm subclass we cannot interpret: still a site, reported as unsupported."""
    return isinstance(m, _BatchNorm)


def _visit(ctx: _Ctx, node: Any, mode: ConvBNMode) -> Change | Skip:
    gm, uses = ctx.gm, ctx.uses
    if mode == "tune" and _is_tune_node(node):
        name = str(node.args[2].target) if node.target is tune_convbn else _functional_name(
            node, {"running_mean": node.args[2]})
        return Skip(name, SkipReason.ALREADY_DONE, "already a Tune block")
    bn = ctx.module(node) if node.op == "call_module" else None
    if isinstance(bn, TuneBN):
        if mode == "tune":
            return Skip(str(node.target), SkipReason.ALREADY_DONE, "already a Tune block")
        _untune_modules(ctx, bn)
        result = _visit(ctx, node, mode)
        if isinstance(result, Skip):
            # Deploy leaves no Tune block behind: an unfoldable one is conv -> BN again.
            return Change(result.site, "revert",
                          f"Tune block back to conv -> BN: {result.reason.value}: {result.detail}")
        return Change(result.site, result.action, f"Tune block {result.detail}")
    try:
        site = _Site(ctx, node)
    except _Unsupported as e:
        return Skip(node.name, SkipReason.UNSUPPORTED, str(e))
    if site.module is not None and bn_kind(site.module) is None:
        return Skip(site.name, SkipReason.UNSUPPORTED, f"{type(site.module).__name__} has its own forward")
    if site.stats is None:
        return Skip(site.name, SkipReason.NO_RUNNING_STATS, "BatchNorm uses batch statistics in eval mode")
    if site.extra:
        return Skip(site.name, SkipReason.UNSUPPORTED, "BatchNorm called with extra arguments")
    if node.op == "call_function" and not _is_tune_node(node) and site.training:
        return Skip(site.name, SkipReason.TRAINING_MODE, "functional batch_norm traced with training=True")
    if site.module is not None and uses[id(site.module)] > 1:
        return Skip(site.name, SkipReason.SHARED_MODULE, "BatchNorm module is called at several places")

    if _is_tune_node(node):
        return _deploy_tune_block(ctx, site)

    producer = site.input
    conv = ctx.module(producer) if isinstance(producer, fx.Node) and producer.op == "call_module" else None
    if is_conv_like(conv):
        why = _dims_match(conv, site.module, site.stats)
        if why:
            return Skip(site.name, SkipReason.UNSUPPORTED, why)
        problem = _producer_problem(ctx, producer, conv)
        if problem:
            return Skip(site.name, *problem)
        if isinstance(conv, nn.Linear) and _rank(producer) not in (None, 2):
            return Skip(site.name, SkipReason.UNSUPPORTED, "Linear output is not [N, C]")
        if mode == "tune":
            return _make_tune_block(gm, site, producer)
        return _hook_problem(site.module, site.name, conv, producer.target) or _fold_after(ctx, site, producer, conv)

    follower = _single_conv_user(ctx, node)
    if follower is not None and mode == "deploy":
        return (_hook_problem(site.module, site.name, ctx.module(follower), follower.target, before=True)
                or _fold_before(ctx, site, follower))
    if follower is not None:
        return Skip(site.name, SkipReason.UNSUPPORTED, "BatchNorm before a conv folds in deploy mode only")
    return Skip(site.name, SkipReason.NO_NEIGHBOUR, "input is not a conv/linear output")


def _rank(node: Any) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _single_conv_user(ctx: _Ctx, node: Any) -> fx.Node | None:
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    m = ctx.module(user) if user.op == "call_module" else None
    if is_conv_like(m) and user.args and user.args[0] is node:
        return user
    return None


def _untune_modules(ctx: _Ctx, bn: Any) -> None:  # bn: the Tune block's BatchNorm
    """Give a Tune block's BN, and the conv that folds it, their own classes back."""
    for m in ctx.mods.values():
        pair = tuned_pair(m)
        if pair is not None and pair is bn:
            untune(m, pair)
    bn.__class__ = original_class(bn)


def _make_tune_block(gm: fx.GraphModule, site: _Site, producer: Any) -> Change:
    if site.module is not None:
        # A leaf change: the conv and BN keep their slots (the parent's forward is untouched).
        tune(get_attr(gm, str(producer.target)), site.module)
        return Change(site.name, "tune", f"{producer.target} + {site.name}")
    graph = gm.graph
    node = site.node
    with graph.inserting_before(node):
        conv_ref = graph.get_attr(producer.target)
        if node.op == "call_module":
            bn_ref = graph.get_attr(node.target)
            new = graph.call_function(tune_convbn, (producer.args[0], conv_ref, bn_ref))
        else:
            a = _fn_args(node)
            new = graph.call_function(
                tune_convbn_functional,
                (producer.args[0], conv_ref, a["running_mean"], a["running_var"], a["weight"], a["bias"], a["eps"]),
            )
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    graph.erase_node(producer)
    return Change(site.name, "tune", f"{producer.target} + {site.name}")


def _fixed_point_weights(site: _Site, conv: Any) -> Skip | None:
    plists = conv.parametrizations.values() if parametrize.is_parametrized(conv) else ()
    if any(isinstance(p, FixedPoint) for plist in plists for p in plist):
        return Skip(site.name, SkipReason.UNSUPPORTED, "the conv's weights are cast to fixed point: folding would "
                    "leave the fixed-point grid (use normfx.fixed_point(..., fold_bn=True) to fold first)")
    return None


def _checked_fold(site: _Site, conv: Any) -> tuple[torch.Tensor, torch.Tensor] | Skip:
    fixed = _fixed_point_weights(site, conv)
    if fixed is not None:
        return fixed
    c, t = bn_scale_shift(site.stats)
    ok, why = scale_is_safe(c, conv.weight)
    if not ok:
        return Skip(site.name, SkipReason.NON_FINITE, why)
    return fold_bn_after(
        conv.weight, conv.bias, site.stats, transposed=bool(getattr(conv, "transposed", False)),
        groups=getattr(conv, "groups", 1), scale_shift=(c, t),
    )


def _replace_bn_by_tail(ctx: _Ctx, site: _Site, result: fx.Node) -> None:
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


def _fold_after(ctx: _Ctx, site: _Site, producer: Any, conv: Any) -> Change | Skip:
    folded = _checked_fold(site, conv)
    if isinstance(folded, Skip):
        return folded
    note = _set_weights(conv, producer.target, *folded, site)
    _replace_bn_by_tail(ctx, site, producer)
    return Change(site.name, "fold", f"into {producer.target}{note}")


def _deploy_tune_block(ctx: _Ctx, site: _Site) -> Change | Skip:
    gm, node = ctx.gm, site.node
    conv_ref = site.conv_node
    conv = ctx.module(conv_ref)
    if ctx.uses[id(conv)] > 1:
        return Skip(site.name, SkipReason.SHARED_MODULE, f"'{conv_ref.target}' is used at several places")
    folded = _hook_problem(site.module, site.name, conv, conv_ref.target) or _checked_fold(site, conv)
    with gm.graph.inserting_before(node):
        conv_call = gm.graph.call_module(conv_ref.target, (site.input,))
    conv_call.meta = dict(node.meta)
    if isinstance(folded, Skip):
        # Deploy leaves no Tune block behind: an unfoldable one goes back to conv -> BN.
        _untune(gm, site, conv_call)
        return Change(site.name, "revert", f"Tune block back to conv -> BN: {folded.reason.value}: {folded.detail}")
    note = _set_weights(conv, conv_ref.target, *folded, site)
    _replace_bn_by_tail(ctx, site, conv_call)
    return Change(site.name, "fold", f"Tune block into {conv_ref.target}{note}")


def _untune(gm: fx.GraphModule, site: _Site, conv_call: fx.Node) -> None:
    node = site.node
    with gm.graph.inserting_after(conv_call):
        if node.target is tune_convbn:
            bn_call = gm.graph.call_module(node.args[2].target, (conv_call,))
        else:
            _, _, mean, var, w, b, eps = node.args
            bn_call = gm.graph.call_function(F.batch_norm, (conv_call, mean, var, w, b, False, 0.0, eps))
    node.replace_all_uses_with(bn_call)
    gm.graph.erase_node(node)


def _fold_before(ctx: _Ctx, site: _Site, follower: fx.Node) -> Change | Skip:
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
    if isinstance(conv, nn.Linear) and _rank(site.node) not in (None, 2):
        return Skip(site.name, SkipReason.UNSUPPORTED, "BatchNorm1d input is not [N, C]")
    if site.module is not None and bn_kind(site.module) != "plain":
        return Skip(site.name, SkipReason.UNSUPPORTED, "activation between BatchNorm and conv")
    in_ch = conv.in_features if isinstance(conv, nn.Linear) else conv.in_channels
    if site.stats.mean.numel() != in_ch:
        return Skip(site.name, SkipReason.UNSUPPORTED, "channel counts differ")
    fixed = _fixed_point_weights(site, conv)
    if fixed is not None:
        return fixed
    a, _ = bn_scale_shift(site.stats)
    ok, why = scale_is_safe(a, conv.weight)
    if not ok:
        return Skip(site.name, SkipReason.NON_FINITE, why)
    w, b = fold_bn_before(conv.weight, conv.bias, site.stats, groups=getattr(conv, "groups", 1))
    note = _set_weights(conv, follower.target, w, b, site, before=True)
    if site.module is not None:
        set_module(gm, site.name, nn.Identity().train(site.module.training))   # a leaf change, as after a conv
    else:
        follower.replace_input_with(site.node, site.input)
        gm.graph.erase_node(site.node)
    return Change(site.name, "fold", f"forward into {follower.target}{note}")


def _drop_dead_attrs(gm: fx.GraphModule) -> None:
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
