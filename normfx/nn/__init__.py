"""What normfx's passes put into a model. Every module here is a leaf for ``normfx.trace``."""
from __future__ import annotations

from normfx.nn.convbn import bn_stats, tune_convbn, tune_convbn_functional

__all__ = ["tune_convbn", "tune_convbn_functional", "bn_stats", "LEAF_MODULES"]

LEAF_MODULES: tuple[type, ...] = ()
