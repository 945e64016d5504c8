"""What normfx's passes put into a model. Every module here is a leaf for ``normfx.trace``."""
from __future__ import annotations

from normfx.nn.convbn import bn_stats, tune_convbn, tune_convbn_functional
from normfx.nn.fixed_point import FixedPoint
from normfx.nn.repbn import ChannelAffine, ProgressiveRepBN, RepBN, RepBNScheduler, recalibrate_bn

__all__ = [
    "tune_convbn", "tune_convbn_functional", "bn_stats",
    "RepBN", "ProgressiveRepBN", "ChannelAffine", "RepBNScheduler", "recalibrate_bn",
    "FixedPoint",
    "LEAF_MODULES",
]

LEAF_MODULES: tuple[type, ...] = (RepBN, ProgressiveRepBN, ChannelAffine, FixedPoint)
