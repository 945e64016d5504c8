"""Symbolic tracing with normfx's leaves, and partial tracing for models that do not trace whole.

``trace(model)`` returns a ``torch.fx.GraphModule`` when the whole model traces. When a submodule
cannot be traced (data-dependent control flow, shape arithmetic on proxies, ...), that submodule is
kept as an opaque leaf, its reason is recorded, and its own children are traced in turn, so every
traceable region is still a GraphModule that passes can rewrite. Only a model in which nothing can
be traced is an error.

Leaves: torch.nn modules (torch.fx's default), every BatchNorm and LayerNorm subclass (so ``model.train()`` and
``model.eval()`` keep switching BatchNorm at run time instead of being frozen into the graph at trace
time), FrozenBatchNorm modules, parameter-free modules whose forward reads ``self.training``
(DropPath, StochasticDepth: same reason), normfx's own modules and whatever the caller adds.
A module *with* parameters that branches on ``self.training`` is traced in the mode it is in.
"""
from __future__ import annotations

import ast
import functools
import inspect
import logging
import textwrap
import traceback
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfx.errors import SpecializedCallError, TraceFailure
from normfx.kinds import is_frozen_bn, is_mode_dependent_leaf
from normfx.nn import LEAF_MODULES

__all__ = ["trace", "trace_regions", "analyze", "Analysis", "install", "regions", "outside_modules", "Outside",
           "TraceFailure", "SpecializedCallError", "untraceable_modules", "check_specialized"]

logger = logging.getLogger("normfx")

_UNTRACEABLE_ATTR = "_normfx_untraceable"


def _normfx_leaf_types() -> tuple[type, ...]:
    return LEAF_MODULES


@dataclass(frozen=True)
class _Failure:
    qualname: str
    reason: str


class _Tracer(fx.Tracer):
    def __init__(self, leaves: frozenset[str], leaf_types: tuple[type, ...], own_forward_only: bool = False) -> None:
        super().__init__()
        self._leaves = leaves
        self._leaf_types = leaf_types
        self._own_forward_only = own_forward_only   # every submodule call is a leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self._leaves or (self._own_forward_only and qualname):
            return True
        if isinstance(m, (_BatchNorm, nn.LayerNorm)) or is_frozen_bn(m) or isinstance(m, self._leaf_types):
            return True
        if is_mode_dependent_leaf(m):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):  # type: ignore[override]
        qualname = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # noqa: BLE001 - any tracer error marks the innermost module
            if not hasattr(e, "_normfx_qualname"):
                e._normfx_qualname = qualname  # type: ignore[attr-defined]
            raise


def _reason(e: BaseException) -> str:
    """The tracer's message plus the deepest line of user code that raised it."""
    where = ""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if "/torch/" not in frame.filename and "/normfx/trace.py" not in frame.filename:
            where = f" (at {frame.filename}:{frame.lineno}: {frame.line})"
            break
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}{where}"


def _trace_once(
    model: nn.Module, leaves: frozenset[str], leaf_types: tuple[type, ...],
    concrete: dict[str, object] | None = None, share: bool = False, own_forward_only: bool = False,
) -> fx.GraphModule:
    tracer = _Tracer(leaves, leaf_types, own_forward_only)
    graph = tracer.trace(model, concrete_args=concrete or None)
    if concrete:
        _guard_specialized(graph, type(model).__name__, concrete)
    name = type(model).__name__
    # Lazy code generation: a one-liner rewrites the graph right away, so generating the forward's
    # code here would be thrown away; ``materialize`` generates it once, after the passes.
    gm = _graph_module_cls()(tracer.root, graph, name)
    if share:
        _share_state(gm, model)
    else:
        _restore_order(gm, model)
    return gm


_SHARED = ("_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
           "_backward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
           "_forward_hooks_always_called", "_state_dict_hooks", "_state_dict_pre_hooks",
           "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _share_state(gm: fx.GraphModule, model: nn.Module) -> None:
    """Make ``gm`` read and write ``model``'s own children, tensors and hooks (the same dicts): a
    pass that swaps a leaf through the graph's module paths swaps it in the model, and a region
    installed in the model's place keeps every key and hook it had."""
    for attr in _SHARED:
        if attr in model.__dict__:
            gm.__dict__[attr] = model.__dict__[attr]
    gm.training = model.training


@fx.node.has_side_effect
def check_specialized(value: object, expected: object, name: str, owner: str) -> None:
    """Graph guard of a traced forward whose ``name`` argument was fixed at its default ``expected``
    (``None``, a bool, a number or a string): any other value raises instead of silently taking the
    traced branch."""
    if not _same_value(value, expected):
        raise SpecializedCallError(
            f"{owner}.forward was traced by normfx for {name}={expected!r} (its default) and called with "
            f"{name}={type(value).__name__ if isinstance(value, torch.Tensor) else repr(value)}. The traced "
            f"graph takes the branch of the default only; call it with the default, or transform the model "
            f"with leaf_modules=[...] naming the module whose forward reads '{name}'."
        )


def _guard_specialized(graph: fx.Graph, owner: str, concrete: dict[str, object]) -> None:
    """Replace torch.fx's own None assertions by ``check_specialized`` guards, one per argument."""
    for node in list(graph.nodes):
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none":
            graph.erase_node(node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for name, value in concrete.items():
        ph = next((n for n in placeholders if n.target == name or str(n.target).startswith(f"{name}_")), None)
        if ph is None:
            continue
        ph.target = name   # torch.fx names it ``name_1``: keep the caller's keyword working
        with graph.inserting_after(placeholders[-1]):
            graph.call_function(check_specialized, (ph, value, name, owner))


_SIMPLE_DEFAULTS = (type(None), bool, int, float, str)


def _region_blocker(model: nn.Module, root: bool,
                    called_with_defaults: bool = False) -> tuple[str | None, dict[str, object]]:
    """Why ``model``'s forward cannot be the boundary of a traced region, or ``(None, concrete)``
    with the arguments to specialize.

    A region's arguments become graph placeholders: a Python test on one (``x is None``,
    ``isinstance``) is decided once, at trace time, and the graph silently keeps that branch. So a
    forward that tests an argument that way, or takes ``*args``/``**kwargs``, is not a region. A
    forward with defaulted arguments is a region only at the root, traced with every defaulted
    argument fixed at its default and a guard that raises on any other value: below the root, the
    caller is untraceable code that may pass anything — unless its caller is a traced graph whose
    every call passes only the required arguments (``called_with_defaults``): then every defaulted
    argument is fixed at its default (tests on it then decide correctly), behind the same guard.
    """
    fwd = type(model).forward
    try:
        sig = inspect.signature(fwd)
    except (TypeError, ValueError):
        return None, {}
    params = list(sig.parameters.values())[1:]
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return f"forward takes {'*' if p.kind is p.VAR_POSITIONAL else '**'}{p.name}: a trace would fix them", {}
    defaulted = [p for p in params if p.default is not p.empty]
    identity, branched = _tested_names(fwd)
    if called_with_defaults and defaulted and all(isinstance(p.default, _SIMPLE_DEFAULTS) for p in defaulted):
        tested = [p.name for p in params if p.name in identity and p.default is p.empty]
        if not tested:
            return None, {p.name: p.default for p in defaulted}
    tested = [p.name for p in params if p.name in identity]
    if tested:
        return (f"forward tests argument(s) {', '.join(tested)} with is/isinstance: a trace would keep one "
                "branch"), {}
    if not defaulted:
        return None, {}
    names = ", ".join(f"{p.name}={p.default!r}" for p in defaulted[:3]) + (", ..." if len(defaulted) > 3 else "")
    if not root:
        return f"forward has defaulted arguments ({names}) that its untraced caller may set", {}
    if len(defaulted) == len(params):
        return f"every argument of forward has a default ({names}): no input to trace", {}
    steering = [p.name for p in defaulted if p.name in branched]
    if steering:
        return (f"forward branches on its defaulted argument(s) {', '.join(steering)}: kept as is, so every "
                "call takes its own branch"), {}
    odd = [p.name for p in defaulted if not isinstance(p.default, _SIMPLE_DEFAULTS)]
    if odd:
        return f"forward has defaults that cannot be guarded ({', '.join(odd)})", {}
    return None, {p.name: p.default for p in defaulted}


@functools.lru_cache(maxsize=None)
def _tested_names(fwd: object) -> tuple[frozenset[str], frozenset[str]]:
    """Names ``fwd``'s own source tests by identity or type (``is``, ``is not``, ``isinstance``,
    ``type()``: a proxy passes such a test silently), and names it branches on (``if``, ``while``,
    conditional expressions, ``and``/``or``/``not``, ``assert``). Only the source can tell: the
    tests happen in Python, before any op reaches the tracer."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fwd)))  # type: ignore[arg-type]
    except (OSError, TypeError, SyntaxError, IndentationError):
        return frozenset(), frozenset()
    identity: set[str] = set()
    branched: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            identity.update(e.id for e in (node.left, *node.comparators) if isinstance(e, ast.Name))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("isinstance", "type", "callable", "hasattr") and node.args:
            if isinstance(node.args[0], ast.Name):
                identity.add(node.args[0].id)
        if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
            branched.update(n.id for n in ast.walk(node.test) if isinstance(n, ast.Name))
        elif isinstance(node, ast.BoolOp) or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)):
            branched.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
    return frozenset(identity), frozenset(branched)


def _is_container(m: nn.Module) -> bool:
    """A module without a forward of its own (ModuleList, ModuleDict): only its children run."""
    return type(m).forward is nn.Module.forward


def _graph_module_cls() -> type[fx.GraphModule]:
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # pragma: no cover - older torch: eager code generation
        return fx.GraphModule
    return _LazyGraphModule


def materialize(model: nn.Module) -> nn.Module:
    """Generate the code of every traced region whose graph changed (lazily traced ones included),
    so the model runs, prints and pickles as a plain GraphModule would."""
    for _, gm in regions(model):
        real = getattr(gm, "real_recompile", None)
        if real is not None:
            real()
    return model


def _restore_order(gm: nn.Module, original: nn.Module) -> None:
    """GraphModule registers submodules in first-use order; put them back in the original's order
    so ``state_dict()`` and ``parameters()`` (and optimizer state built on them) line up."""
    for path, orig in original.named_modules(remove_duplicate=False):
        try:
            mod = gm.get_submodule(path) if path else gm
        except AttributeError:
            continue
        if mod is orig and path:
            continue  # the original module itself was copied over: already in order
        for attr in ("_modules", "_parameters", "_buffers"):
            mine, ref = getattr(mod, attr), getattr(orig, attr)
            order = [k for k in ref if k in mine] + [k for k in mine if k not in ref]
            if list(mine) != order:
                setattr(mod, attr, {k: mine[k] for k in order})


@dataclass
class _Walk:
    """One tracing walk: the leaf types, what failed and why, and the regions found. ``share``:
    regions are recorded (each sharing its module's state) and not installed in the model."""

    leaf_types: tuple[type, ...]
    failures: list[_Failure]
    found: list[tuple[str, fx.GraphModule]]
    share: bool = False
    per_module: bool = False
    """Each module's own forward is a region, every submodule call in it a leaf."""


def _trace_region(model: nn.Module, prefix: str, user_leaves: frozenset[str], walk: _Walk,
                  called_with_defaults: bool = False) -> nn.Module:
    """Trace ``model``; on failure make the failing submodule a leaf and retry, then recurse into it.

    A module whose forward cannot be a region (``_region_blocker``), or that has no forward
    (containers), is kept as it is, reported, and its children are traced in its place. Returns
    what belongs in ``model``'s slot: the GraphModule, unless the walk only records regions.
    """
    failures = walk.failures
    if prefix and _is_container(model):
        failures.append(_Failure(prefix, f"{type(model).__name__} has no forward of its own: its children are traced"))
        return _trace_children(model, prefix, user_leaves, walk)
    if prefix and _Tracer(frozenset(), walk.leaf_types).is_leaf_module(model, prefix):
        return model  # a leaf is called as is: nothing inside it to transform
    blocker, concrete = _region_blocker(model, root=not prefix, called_with_defaults=called_with_defaults)
    if blocker is not None:
        failures.append(_Failure(prefix, blocker))
        return _trace_children(model, prefix, user_leaves, walk)
    if walk.per_module:
        return _trace_own_forward(model, prefix, user_leaves, walk, concrete)
    leaves = set(user_leaves)
    local_failures: list[_Failure] = []
    while True:
        try:
            gm = _trace_once(model, frozenset(leaves), walk.leaf_types, concrete, walk.share)
            break
        except Exception as e:  # noqa: BLE001
            culprit = getattr(e, "_normfx_qualname", "")
            if culprit == "" or culprit in leaves:
                # The module's own forward cannot be traced: keep it and trace its children.
                failures.append(_Failure(prefix, _reason(e)))
                return _trace_children(model, prefix, user_leaves, walk)
            leaves.add(culprit)
            local_failures.append(_Failure(f"{prefix}.{culprit}" if prefix else culprit, _reason(e)))
    failures.extend(local_failures)
    walk.found.append((prefix, gm))
    # Untraceable leaves keep running their own forward; their children may still trace.
    for f in local_failures:
        rel = f.qualname[len(prefix) + 1:] if prefix else f.qualname
        _trace_children(gm.get_submodule(rel), f.qualname, _sub_leaves(user_leaves, rel), walk)
    return model if walk.share else gm


def _trace_own_forward(model: nn.Module, prefix: str, user_leaves: frozenset[str], walk: _Walk,
                       concrete: dict[str, object]) -> nn.Module:
    """``model``'s own forward as a region (every submodule call a leaf), then each child's in turn."""
    defaults_only: frozenset[str] = frozenset()
    try:
        gm = _trace_once(model, user_leaves, walk.leaf_types, concrete, walk.share, own_forward_only=True)
    except Exception as e:  # noqa: BLE001 - the forward itself cannot be traced
        walk.failures.append(_Failure(prefix, _reason(e)))
    else:
        walk.found.append((prefix, gm))
        defaults_only = _called_with_defaults(gm, model)
    _trace_children(model, prefix, user_leaves, walk, defaults_only)
    return model


def _called_with_defaults(gm: fx.GraphModule, model: nn.Module) -> frozenset[str]:
    """Direct children that ``gm`` calls, every time, with only their required arguments as values
    (any other argument passed is a constant equal to its default, as a specialized caller passes)."""
    calls: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and "." not in str(n.target):
            calls.setdefault(str(n.target), []).append(n)
    out = set()
    for name, nodes in calls.items():
        try:
            params = list(inspect.signature(type(getattr(model, name)).forward).parameters.values())[1:]
        except (TypeError, ValueError, AttributeError):
            continue
        if all(_passes_defaults_only(n, params) for n in nodes):
            out.add(name)
    return frozenset(out)


def _passes_defaults_only(node: fx.Node, params: list[inspect.Parameter]) -> bool:
    """Whether a call passes values for the required arguments only (anything else: its default)."""
    required = sum(1 for p in params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD)
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    names = [p.name for p in params]
    if len(node.args) < required or len(node.args) > len(names):
        return False
    extra = {**dict(zip(names[required:], node.args[required:])), **node.kwargs}
    return all(k in defaults and not isinstance(v, fx.Node) and _same_value(v, defaults[k]) for k, v in extra.items())


def _same_value(value: object, expected: object) -> bool:
    if expected is None or isinstance(expected, bool):
        return value is expected
    return type(value) is type(expected) and value == expected


def _trace_children(model: nn.Module, prefix: str, user_leaves: frozenset[str], walk: _Walk,
                    defaults_only: frozenset[str] = frozenset()) -> nn.Module:
    """Trace each child of a module that is kept as it is, in the child's own slot."""
    for name, child in list(model.named_children()):
        new = _trace_region(child, f"{prefix}.{name}" if prefix else name, _sub_leaves(user_leaves, name), walk,
                            name in defaults_only)
        if new is not child:
            setattr(model, name, new)
    return model


def _sub_leaves(leaves: frozenset[str], prefix: str) -> frozenset[str]:
    p = prefix + "."
    return frozenset(q[len(p):] for q in leaves if q.startswith(p))


def trace_regions(model: nn.Module, *, leaf_modules: Sequence[str | type] = ()) -> nn.Module:
    """``trace`` without its two finishing steps, for the runner: a model with no traceable part is
    returned as it is (passes still swap its leaves), and code generation is left lazy (the passes
    rewrite the graphs next; ``materialize`` generates the code once, after them)."""
    if isinstance(model, fx.GraphModule):
        return model
    names = frozenset(x for x in leaf_modules if isinstance(x, str))
    types = _normfx_leaf_types() + tuple(x for x in leaf_modules if isinstance(x, type))
    walk = _Walk(types, [], [])
    result = _trace_region(model, "", names, walk)
    failures = walk.failures
    for f in failures:
        logger.info("untraceable module '%s' kept as is: %s", f.qualname or "<root>", f.reason)
    _set_untraceable(result, tuple((f.qualname, f.reason) for f in failures))
    return result


@dataclass
class Analysis:
    """The traced regions of a model that stays as it is (``analyze``).

    Each region's GraphModule shares its module's children, tensors and hooks, so a pass that
    swaps a leaf through the graph's module paths swaps it in the model; a pass that changes a
    graph makes that region one ``install`` puts in its module's slot.
    """

    model: nn.Module
    regions: list[tuple[str, fx.GraphModule]]
    untraceable: tuple[tuple[str, str], ...]

    def signatures(self) -> dict[str, tuple]:
        """A fingerprint of every region's graph: what a pass changed shows as a different one."""
        return {p: _graph_signature(gm.graph) for p, gm in self.regions}


def _graph_signature(graph: fx.Graph) -> tuple:
    return tuple((n.name, n.op, n.target if isinstance(n.target, str) else id(n.target), str(n.args),
                  str(n.kwargs)) for n in graph.nodes)


def analyze(model: nn.Module, *, leaf_modules: Sequence[str | type] = (), per_module: bool = False) -> Analysis:
    """Trace every region of ``model`` without changing it (see ``trace`` for what a region is).

    ``per_module=True``: every module's own forward is a region of its own, each submodule call in
    it a leaf; a pass that rewrites a forward then changes only the modules whose own forward holds
    a site, and those alone are installed as GraphModules (the smallest region).
    """
    names = frozenset(x for x in leaf_modules if isinstance(x, str))
    types = _normfx_leaf_types() + tuple(x for x in leaf_modules if isinstance(x, type))
    if isinstance(model, fx.GraphModule) and not per_module:
        # A GraphModule (a normfx result or the caller's trace) is its own region, as it stands.
        regions_ = list(regions(model))
        return Analysis(model, regions_, untraceable_modules(model))
    walk = _Walk(types, [], [], share=True, per_module=per_module)
    _trace_region(model, "", names, walk)
    if per_module:
        _mark_subregions(walk.found)
    for f in walk.failures:
        logger.info("untraceable module '%s' kept as is: %s", f.qualname or "<root>", f.reason)
    return Analysis(model, walk.found, tuple((f.qualname, f.reason) for f in walk.failures))


def _mark_subregions(found: list[tuple[str, fx.GraphModule]]) -> None:
    """Tell each per-module region which of its leaf calls are regions of their own (their forward
    is transformed inside them) and whether it is the model's root (its inputs are the model's)."""
    names = {p for p, _ in found}
    for prefix, gm in found:
        pre = f"{prefix}." if prefix else ""
        gm.meta["normfx_root"] = prefix == ""
        gm.meta["normfx_subregions"] = frozenset(
            str(n.target) for n in gm.graph.nodes if n.op == "call_module" and pre + str(n.target) in names)


def install(analysis: Analysis, changed: set[str]) -> nn.Module:
    """Put each region whose graph a pass changed in its module's slot (the root's: returned), with
    its code generated; every other module stays the caller's own object."""
    root = analysis.model
    for prefix, gm in analysis.regions:   # outermost first
        if prefix not in changed or gm is root:
            continue
        real = getattr(gm, "real_recompile", None)
        if real is not None:
            real()
        if prefix == "":
            root = gm
        else:
            parent, _, name = prefix.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, name, gm)
    _set_untraceable(root, analysis.untraceable)
    return root


def trace(model: nn.Module, *, leaf_modules: Sequence[str | type] = ()) -> nn.Module:
    """Symbolically trace ``model`` with normfx's leaves; trace what can be traced.

    Args:
        model: any ``nn.Module``; a ``GraphModule`` is returned as is.
        leaf_modules: extra leaves, as qualified names (``"layer1.0"``) or module types.

    Returns:
        A ``GraphModule`` when the model traces whole (untraceable submodules become leaves);
        otherwise ``model`` itself with its largest traceable submodules replaced by GraphModules.
        ``untraceable_modules(result)`` lists what could not be traced and why. The input is
        modified only in that last case, so one-liners call ``trace`` on their own copy.

    Raises:
        TraceFailure: when no part of the model can be traced; the message names the module and
            the line that stopped the tracer.

    Example:
        >>> gm = normfx.trace(torchvision.models.resnet18())
        >>> isinstance(gm, torch.fx.GraphModule)
        True
    """
    if isinstance(model, fx.GraphModule):
        return model
    result = trace_regions(model, leaf_modules=leaf_modules)
    if not any(True for _ in regions(result)):
        failures = untraceable_modules(result)
        where, why = failures[0] if failures else ("", "no traceable code")
        raise TraceFailure(
            f"normfx could not trace any part of {type(model).__name__}: module "
            f"'{where or '<root>'}' failed with {why}. Mark the module as a leaf "
            "with leaf_modules=[...] or make its forward free of data-dependent control flow."
        )
    return materialize(result)


def untraceable_modules(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """``(qualified name, tracer's reason)`` for every module ``trace`` had to keep opaque."""
    if isinstance(model, fx.GraphModule):
        return tuple(model.meta.get(_UNTRACEABLE_ATTR, ()))
    return tuple(getattr(model, _UNTRACEABLE_ATTR, ()))


def _set_untraceable(model: nn.Module, failures: tuple[tuple[str, str], ...]) -> None:
    # GraphModule.__deepcopy__ keeps ``meta`` and drops other attributes; a plain module keeps both.
    if isinstance(model, fx.GraphModule):
        model.meta[_UNTRACEABLE_ATTR] = failures
    else:
        object.__setattr__(model, _UNTRACEABLE_ATTR, failures)


def regions(model: nn.Module) -> Iterator[tuple[str, fx.GraphModule]]:
    """Every traced region of ``model`` (``(qualified name, GraphModule)``), outermost first."""
    for name, m in model.named_modules(remove_duplicate=True):
        if isinstance(m, fx.GraphModule):
            yield name, m


class Outside(NamedTuple):
    """A module no traced region calls: a pass can still swap it as a leaf, never rewrite around it."""

    qualname: str
    module: nn.Module
    why: str
    """The innermost untraceable ancestor's reason (or why no graph calls it)."""
    owner: str | None = None
    """That untraceable module's qualified name (the module itself, if it is one), if any."""


def outside_modules(analysis: Analysis) -> list[Outside]:
    """Every module of the analysed model that no traced region calls, outermost first, with the
    reason.

    A module a region's graph calls (a ``call_module`` or ``get_attr`` target) is the region's to
    transform, and so is everything inside it (a ProgressiveRepBN's LayerNorm, a parametrization's
    cast): those are not listed, unless the module is itself untraceable (the graph calls it as an
    opaque leaf; what is inside it is listed). What is left lives in forwards that could not be
    traced. Containers are listed too; passes look only at the module types they rewrite.
    """
    model = analysis.model
    region_names = {p for p, _ in analysis.regions}
    failures = analysis.untraceable
    leaf = _Tracer(frozenset(), _normfx_leaf_types())
    visible: set[str] = set()
    for prefix, gm in analysis.regions:
        pre = f"{prefix}." if prefix else ""
        for node in gm.graph.nodes:
            if node.op in ("call_module", "get_attr") and isinstance(node.target, str):
                visible.add(pre + node.target)
    innermost_first = sorted(failures, key=lambda f: -len(f[0]))
    out: list[Outside] = []
    captured: list[str] = []
    for name, m in model.named_modules(remove_duplicate=True):
        if any(name.startswith(c + ".") for c in captured) or name in region_names:
            continue
        is_leaf = bool(name) and not _is_container(m) and leaf.is_leaf_module(m, name)
        if is_leaf:
            # A leaf's insides are its own, called or not: a PRepBN's LayerNorm, the norms of a
            # torch module whose forward reads their tensors directly (TransformerEncoderLayer).
            captured.append(name)
        if name in visible:
            # A graph calls it: a leaf is that region's; any other module a graph calls is one whose
            # forward could not be traced, and what is inside it is outside every region.
            continue
        owner, why = next(((q, w) for q, w in innermost_first if q == "" or name == q or name.startswith(q + ".")),
                          (None, "not called by any traced forward"))
        out.append(Outside(name, m, why, owner))
    return out
