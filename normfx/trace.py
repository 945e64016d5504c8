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

import logging
import traceback
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["trace", "regions", "TraceFailure", "untraceable_modules"]

logger = logging.getLogger("normfx")

_UNTRACEABLE_ATTR = "_normfx_untraceable"


class TraceFailure(RuntimeError):
    """Nothing in the model could be traced; the message names the module and the line."""


def is_frozen_bn(m: nn.Module) -> bool:
    """torchvision's / timm's FrozenBatchNorm2d: BatchNorm math with all four tensors as buffers."""
    return type(m).__name__.startswith("FrozenBatchNorm") and all(
        hasattr(m, a) for a in ("weight", "bias", "running_mean", "running_var")
    )


def is_mode_dependent_leaf(m: nn.Module) -> bool:
    """A parameter-free module whose forward branches on ``self.training`` (DropPath, StochasticDepth,
    DropBlock): tracing through it would freeze the mode it had at trace time into the graph."""
    from normfx.match import forward_source_has  # match imports this module

    return forward_source_has(type(m), "self.training")[0] and next(m.parameters(), None) is None


def _normfx_leaf_types() -> tuple[type, ...]:
    from normfx import nn as nfnn  # local: nn/ may import trace helpers

    return tuple(getattr(nfnn, "LEAF_MODULES", ()))


@dataclass(frozen=True)
class _Failure:
    qualname: str
    reason: str


class _Tracer(fx.Tracer):
    def __init__(self, leaves: frozenset[str], leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self._leaves = leaves
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self._leaves:
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
    model: nn.Module, leaves: frozenset[str], leaf_types: tuple[type, ...]
) -> fx.GraphModule:
    tracer = _Tracer(leaves, leaf_types)
    graph = tracer.trace(model)
    name = type(model).__name__
    # Lazy code generation: a one-liner rewrites the graph right away, so generating the forward's
    # code here would be thrown away; ``materialize`` generates it once, after the passes.
    gm = _graph_module_cls()(tracer.root, graph, name)
    _restore_order(gm, model)
    return gm


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


def _trace_region(
    model: nn.Module, prefix: str, leaf_types: tuple[type, ...], user_leaves: frozenset[str],
    failures: list[_Failure],
) -> nn.Module:
    """Trace ``model``; on failure make the failing submodule a leaf and retry, then recurse into it."""
    if prefix and _Tracer(frozenset(), leaf_types).is_leaf_module(model, prefix):
        return model  # a leaf is called as is: nothing inside it to transform
    leaves = set(user_leaves)
    local_failures: list[_Failure] = []
    while True:
        try:
            gm = _trace_once(model, frozenset(leaves), leaf_types)
            break
        except Exception as e:  # noqa: BLE001
            culprit = getattr(e, "_normfx_qualname", "")
            if culprit == "" or culprit in leaves:
                # The module's own forward cannot be traced: keep it and trace its children.
                failures.append(_Failure(prefix, _reason(e)))
                for name, child in list(model.named_children()):
                    new = _trace_region(
                        child, f"{prefix}.{name}" if prefix else name, leaf_types,
                        _sub_leaves(user_leaves, name), failures,
                    )
                    if new is not child:
                        setattr(model, name, new)
                return model
            leaves.add(culprit)
            local_failures.append(_Failure(f"{prefix}.{culprit}" if prefix else culprit, _reason(e)))
    failures.extend(local_failures)
    # Untraceable leaves keep running their own forward; their children may still trace.
    for f in local_failures:
        rel = f.qualname[len(prefix) + 1:] if prefix else f.qualname
        leaf = gm.get_submodule(rel)
        for name, child in list(leaf.named_children()):
            new = _trace_region(
                child, f"{f.qualname}.{name}", leaf_types, _sub_leaves(user_leaves, f"{rel}.{name}"),
                failures,
            )
            if new is not child:
                setattr(leaf, name, new)
    return gm


def _sub_leaves(leaves: frozenset[str], prefix: str) -> frozenset[str]:
    p = prefix + "."
    return frozenset(q[len(p):] for q in leaves if q.startswith(p))


def trace(model: nn.Module, *, leaf_modules: Sequence[str | type] = (), _lazy: bool = False) -> nn.Module:
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
        >>> type(gm).__name__
        'GraphModule'
    """
    if isinstance(model, fx.GraphModule):
        return model
    names = frozenset(x for x in leaf_modules if isinstance(x, str))
    types = _normfx_leaf_types() + tuple(x for x in leaf_modules if isinstance(x, type))
    failures: list[_Failure] = []
    result = _trace_region(model, "", types, names, failures)
    if not any(True for _ in regions(result)):
        first = failures[0] if failures else _Failure("", "no traceable code")
        raise TraceFailure(
            f"normfx could not trace any part of {type(model).__name__}: module "
            f"'{first.qualname or '<root>'}' failed with {first.reason}. Mark the module as a leaf "
            "with leaf_modules=[...] or make its forward free of data-dependent control flow."
        )
    for f in failures:
        logger.info("untraceable module '%s' kept as is: %s", f.qualname or "<root>", f.reason)
    object.__setattr__(result, _UNTRACEABLE_ATTR, tuple((f.qualname, f.reason) for f in failures))
    return result if _lazy else materialize(result)


def untraceable_modules(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """``(qualified name, tracer's reason)`` for every module ``trace`` had to keep opaque."""
    return tuple(getattr(model, _UNTRACEABLE_ATTR, ()))


def regions(model: nn.Module) -> Iterator[tuple[str, fx.GraphModule]]:
    """Every traced region of ``model`` (``(qualified name, GraphModule)``), outermost first."""
    for name, m in model.named_modules(remove_duplicate=True):
        if isinstance(m, fx.GraphModule):
            yield name, m
