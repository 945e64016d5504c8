"""Tensor shapes on a traced region, from example inputs, without running the model on data.

A fold that goes through a reshape (LeViT's ``bn(linear(x).flatten(0, 1)).reshape_as(x)``) is exact
only when the BatchNorm's channel axis is the conv's or linear's output axis after the reshape,
which the graph alone does not say. ``propagate_shapes`` records ``node.meta["tensor_meta"]`` on
every node of a region by interpreting it on fake tensors shaped like the example inputs: a fake
copy of the region runs (no real arithmetic, no state written, the model's own hooks removed from
the copy), so the caller's model and its hooks observe nothing.
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

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


class _QuietShapeProp(ShapeProp):
    """ShapeProp on a fake copy of the region whose modules carry no hooks: the user's hooks are
    not called with fake tensors."""

    def __init__(self, gm: fx.GraphModule, fake_mode: object) -> None:
        super().__init__(gm, fake_mode=fake_mode)
        assert self.fake_module is not None
        _strip_hooks(self.fake_module)


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
        if prefix in calls and _propagate(gm, *calls[prefix], fake_mode):
            done.append(prefix)
    return done


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _strip_hooks(model: nn.Module) -> None:
    for m in model.modules():
        for attr in _HOOK_DICTS:
            if attr in m.__dict__:
                m.__dict__[attr] = type(m.__dict__[attr])()


def _propagate(gm: fx.GraphModule, args: tuple, kwargs: dict, fake_mode: object) -> bool:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
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
        # (ShapeProp prints the traceback of a node that fails: the log line below says it once.)
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            _QuietShapeProp(gm, fake_mode).propagate(*values)
    except Exception as e:  # noqa: BLE001
        logger.info("example_inputs: a traced forward could not run on them (%s); no shapes recorded", _first_line(e))
        for n in gm.graph.nodes:
            n.meta.pop("tensor_meta", None)
        return False
    return True
