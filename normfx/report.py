"""What a pass did: one record per site it looked at.

A *site* is one place a pass considered (for the ConvBN pass: one BatchNorm call). Every site ends
up either in ``changes`` (transformed) or in ``skips`` (left alone, with a reason code), so
``len(changes) + len(skips)`` is the number of sites, and a test can hold a pass to it.
"""
from __future__ import annotations

import enum
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch.nn as nn

__all__ = ["Change", "Skip", "SkipReason", "PassResult", "Report", "last_report"]

logger = logging.getLogger("normfx")

_REPORT_ATTR = "_normfx_report"


class SkipReason(str, enum.Enum):
    """Why a site was left alone. The value is the stable code printed in reports and docs."""

    MULTI_USER = "multi-user output"
    SHARED_MODULE = "shared module"
    NO_RUNNING_STATS = "no running statistics"
    TRAINING_MODE = "training mode"
    UNTRACEABLE = "untraceable"
    UNSUPPORTED = "unsupported"
    NO_NEIGHBOUR = "no adjacent conv/linear"
    NON_FINITE = "non-finite or overflowing scale"
    ALREADY_DONE = "already transformed"
    HOOKED = "hooks would observe the change"
    FILTERED = "excluded by filter_fn"
    LEAF = "inside a leaf module"
    NEEDS_SHAPES = "needs example_inputs"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Change:
    """A site a pass transformed: ``site`` is the qualified name, ``action`` what was done."""

    site: str
    action: str
    detail: str = ""


@dataclass(frozen=True)
class Skip:
    """A site a pass looked at and left alone, with the reason code and a human sentence."""

    site: str
    reason: SkipReason
    detail: str = ""


@dataclass(frozen=True)
class PassResult:
    """One pass over one model: what changed and what was skipped.

    ``modified`` is true exactly when the model's graph or parameters changed.
    """

    name: str
    changes: tuple[Change, ...] = ()
    skips: tuple[Skip, ...] = ()

    @property
    def modified(self) -> bool:
        return bool(self.changes)

    @property
    def sites(self) -> int:
        return len(self.changes) + len(self.skips)

    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(s.reason.value for s in self.skips))

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(self.skip_counts().items()))
        return (
            f"{self.name}: {self.sites} sites, {len(self.changes)} transformed, "
            f"{len(self.skips)} skipped" + (f" ({skipped})" if skipped else "")
        )


@dataclass(frozen=True)
class Report:
    """Everything one normfx call did: the trace notes and one ``PassResult`` per pass."""

    passes: tuple[PassResult, ...] = ()
    untraceable: tuple[tuple[str, str], ...] = field(default=())
    notes: tuple[str, ...] = ()
    """Extra lines a pass adds to the summary (``freeze``: trainable counts per role)."""

    @property
    def modified(self) -> bool:
        return any(p.modified for p in self.passes)

    def get(self, name: str) -> PassResult:
        """The result of the pass called ``name`` (``report.get("fold_convbn")``)."""
        for p in self.passes:
            if p.name == name:
                return p
        raise KeyError(f"no pass named {name!r} in this report (passes: {[p.name for p in self.passes]})")

    @property
    def changes(self) -> tuple[Change, ...]:
        return tuple(c for p in self.passes for c in p.changes)

    @property
    def skips(self) -> tuple[Skip, ...]:
        return tuple(s for p in self.passes for s in p.skips)

    def summary(self) -> str:
        """One line per pass that found a site (all of them if none did), then what was untraceable."""
        shown = [p for p in self.passes if p.sites] or list(self.passes)
        lines = [p.summary() for p in shown]
        lines += list(self.notes)
        lines += [f"untraceable: {name or '<root>'}: {why}" for name, why in self.untraceable]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def attach_report(model: nn.Module, report: Report) -> None:
    """Attach ``report`` to ``model`` (the one place ``last_report`` reads) and log it."""
    object.__setattr__(model, _REPORT_ATTR, report)
    for line in report.summary().splitlines():
        logger.info("%s", line)
    for skip in report.skips:
        logger.debug("skipped %s: %s %s", skip.site, skip.reason.value, skip.detail)


def last_report(model: nn.Module) -> Report:
    """The report of the last normfx one-liner that returned ``model``.

    >>> m = normfx.convbn(torchvision.models.resnet18().eval(), mode="deploy")
    >>> normfx.last_report(m).summary()
    'fold_convbn: 20 sites, 20 transformed, 0 skipped'
    """
    report = getattr(model, _REPORT_ATTR, None)
    if report is None:
        raise LookupError(
            f"{type(model).__name__} carries no normfx report; it was not returned by a normfx one-liner"
        )
    return report
