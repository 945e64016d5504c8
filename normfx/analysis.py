"""Analysis: the traced regions of a model that stays as it is, and the modules no region calls.

``analyze`` traces regions whose GraphModules share their module's children, tensors and hooks, so
passes find and verify sites on graphs while leaf swaps land in the model itself; ``install`` puts
only the regions whose graph a pass changed in their modules' slots; ``outside_modules`` lists what
no region calls, with the reason, for the passes' second halves.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.graph import _format_target
from torch.fx.graph_module import _format_import_block, _forward_from_src
from torch.package import sys_importer

from normfx.kinds import original_class
from normfx.shapes import propagate_shapes
from normfx.trace import (_is_container, _normfx_leaf_types, _set_untraceable, _trace_region, _Tracer, _Walk, regions,
                          untraceable_modules)

__all__ = ["Analysis", "analyze", "install", "Outside", "outside_modules", "RewrittenForward", "rewritten"]

logger = logging.getLogger("normfx")


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


def analyze(model: nn.Module, *, leaf_modules: Sequence[str | type] = (), per_module: bool = False,
            example_inputs: tuple[torch.Tensor, ...] | None = None) -> Analysis:
    """Trace every region of ``model`` without changing it (see ``trace`` for what a region is).

    ``per_module=True``: every module's own forward is a region of its own, each submodule call in
    it a leaf; a pass that rewrites a forward then changes only the modules whose own forward holds
    a site, and those alone are installed as GraphModules (the smallest region).

    ``example_inputs``: the model's positional inputs; every region the forward calls gets its nodes'
    shapes (``normfx.shapes.propagate_shapes``, on fake tensors).
    """
    names = frozenset(x for x in leaf_modules if isinstance(x, str))
    types = _normfx_leaf_types() + tuple(x for x in leaf_modules if isinstance(x, type))
    if isinstance(model, fx.GraphModule) and not per_module:
        # A GraphModule (a normfx result or the caller's trace) is its own region, as it stands.
        analysis = Analysis(model, list(regions(model)), untraceable_modules(model))
    else:
        walk = _Walk(types, [], [], share=True, per_module=per_module)
        _trace_region(model, "", names, walk)
        if per_module:
            _mark_subregions(walk.found)
        for f in walk.failures:
            logger.info("untraceable module '%s' kept as is: %s", f.qualname or "<root>", f.reason)
        analysis = Analysis(model, walk.found, tuple((f.qualname, f.reason) for f in walk.failures))
    if example_inputs is not None and analysis.regions:
        propagate_shapes(model, analysis.regions, example_inputs)
    return analysis


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
    """Give each module whose region's graph a pass changed the graph's code as its forward, keeping
    the object: its class becomes a subclass of its own (``RewrittenForward``), so ``isinstance``,
    its methods and attributes, hooks and ``state_dict`` keys stay. A region that is a GraphModule
    already (the caller's own trace) is replaced by its rewritten graph in its slot."""
    root = analysis.model
    for prefix, gm in analysis.regions:   # outermost first
        if prefix not in changed or gm is root:
            continue
        module = root.get_submodule(prefix) if prefix else root
        if not isinstance(module, fx.GraphModule):
            _rewrite_forward(module, gm)   # generates the code once, for the module's class
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


class RewrittenForward(nn.Module):
    """Mixin of a module whose forward a normfx pass rewrote (``install``): the module's class is a
    subclass of its own class, with the same name, whose ``forward`` is the generated code of the
    rewritten graph. Pickling and deep copies rebuild the subclass from the base class and the code
    (as a GraphModule pickles: source and import block)."""

    _normfx_base: type
    _normfx_src: str
    _normfx_globals: dict[str, Any]

    def __reduce_ex__(self, protocol):  # type: ignore[override]
        imports = _format_import_block(self._normfx_globals, sys_importer)
        _REBUILT.setdefault((self._normfx_base, imports, self._normfx_src), type(self))   # copies share it
        return _rebuilt, (self._normfx_base, imports, self._normfx_src), dict(self.__dict__)


def rewritten(m: nn.Module) -> bool:
    """Whether ``m``'s forward is one a normfx pass rewrote (its class is kept as a subclass)."""
    return isinstance(m, RewrittenForward)


def _class_of(base: type, src: str, globals_: dict[str, Any]) -> type[nn.Module]:
    forward = _forward_from_src(src, globals_)
    ns = {"forward": forward, "_normfx_base": base, "_normfx_src": src, "_normfx_globals": globals_,
          "__module__": base.__module__, "__doc__": base.__doc__}
    return type(base.__name__, (RewrittenForward, base), ns)


_REBUILT: dict[tuple[type, str, str], type[nn.Module]] = {}


def _rebuilt(base: type, imports: str, src: str) -> nn.Module:
    """Unpickle/deep-copy target of a rewritten module (its state is set on it afterwards); one class
    per code, so copies share it."""
    key = (base, imports, src)
    if key not in _REBUILT:
        namespace: dict[str, Any] = {}
        exec(imports, namespace)   # noqa: S102 - torch.fx's own way of rebuilding generated code
        _REBUILT[key] = _class_of(base, src, namespace)
    cls = _REBUILT[key]
    return cls.__new__(cls)


def _rewrite_forward(module: nn.Module, gm: fx.GraphModule) -> None:
    """Swap ``module``'s class for a ``RewrittenForward`` subclass running ``gm``'s code. ``gm`` shares
    the module's children, parameters and buffers (``analyze``); attributes a pass set on the graph
    module alone are moved over."""
    code = gm.graph.python_code(root_module="self")
    for node in gm.graph.nodes:
        target = str(node.target)
        if node.op == "get_attr" and "." not in target and not hasattr(module, target) and hasattr(gm, target):
            setattr(module, target, getattr(gm, target))
    module.__class__ = _class_of(original_class(module), _direct_calls(code.src, gm.graph, module), code.globals)


_MISSING = object()


def _dict_path(module: nn.Module, target: str) -> str:
    """The code that finds the submodule ``target`` of ``module`` (``self``): each step through its
    owner's ``_modules`` dict (``self._modules['a']._modules['0']``) while that finds what
    ``getattr`` finds (the name is a registered child and the owner's class neither defines it nor
    customizes attribute lookup), ``getattr`` from the first owner where it might not."""
    owner: Any = module
    path = "self"
    names = target.split(".")
    for i, name in enumerate(names):
        cls = type(owner)
        if (not isinstance(owner, nn.Module) or name not in owner._modules
                or cls.__getattr__ is not nn.Module.__getattr__ or cls.__getattribute__ is not object.__getattribute__
                or getattr(cls, name, _MISSING) is not _MISSING):
            return _format_target(path, ".".join(names[i:]))
        owner = owner._modules[name]
        path += f"._modules[{name!r}]"
    return path


def _direct_calls(src: str, graph: fx.Graph, module: nn.Module) -> str:
    """The generated code with each submodule call looked up through its owners' ``_modules`` dicts
    instead of ``getattr``, where that finds what ``getattr`` finds (``_dict_path``).

    The lookup still happens at the call, as before (a submodule swapped later is the one called);
    it only skips ``nn.Module.__getattr__``, which runs after a failed instance lookup for every
    step of a path: ``getattr(getattr(self.stages, "2"), "5").conv`` costs four failed lookups per
    call, 524 per forward of a deployed MobileOne-S0 (about 4% of its latency at batch 1)."""
    for target in {str(n.target) for n in graph.nodes if n.op == "call_module"}:
        src = src.replace(f"= {_format_target('self', target)}(", f"= {_dict_path(module, target)}(")
    return src


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
    captured: set[str] = set()
    for name, m in model.named_modules(remove_duplicate=True):
        parts = name.split(".")
        if any(".".join(parts[:i]) in captured for i in range(1, len(parts))) or name in region_names:
            continue
        is_leaf = bool(name) and not _is_container(m) and leaf.is_leaf_module(m, name)
        if is_leaf:
            # A leaf's insides are its own, called or not: a PRepBN's LayerNorm, the norms of a
            # torch module whose forward reads their tensors directly (TransformerEncoderLayer).
            captured.add(name)
        if name in visible:
            # A graph calls it: a leaf is that region's; any other module a graph calls is one whose
            # forward could not be traced, and what is inside it is outside every region.
            continue
        owner, why = next(((q, w) for q, w in innermost_first if q == "" or name == q or name.startswith(q + ".")),
                          (None, "not called by any traced forward"))
        out.append(Outside(name, m, why, owner))
    return out
