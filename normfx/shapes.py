"""Tensor shapes on a traced region, from example inputs, without running the model on data.

A fold that goes through a reshape (LeViT's ``bn(linear(x).flatten(0, 1)).reshape_as(x)``) is exact
only when the BatchNorm's channel axis is the conv's or linear's output axis after the reshape,
which the graph alone does not say. ``propagate_shapes`` records ``node.meta["tensor_meta"]`` on
every node of a region by interpreting it on fake tensors shaped like the example inputs: one fake
copy of the model (no real arithmetic, no state written, the model's own hooks removed from the
copy) runs once to find each region's inputs, and each region's graph is interpreted on the fake
copy of its module, so the caller's model and its hooks observe nothing.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

__all__ = ["propagate_shapes", "as_inputs"]

logger = logging.getLogger("normfx")

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def as_inputs(example_inputs: torch.Tensor | Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, ...] | None:
    """``example_inputs`` as a tuple of tensors (``None`` stays ``None``).

    Raises:
        TypeError: something other than a tensor or a sequence of tensors.
    """
    if example_inputs is None:
        return None
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a tensor or a non-empty sequence of tensors the model's "
                        f"forward takes positionally, got {type(example_inputs).__name__}")
    return inputs


class _FakeShapes(fx.Interpreter):
    """A region's graph run on the fake copy of its module (the model's fake copy, hooks stripped):
    every node's ``tensor_meta`` as ``ShapeProp`` records it, without copying the region again."""

    def __init__(self, graph: fx.Graph, fake_module: nn.Module, fake_mode: Any) -> None:
        super().__init__(fake_module, graph=graph)
        self.fake_mode = fake_mode

    def run_node(self, n: fx.Node) -> Any:
        with self.fake_mode:
            result = super().run_node(n)
        found = False

        def meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        value = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = value
        return result


def propagate_shapes(model: nn.Module, regions: Sequence[tuple[str, fx.GraphModule]],
                     inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """Record ``tensor_meta`` (shape, dtype, ...) on the nodes of every region of ``model`` for model
    inputs shaped like ``inputs``; returns the prefixes of the regions that got shapes.

    A fake copy of the model (hooks removed) runs once on fake inputs, and each region's own inputs
    are taken where its module is called; a region whose module the forward does not call, or that
    cannot run on them, is left without shapes (and its shape-dependent sites say so)."""
    from torch._dynamo.utils import deepcopy_to_fake_tensor
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    calls: dict[str, tuple[tuple, dict]] = {}
    try:
        fake = deepcopy_to_fake_tensor(model, fake_mode)
        _strip_hooks(fake)
        for prefix, _ in regions:
            def keep(_m: nn.Module, args: tuple, kwargs: dict, prefix: str = prefix) -> None:
                calls.setdefault(prefix, (args, kwargs))
            (fake.get_submodule(prefix) if prefix else fake).register_forward_pre_hook(keep, with_kwargs=True)
        with torch.no_grad(), fake_mode:
            fake(*[fake_mode.from_tensor(t) for t in inputs])
    except Exception as e:  # noqa: BLE001 - shapes are an optional aid to the passes
        logger.info("example_inputs: the model could not run on them (%s); no shapes recorded", _first_line(e))
        return []
    done = []
    for prefix, gm in regions:
        module = fake.get_submodule(prefix) if prefix else fake
        if prefix in calls and _propagate(gm.graph, module, *calls[prefix], fake_mode):
            done.append(prefix)
    return done


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _strip_hooks(model: nn.Module) -> None:
    for m in model.modules():
        for attr in _HOOK_DICTS:
            if attr in m.__dict__:
                m.__dict__[attr] = type(m.__dict__[attr])()


def _propagate(graph: fx.Graph, module: nn.Module, args: tuple, kwargs: dict, fake_mode: object) -> bool:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    values = list(args[:len(placeholders)])
    for n in placeholders[len(values):]:
        name = str(n.target).lstrip("*")
        if name in kwargs:
            values.append(kwargs[name])
        elif n.args:
            values.append(n.args[0])   # an argument left at its default
        else:
            return False
    try:
        with torch.no_grad():
            _FakeShapes(graph, module, fake_mode).run(*values)
    except Exception as e:  # noqa: BLE001
        logger.info("example_inputs: a traced forward could not run on them (%s); no shapes recorded", _first_line(e))
        for n in graph.nodes:
            n.meta.pop("tensor_meta", None)
        return False
    return True
