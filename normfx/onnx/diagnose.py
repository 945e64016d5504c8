"""Why an export failed, in one sentence: the deepest message of an exception chain, and the graph
node (op and the module that produced it) the exporter's message names."""
from __future__ import annotations

import re

import torch.nn as nn

from normfx.analysis import analyze
from normfx.trace import regions

__all__ = ["chain_text", "first_line", "culprit"]


def chain_text(e: BaseException | None) -> str:
    parts: list[str] = []
    while e is not None and len(parts) < 8:
        parts.append(str(e))
        e = e.__cause__
    return " ".join(parts)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(e: BaseException) -> str:
    """The most specific one-line message: the first line of the deepest cause that has one."""
    best = ""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = _ANSI.sub("", str(cur)).strip()
        if text:
            best = f"{type(cur).__name__}: {text.splitlines()[0][:300]}"
        cur = cur.__cause__
    return best



def culprit(model: nn.Module, message: str) -> str:
    """' (op X, produced by module Y)' for the first graph node whose op the error message names."""
    ops = set(re.findall(r"(?:aten|prim|torch\.ops\.\w+|[A-Za-z_]\w*)(?:::|\.)([A-Za-z_]\w*)", message))
    traced = list(regions(model)) or analyze(model).regions   # a model kept as a tree: read its graphs
    for prefix, gm in traced:
        for node in gm.graph.nodes:
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            if node.op == "call_module":
                label = type(gm.get_submodule(node.target)).__name__
                owner = str(node.target)
            else:
                label = node.target if isinstance(node.target, str) else getattr(
                    node.target, "__name__", str(node.target))
                stack = node.meta.get("nn_module_stack") or {}
                owner = next(reversed(stack.values()))[0] if stack else ""
            label = str(label).split(".")[-2] if str(label).endswith(".default") else str(label)
            if label in ops or (node.op == "call_module" and label in message):
                where = ".".join(x for x in (prefix, owner) if x) or "<root>"
                return f" at op '{label}', produced by module '{where}'"
    return ""


