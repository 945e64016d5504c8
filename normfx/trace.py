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

import copy
import logging
import traceback
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfx.errors import SpecializedCallError, TraceFailure
from normfx.region_rules import called_with_defaults, guard_specialized, region_blocker
from normfx.kinds import is_frozen_bn, is_mode_dependent_leaf
from normfx.nn import LEAF_MODULES

__all__ = ["trace", "trace_regions", "regions", "materialize", "untraceable_modules", "TraceFailure",
           "SpecializedCallError"]

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
    before = _snapshot(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    finally:
        written = _restore(before)   # tracing leaves nothing behind, failed or not
    if written:
        raise _StateWrite(written, model)
    if concrete:
        guard_specialized(graph, type(model).__name__, concrete)
    name = type(model).__name__
    # Lazy code generation: a one-liner rewrites the graph right away, so generating the forward's
    # code here would be thrown away; ``materialize`` generates it once, after the passes.
    gm = _graph_module_cls()(tracer.root, graph, name)
    if share:
        _share_state(gm, model)
    else:
        _restore_order(gm, model)
    return gm


_Snapshot = list[tuple[nn.Module, dict, dict, dict, dict, dict]]
_PLAIN = (bool, int, float, str, type(None))
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def _snapshot(model: nn.Module) -> _Snapshot:
    """Every module's attributes, parameters, buffers and children, as they are (shallow), and the
    contents of its plain ``dict``/``list`` attributes (a cache a forward fills, as timm's LeViT
    fills ``attention_bias_cache``, would otherwise keep a Proxy of this trace)."""
    return [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules),
             {k: (v, copy.copy(v)) for k, v in m.__dict__.items()
              if type(v) in (dict, list) and k not in _MODULE_INTERNALS})
            for m in model.modules()]


def _same(a: object, b: object) -> bool:
    return a is b or (type(a) is type(b) and isinstance(a, _PLAIN) and a == b)


def _same_contents(now: dict | list, then: dict | list) -> bool:
    if isinstance(now, dict) and isinstance(then, dict):
        return now.keys() == then.keys() and all(_same(now[k], then[k]) for k in now)
    return len(now) == len(then) and all(_same(a, b) for a, b in zip(now, then))


def _restore(snapshot: _Snapshot) -> list[tuple[nn.Module, str]]:
    """Put back whatever a trace wrote into the modules (a lazy forward's ``self.scales = ...``, or a
    cache it fills, would otherwise leave a Proxy in the model); returns ``(module, attribute)`` for
    each write."""
    written: list[tuple[nn.Module, str]] = []
    for m, attrs, params, buffers, children, containers in snapshot:
        pairs: list[tuple[dict, dict]] = [(m._parameters, params), (m._buffers, buffers), (m._modules, children)]
        if not isinstance(m, fx.GraphModule):
            # A generated forward writes no state of its own; tracing one sets torch.fx's lazy
            # code-generation attributes, which are its business.
            pairs.append((m.__dict__, attrs))
        for now, then in pairs:
            changed = [k for k in {**then, **now} if k not in now or k not in then or not _same(now[k], then[k])]
            changed = [k for k in changed if k not in ("_parameters", "_buffers", "_modules")]
            if changed:
                written += [(m, k) for k in changed]
                now.clear()
                now.update(then)
        for name, (obj, then_contents) in containers.items():
            if not _same_contents(obj, then_contents):
                written.append((m, name))
                if isinstance(obj, dict):
                    obj.clear()
                    obj.update(then_contents)   # type: ignore[arg-type]
                else:
                    obj[:] = then_contents
    return written


class _StateWrite(Exception):
    """A traced forward wrote module state: a graph would drop the write, so the module that owns
    the state is kept as it is (an untraceable leaf) and the trace tried again."""

    def __init__(self, written: list[tuple[nn.Module, str]], model: nn.Module) -> None:
        m, attr = written[-1]
        super().__init__(f"its forward writes module state while it runs ('{attr}' of {type(m).__name__}); "
                         "a traced graph would drop the write")
        # The culprit, as for any tracer error: the innermost module whose state was written.
        names = {id(mod): n for n, mod in model.named_modules(remove_duplicate=False)}
        self._normfx_qualname = max((names.get(id(mod), "") for mod, _ in written), key=len)


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
    # A pass may parametrize a tensor of the model while the region is open (fixed_point casts a
    # conv subclass's weight from its caller's region): the property lives on the model's class, so
    # the region reads what it does not hold itself from the model. GraphModule gives every instance
    # a class of its own, so this is the region's alone.
    gm.__dict__["_normfx_owner"] = model
    type(gm).__getattr__ = _owner_getattr   # type: ignore[method-assign]


def _owner_getattr(self: nn.Module, name: str) -> Any:
    try:
        return nn.Module.__getattr__(self, name)
    except AttributeError:
        owner = self.__dict__.get("_normfx_owner")
        if owner is None or not isinstance(getattr(type(owner), name, None), property):
            raise
        return getattr(owner, name)


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
    blocker, concrete = region_blocker(model, root=not prefix, called_with_defaults=called_with_defaults)
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
        defaults_only = called_with_defaults(gm, model)
    _trace_children(model, prefix, user_leaves, walk, defaults_only)
    return model


def _trace_children(model: nn.Module, prefix: str, user_leaves: frozenset[str], walk: _Walk,
                    defaults_only: frozenset[str] = frozenset()) -> nn.Module:
    """Trace each child of a module that is kept as it is, in the child's own slot."""
    for name, child in list(model.named_children()):
        if name in user_leaves:
            continue   # the caller's leaf: kept opaque, nothing inside it traced
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


