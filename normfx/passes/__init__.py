"""One file per pass: ``fn(gm, *, options) -> PassResult``; each mutates ``gm`` in place.

``normfx.deploy`` runs the *deploy steps* registered here, in order. A pass that inserts a
training-time construct registers the step that finalizes it, so ``deploy`` never needs to know
any pass's internals.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch.fx as fx
import torch.nn as nn

from normfx.passes.fold_affine import fold_repbn
from normfx.passes.fold_convbn import bn_sites, fold_convbn
from normfx.passes.fixed_point import fixed_point_sites, freeze_binary_points, insert_fixed_point
from normfx.passes.freeze import bake_random_entries, freeze_model, random_entry_sites
from normfx.passes.swap_layernorm import layernorm_sites, swap_layernorm
from normfx.report import PassResult

__all__ = ["fold_convbn", "fold_repbn", "swap_layernorm", "freeze_model", "bake_random_entries",
           "insert_fixed_point", "freeze_binary_points", "DeployStep", "deploy_steps", "register_deploy_step"]

DeployStep = Callable[[fx.GraphModule], PassResult]
SiteLister = Callable[[nn.Module], list[str]]

_DEPLOY_STEPS: list[tuple[float, str, DeployStep, SiteLister | None]] = []


def register_deploy_step(
    name: str, step: DeployStep, *, order: float, untraced_sites: SiteLister | None = None
) -> None:
    """Add ``step`` to what ``normfx.deploy`` runs; lower ``order`` runs first. Re-registering a
    name replaces it. ``untraced_sites(module)`` lists the step's sites inside a module that could
    not be traced, so the report can name them."""
    _DEPLOY_STEPS[:] = [s for s in _DEPLOY_STEPS if s[1] != name]
    _DEPLOY_STEPS.append((order, name, step, untraced_sites))
    _DEPLOY_STEPS.sort(key=lambda s: s[0])


def deploy_steps() -> list[tuple[str, DeployStep, SiteLister | None]]:
    """The registered deploy steps ``(name, step, untraced_sites)``, in the order they run."""
    return [(name, step, sites) for _, name, step, sites in _DEPLOY_STEPS]


# Later passes (RepBN, fixed point, EvoNorm) finalize their modules before BN folding (order < 100)
# or fold what they leave afterwards (order > 100).
def _prepbn_sites(module: nn.Module) -> list[str]:
    from normfx.nn.repbn import ProgressiveRepBN

    return [n for n, m in module.named_modules() if isinstance(m, ProgressiveRepBN)]


register_deploy_step("bake_random_entries", bake_random_entries, order=10, untraced_sites=random_entry_sites)
register_deploy_step("freeze_binary_points", freeze_binary_points, order=20, untraced_sites=fixed_point_sites)
register_deploy_step("fold_repbn", fold_repbn, order=50, untraced_sites=_prepbn_sites)
register_deploy_step("fold_convbn", partial(fold_convbn, mode="deploy"), order=100, untraced_sites=bn_sites)
