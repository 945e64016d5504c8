"""The registered transforms, in one ordered tuple: every list in normfx derives from it.

The one-liners and ``normfx.apply`` look a config up here; ``normfx.deploy`` runs each transform's
``deploy`` steps in this order (what training left — random-control entries, DirectPred's W,
trainable binary points — is finalized before anything folds: RepBN into Linears, BatchNorm into
convs); ``normfx inspect`` shows one column per ``inspect`` entry; the docs table of one-liners and
the contract tests are generated from it. Adding a transform is one file under ``passes/`` and one
line here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from normfx.passes.directpred import DIRECTPRED
from normfx.passes.evonorm import EVONORM
from normfx.passes.fixed_point import FIXED_POINT
from normfx.passes.fold_convbn import CONVBN
from normfx.passes.freeze import FREEZE
from normfx.passes.linear_attention import LINEAR_ATTENTION
from normfx.passes.swap_layernorm import REPBN
from normfx.passes.sync_bn import SYNC_BN
from normfx.transform import Step, Transform

__all__ = ["TRANSFORMS", "DEPLOY", "DEPLOY_STEPS", "DeployConfig", "transform_for", "by_name", "inspect_columns",
           "markdown_table"]

_TRAINING: tuple[Transform, ...] = (FREEZE, DIRECTPRED, FIXED_POINT, REPBN, LINEAR_ATTENTION, EVONORM, CONVBN,
                                    SYNC_BN)

DEPLOY_STEPS: tuple[Step, ...] = tuple(step for t in _TRAINING for step in t.deploy)
"""What ``normfx.deploy`` runs, in order: each transform's ``deploy`` steps, in registry order."""


@dataclass(frozen=True)
class DeployConfig:
    """``normfx.deploy`` has no options."""


DEPLOY = Transform(
    name="deploy", config=DeployConfig, steps=lambda _: DEPLOY_STEPS, exact=True,
    summary="finalize for inference: bake what training left, fold RepBN and BatchNorm, merge summed conv branches "
            "(exact)", page="export.md",
)

TRANSFORMS: tuple[Transform, ...] = (*_TRAINING, DEPLOY)
"""Every registered transform, in deploy's order."""


def transform_for(config: Any) -> Transform:
    """The registered transform whose options ``config`` is.

    Raises:
        TypeError: ``config`` is no registered transform's options (the message lists them)."""
    for t in TRANSFORMS:
        if type(config) is t.config:
            return t
    raise TypeError(f"{type(config).__name__} is not the config of a normfx transform; the configs are "
                    + ", ".join(t.config.__name__ for t in TRANSFORMS))


def by_name(name: str) -> Transform:
    """The registered transform called ``name`` (``"fixed_point"``).

    Raises:
        KeyError: no transform has that name (the message lists them)."""
    for t in TRANSFORMS:
        if t.name == name:
            return t
    raise KeyError(f"no transform named {name!r}; the transforms are {[t.name for t in TRANSFORMS]}")


def inspect_columns() -> tuple[tuple[str, Transform, Any], ...]:
    """``normfx inspect``'s columns: ``(column, transform, config)`` for every ``inspect`` entry."""
    return tuple((column, t, config) for t in TRANSFORMS for column, config in t.inspect)


def markdown_table() -> str:
    """The docs table of the registered transforms (``docs/index.md`` holds it between
    ``<!-- transforms:start -->`` and ``<!-- transforms:end -->``; a test checks it is current)."""
    rows = ["| transform | one-liner | config | what it does | exact | deploy finalizes with | page |",
            "|---|---|---|---|---|---|---|"]
    for t in TRANSFORMS:
        fields = ", ".join(f.name for f in dataclasses.fields(t.config))
        deploy = ", ".join(f"`{s.name}`" for s in t.deploy) or "—"
        summary = t.summary + (f" — {t.paper}" if t.paper else "")
        rows.append(f"| `{t.name}` | `normfx.{t.name}(model, ...)` | `{t.config.__name__}({fields})` | {summary} "
                    f"| {'yes' if t.exact else 'no'} | {deploy} | [{t.page}]({t.page}) |")
    return "\n".join(rows)
