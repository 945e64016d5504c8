"""When a module's forward may be a traced region, and how a specialized one is guarded.

A region's arguments become graph placeholders, so a Python test on one (``x is None``,
``isinstance``, a defaulted flag) would be decided once, at trace time, and the graph would keep
that branch silently. These rules decide, from the forward's signature and its own source, whether
a module may be a region and which arguments are fixed at their defaults (behind
``check_specialized``, a graph guard that raises ``SpecializedCallError`` on any other value).
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch
import torch.fx as fx
import torch.nn as nn

from normfx.errors import SpecializedCallError

__all__ = ["check_specialized", "guard_specialized", "region_blocker", "called_with_defaults"]


@fx.node.has_side_effect
def check_specialized(value: object, expected: object, name: str, owner: str) -> None:
    """Graph guard of a traced forward whose ``name`` argument was fixed at its default ``expected``
    (``None``, a bool, a number or a string): any other value raises instead of silently taking the
    traced branch."""
    if not _same_value(value, expected):
        raise SpecializedCallError(
            f"{owner}.forward was traced by normfx for {name}={expected!r} (its default) and called with "
            f"{name}={type(value).__name__ if isinstance(value, torch.Tensor) else repr(value)}. The traced "
            f"graph takes the branch of the default only: call it with the default. normfx's one-liners "
            f"do not take leaf_modules= yet; to keep this forward untransformed, transform the submodules "
            f"you need one by one."
        )


def guard_specialized(graph: fx.Graph, owner: str, concrete: dict[str, object]) -> None:
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
            graph.call_function(check_specialized, (ph, value, name, owner))  # type: ignore[arg-type]


_SIMPLE_DEFAULTS = (type(None), bool, int, float, str)


def region_blocker(model: nn.Module, root: bool,
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


def called_with_defaults(gm: fx.GraphModule, model: nn.Module) -> frozenset[str]:
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
