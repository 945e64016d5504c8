"""The one runner every one-liner and ``deploy`` use.

copy (sharing tensors until a pass replaces them) -> analyse (trace every region, the model left as
it is) -> run each step over every region and over the modules outside them -> install only the
regions whose graph a step changed, each in its own module's slot -> generate their code once ->
clone what is still shared with the caller -> attach the report.

A step that only swaps leaves (a folded conv's weights, a BatchNorm replaced by ``nn.Identity``, a
LayerNorm by a ProgressiveRepBN, a conv's class by ``TuneConv``) changes no graph, so the model
that comes back is the caller's own module tree: its class, ``model.layer1[0]``, submodule calls and
hooks keep working. Only a rewrite that needs a different forward (a functional ``F.batch_norm``
folded, activation casts inserted) puts a GraphModule in the slot of the region that holds it.
"""
from __future__ import annotations

import copy
import itertools
from typing import Literal, Sequence, TypeVar, cast

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.weight_norm import WeightNorm

from normfx.kinds import hooks_on
from normfx.match import module_tensors
from normfx.report import Change, PassResult, Report, Skip, attach_report
from normfx.analysis import Analysis, analyze, install, outside_modules
from normfx.scope import EVERYWHERE, Scope
from normfx.trace import materialize
from normfx.transform import Step

__all__ = ["transform", "plan", "run_step", "copy_model"]

M = TypeVar("M", bound=nn.Module)


def copy_model(model: M, *, share_tensors: bool) -> tuple[M, frozenset[int]]:
    """A deep copy of ``model`` and the ids of the tensors it still shares with it.

    ``share_tensors=True`` copies the module tree but not the parameters and buffers: a pass
    replaces the tensors it changes (it never writes into one), and ``transform`` clones those still
    shared at the end, so a fold never copies a weight it is about to replace (on ResNet-152 the
    copy was half of ``deploy``'s time). A pass that registers parametrizations or sets flags in
    place needs a copy that owns its tensors first (``share_tensors=False``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"normfx expects an nn.Module, got {type(model).__name__}")
    # Tensors a forward pre-hook computes from parameters (``torch.nn.utils.prune``'s ``weight``,
    # the old ``weight_norm``) are not leaves, which deepcopy refuses: the copy gets a detached
    # stand-in, recomputed from its own parameters below.
    derived = {id(t): t.detach() for m in model.modules() for t in m.__dict__.values()
               if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    if share_tensors:
        tensors = module_tensors(model)
        twin = copy.deepcopy(model, {**derived, **{id(t): t for t in tensors}})
        shared = frozenset(id(t) for t in tensors)
    else:
        twin, shared = copy.deepcopy(model, dict(derived)), frozenset()
    if derived:
        _recompute_derived(twin)
    _own_parametrized_classes(twin)
    return twin, shared


def _recompute_derived(model: nn.Module) -> None:
    """Recompute every pruned tensor (``<name>_orig · <name>_mask``) and old-style weight-normed
    weight of a copy from the copy's own parameters, as their hooks do before each forward."""
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                setattr(m, hook._tensor_name, hook.apply_mask(m))
            elif isinstance(hook, WeightNorm):
                setattr(m, hook.name, hook.compute_weight(m))


def _own_parametrized_classes(model: nn.Module) -> None:
    """Give each parametrized module of a deep copy its own class. ``torch.nn.utils.parametrize``
    keeps the parametrized properties on a per-module class that ``deepcopy`` shares between the
    copy and the original, so removing a parametrization from the copy (a fold, a deploy step)
    would delete the original's property too."""
    for m in model.modules():
        if parametrize.is_parametrized(m):
            cls = type(m)
            ns = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            m.__class__ = type(cls.__name__, cls.__bases__, ns)


def _unshare(model: nn.Module, shared: frozenset[int]) -> None:
    """Clone every parameter/buffer ``model`` still shares with the caller's model."""
    if not shared:
        return
    clones: dict[int, object] = {}  # keeps tied tensors tied
    for m in model.modules():
        for slots in (m._parameters, m._buffers):
            for k, t in slots.items():
                if t is not None and id(t) in shared:
                    slots[k] = copy.deepcopy(t, clones)  # type: ignore[assignment]


def run_step(analysis: Analysis, step: Step, scope: Scope = EVERYWHERE) -> PassResult:
    """Run one graph step over every region of ``analysis``, then over the modules outside them, and
    merge the results into one PassResult with qualified site names, each site once."""
    assert step.graph_pass is not None and step.outside_pass is not None
    changes: dict[str, Change] = {}
    skips: dict[str, Skip] = {}
    model = analysis.model
    for prefix, gm in analysis.regions:
        res = step.graph_pass(gm, scope.at(prefix, model.get_submodule(prefix) if prefix else model))
        pre = f"{prefix}." if prefix else ""
        for c in res.changes:
            changes.setdefault(pre + c.site, Change(pre + c.site, c.action, c.detail))
        for sk in res.skips:
            skips.setdefault(pre + sk.site, Skip(pre + sk.site, sk.reason, sk.detail))
    res = step.outside_pass(model, outside_modules(analysis), scope.at("", model))
    for c in res.changes:
        if c.site not in changes and c.site not in skips:
            changes[c.site] = c
    for sk in res.skips:
        if sk.site not in changes and sk.site not in skips:
            skips[sk.site] = sk
    return PassResult(step.name, tuple(changes.values()), tuple(skips.values()))


def _skip_identities(gm: fx.GraphModule) -> None:
    """A region that gets a rewritten forward anyway does not call the ``nn.Identity`` modules a
    pass left in its slots (a folded BatchNorm's, a merged branch's): each call costs a Python module
    call and computes nothing (on MobileOne-S0, 5-8% of the deployed model's latency). An Identity
    with hooks is still called: its hooks fire as before."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        m = gm.get_submodule(str(node.target))
        if type(m) is nn.Identity and not hooks_on(m):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _groups(steps: Sequence[Step]) -> itertools.groupby:
    """Consecutive steps that want the same regions share one analysis (deploy's five steps: one);
    a model pass is a group of its own."""
    return itertools.groupby(steps, key=lambda s: "model" if s.model_pass is not None else s.view)


def transform(model: M, steps: Sequence[Step], *, inplace: bool = False,
              tensors: Literal["share", "own"] = "share", scope: Scope = EVERYWHERE,
              example_inputs: tuple[torch.Tensor, ...] | None = None) -> M:
    """Run ``steps`` in order on a copy of ``model`` (the model itself with ``inplace=True``), on the
    sites ``scope`` allows, and return it with its report attached. ``example_inputs``: the graph
    steps see node shapes in every region the forward calls (``analyze``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"normfx expects an nn.Module, got {type(model).__name__}")
    out, shared = (model, frozenset()) if inplace else copy_model(model, share_tensors=tensors == "share")
    results: list[PassResult] = []
    notes: list[str] = []
    untraceable: tuple[tuple[str, str], ...] | None = None
    result: nn.Module = out
    for view, group in _groups(steps):
        if view == "model":
            for step in group:
                assert step.model_pass is not None
                res, more = step.model_pass(result, scope.at("", result))
                results.append(res)
                notes += more
            continue
        analysis = analyze(result, per_module=view == "module", leaf_modules=tuple(scope.leaves),
                           example_inputs=example_inputs)
        if untraceable is None or view == "flat":
            untraceable = analysis.untraceable
        fingerprints = analysis.signatures()
        results += [run_step(analysis, step, scope) for step in group]
        after = analysis.signatures()
        changed = {prefix for prefix, sig in fingerprints.items() if after[prefix] != sig}
        for prefix, gm in analysis.regions:
            if prefix in changed:
                _skip_identities(gm)
                gm.graph.lint()
        result = install(analysis, changed)
    materialize(result)
    _unshare(result, shared)
    attach_report(result, Report(tuple(results), untraceable or (), tuple(notes)))
    # The caller's own object, or a copy of it, with its class kept (``install``); a GraphModule
    # given is returned as a GraphModule.
    return cast(M, result)


def plan(model: nn.Module, steps: Sequence[Step], scope: Scope,
         analyses: dict[str, Analysis] | None = None) -> Report:
    """A dry run: what ``steps`` would do to ``model``, site by site, with nothing copied or changed.

    Each group of steps runs on one analysis of the model as it is, with ``scope.plan`` set: the
    passes find and check every site and report it. Steps after the first see the model as it is,
    not as the earlier ones would leave it, so ``plan`` is for one transform's steps at a time.
    ``analyses``: analyses of ``model`` by view, shared between calls (a dry run changes none)."""
    scope = Scope(scope.filter_fn, scope.leaves, plan=True)
    results: list[PassResult] = []
    untraceable: tuple[tuple[str, str], ...] | None = None
    cache = {} if analyses is None else analyses
    for view, group in _groups(steps):
        if view == "model":
            for step in group:
                assert step.model_pass is not None
                results.append(step.model_pass(model, scope.at("", model))[0])
            continue
        if view not in cache:
            cache[view] = analyze(model, per_module=view == "module", leaf_modules=tuple(scope.leaves))
        analysis = cache[view]
        if untraceable is None or view == "flat":
            untraceable = analysis.untraceable
        results += [run_step(analysis, step, scope) for step in group]
    return Report(tuple(results), untraceable or ())
