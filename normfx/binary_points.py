"""Training binary points: optimizer groups that let them move, and how far they moved.

A binary point ``int_bits`` changes the format only when it crosses half an integer, and it learns
from a gradient summed over a whole tensor (``Σ g·r·s·ln 2``): trained with the weights' learning
rate (1e-3 for Adam) and weight decay, it moves by at most ~1e-3 per step and is pulled towards 0
integer bits. ``param_groups`` puts every trainable binary point in a group of its own, with its
own learning rate and no weight decay — the "separate learning rate" option of issue 25.1, as
LSQ (Esser et al., 2020) gives its step size a gradient scale ``1/√(N·Q_p)`` of its own; with Adam,
which normalizes each parameter's step, a learning rate is what sets how fast a point moves.
``binary_point_moves`` reports, per cast, the integer bits it started from (calibration, or the
weight's range when the cast was inserted) and those it has now.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from normfx.nn.fixed_point import FixedPoint

__all__ = ["param_groups", "binary_point_moves", "BinaryPointMove"]


def param_groups(model: nn.Module, *, binary_point_lr: float, binary_point_weight_decay: float = 0.0,
                 **group: Any) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a fixed-point model: every other trainable parameter in the
    first group (with ``group``'s options, e.g. ``lr=``; the optimizer's defaults otherwise), every
    trainable binary point in the second, with ``lr=binary_point_lr`` and
    ``weight_decay=binary_point_weight_decay`` (0: decay would pull points towards 0 integer bits).

    Example:
        >>> q = normfx.fixed_point(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), bits=4)
        >>> opt = torch.optim.AdamW(normfx.param_groups(q, binary_point_lr=0.05), lr=1e-3, weight_decay=0.01)
        >>> [len(g["params"]) for g in opt.param_groups], opt.param_groups[1]["lr"]
        ([4, 8], 0.05)
    """
    if not binary_point_lr > 0:
        raise ValueError(f"binary_point_lr must be positive, got {binary_point_lr}")
    points = {id(m.int_bits): m.int_bits for m in model.modules() if isinstance(m, FixedPoint) and m.trainable}
    if not points:
        raise ValueError(f"{type(model).__name__} has no trainable binary point: call normfx.fixed_point first "
                         "(with int_bits=None), and not after normfx.deploy (which freezes them)")
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in points]
    bp = [p for p in points.values() if p.requires_grad]
    return [{"params": rest, **group},
            {"params": bp, "lr": binary_point_lr, "weight_decay": binary_point_weight_decay}]


@dataclass(frozen=True)
class BinaryPointMove:
    """One cast's binary point: where it started (``start``: after ``normfx.calibrate``, or from
    the weight's range when inserted) and where it is (``now``), in integer bits per channel."""

    name: str
    start: tuple[int, ...]
    now: tuple[int, ...]

    @property
    def moved(self) -> int:
        """Channels whose integer bits differ from the start."""
        return sum(a != b for a, b in zip(self.start, self.now))

    @property
    def shift(self) -> int:
        """The largest change in integer bits over the channels (signed: + is more integer bits)."""
        return max((b - a for a, b in zip(self.start, self.now)), key=abs, default=0)


def binary_point_moves(model: nn.Module) -> list[BinaryPointMove]:
    """Every fixed-point cast of ``model`` with where its binary point started and where it is now.

    Example:
        >>> q = normfx.fixed_point(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), bits=4)
        >>> _ = normfx.calibrate(q, [torch.randn(16, 4)], progress=False)
        >>> [m.moved for m in normfx.binary_point_moves(q)]
        [0, 0, 0, 0, 0]
    """
    moves = []
    for name, m in model.named_modules():
        if not isinstance(m, FixedPoint):
            continue
        now = tuple(int(i) for i in m.integer_bits().reshape(-1).tolist())
        start = m.__dict__.get("start_int_bits")
        moves.append(BinaryPointMove(name, now if start is None else tuple(int(i) for i in start.tolist()), now))
    return moves
