"""What a transform is: its steps as the runner runs them, and the one registered object per transform.

A pass is a function over one traced region, ``fn(gm, scope) -> PassResult`` (mutating ``gm`` in
place, or only planning with ``scope.plan``), with its second half ``fn(model, outside, scope)`` for
the modules no traced region calls. A transform that needs no graph (``freeze``, ``directpred``,
``linear_attention``) is one ``model_pass(model, scope) -> (PassResult, notes)`` instead.
``normfx.passes.registry`` holds the ordered tuple of ``Transform`` objects every list derives from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch.fx as fx
import torch.nn as nn

from normfx.analysis import Outside
from normfx.report import PassResult
from normfx.scope import Scope

__all__ = ["GraphPass", "OutsidePass", "ModelPass", "Step", "Transform"]

GraphPass = Callable[[fx.GraphModule, Scope], PassResult]
OutsidePass = Callable[[nn.Module, list[Outside], Scope], PassResult]
ModelPass = Callable[[nn.Module, Scope], "tuple[PassResult, tuple[str, ...]]"]


@dataclass(frozen=True)
class Step:
    """One pass as the runner runs it: its report name, and either its pass over a traced region with
    its pass over the modules no region calls, or one pass over the whole model.

    ``view``: the regions a graph pass wants: ``"flat"`` (the largest traceable ones, so a pattern can
    span modules — folds) or ``"module"`` (each module's own forward, so a rewritten forward lands in
    the smallest module that holds it — inserted casts)."""

    name: str
    graph_pass: GraphPass | None = None
    outside_pass: OutsidePass | None = None
    view: Literal["flat", "module"] = "flat"
    model_pass: ModelPass | None = None

    def __post_init__(self) -> None:
        if (self.model_pass is None) == (self.graph_pass is None or self.outside_pass is None):
            raise TypeError(f"step {self.name!r}: give graph_pass and outside_pass, or model_pass")


@dataclass(frozen=True)
class Transform:
    """One registered transform: everything the runner, ``deploy``, ``inspect``, the docs and the
    contract tests need to know of it.

    ``steps(config)`` are what it runs; ``deploy`` the steps ``normfx.deploy`` runs to finalize what
    it inserted (in registry order); ``check(model, config)`` its preconditions on the caller's model,
    raised before anything is copied; ``tensors="own"`` when its steps need a copy that owns its
    tensors (parametrizations, flags set in place); ``inspect`` the dry-run columns of
    ``normfx inspect``, ``(column, config)``; ``example`` a config the docs and the contract tests
    use."""

    name: str
    config: type
    steps: Callable[[Any], Sequence[Step]]
    summary: str
    exact: bool
    paper: str = ""
    deploy: tuple[Step, ...] = ()
    check: Callable[[nn.Module, Any], None] | None = None
    tensors: Literal["share", "own"] = "share"
    inspect: tuple[tuple[str, Any], ...] = field(default=())
    example: Any = None
    page: str = ""
    """Its page under ``docs/``."""
    sites: Literal["norm", "attention"] = "norm"
    """What ``inspect`` lists this transform's sites as: normalization layers or attention modules."""

    def example_config(self) -> Any:
        """The config the docs and the contract tests use: ``example``, else the defaults."""
        return self.example if self.example is not None else self.config()
