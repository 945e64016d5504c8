"""One file per transform: its options dataclass, its passes (``fn(gm, scope, **options) ->
PassResult`` over a traced region, mutating it in place, and ``fn_outside(model, outside, scope,
**options)`` for the modules no traced region calls), what ``deploy`` does with what it inserted,
and its registered ``Transform``. ``normfx.passes.registry`` holds the ordered tuple of them.
"""
from __future__ import annotations

from normfx.passes.directpred import bake_directpred, bake_directpred_outside
from normfx.passes.fixed_point import (freeze_binary_points, freeze_binary_points_outside, insert_fixed_point,
                                       insert_fixed_point_outside)
from normfx.passes.fold_affine import fold_repbn, fold_repbn_outside
from normfx.passes.fold_convbn import fold_convbn, fold_convbn_outside
from normfx.passes.freeze import bake_random_entries, bake_random_entries_outside, freeze_model
from normfx.passes.registry import DEPLOY_STEPS, TRANSFORMS
from normfx.passes.swap_layernorm import swap_layernorm, swap_layernorm_outside
from normfx.transform import GraphPass, OutsidePass, Step, Transform

__all__ = ["fold_convbn", "fold_convbn_outside", "fold_repbn", "fold_repbn_outside", "swap_layernorm",
           "swap_layernorm_outside", "freeze_model", "bake_random_entries", "bake_random_entries_outside",
           "insert_fixed_point", "insert_fixed_point_outside", "freeze_binary_points",
           "freeze_binary_points_outside", "bake_directpred", "bake_directpred_outside",
           "Step", "Transform", "GraphPass", "OutsidePass", "DEPLOY_STEPS", "TRANSFORMS"]
