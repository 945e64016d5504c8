"""One file per pass: ``fn(gm, **options) -> PassResult``, mutating ``gm`` in place, and its
``fn_outside(model, outside, **options) -> PassResult`` for the modules no traced region calls
(leaf swaps in place, or skips that say why).

``DEPLOY_STEPS`` is what ``normfx.deploy`` runs, in this order: finalize what training left
(random-control entries, trainable binary points), then fold (RepBN into Linears, BatchNorm into
convs). A pass that inserts a training-time construct adds the step that finalizes it here.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Literal, NamedTuple

import torch.fx as fx
import torch.nn as nn

from normfx.passes.directpred import bake_directpred, bake_directpred_outside
from normfx.passes.fixed_point import (freeze_binary_points, freeze_binary_points_outside, insert_fixed_point,
                                       insert_fixed_point_outside)
from normfx.passes.fold_affine import fold_repbn, fold_repbn_outside
from normfx.passes.fold_convbn import fold_convbn, fold_convbn_outside
from normfx.passes.freeze import bake_random_entries, bake_random_entries_outside, freeze_model
from normfx.passes.swap_layernorm import swap_layernorm, swap_layernorm_outside
from normfx.report import PassResult
from normfx.analysis import Outside

__all__ = ["fold_convbn", "fold_convbn_outside", "fold_repbn", "fold_repbn_outside", "swap_layernorm",
           "swap_layernorm_outside", "freeze_model", "bake_random_entries", "bake_random_entries_outside",
           "insert_fixed_point", "insert_fixed_point_outside", "freeze_binary_points",
           "freeze_binary_points_outside", "bake_directpred", "bake_directpred_outside",
           "Step", "GraphPass", "OutsidePass", "DEPLOY_STEPS"]

GraphPass = Callable[[fx.GraphModule], PassResult]
OutsidePass = Callable[[nn.Module, list[Outside]], PassResult]


class Step(NamedTuple):
    """One pass as the runner runs it: its report name, its pass over a traced region, its pass
    over the modules no region calls, and the regions it wants: ``"flat"`` (the largest traceable
    ones, so a pattern can span modules — folds) or ``"module"`` (each module's own forward, so a
    rewrite of a forward lands in the smallest module that holds it — inserted casts)."""

    name: str
    graph_pass: GraphPass
    outside_pass: OutsidePass
    view: Literal["flat", "module"] = "flat"


DEPLOY_STEPS: tuple[Step, ...] = (
    Step("bake_random_entries", bake_random_entries, bake_random_entries_outside),
    Step("bake_directpred", bake_directpred, bake_directpred_outside),
    Step("freeze_binary_points", freeze_binary_points, freeze_binary_points_outside),
    Step("fold_repbn", fold_repbn, fold_repbn_outside),
    Step("fold_convbn", partial(fold_convbn, mode="deploy"), partial(fold_convbn_outside, mode="deploy")),
)
