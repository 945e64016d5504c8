"""What normfx's passes put into a model. Every module here is a leaf for ``normfx.trace``."""
from __future__ import annotations

from normfx.nn.directpred import DirectPred
from normfx.nn.evonorm import EvoNorm2dB0, EvoNorm2dS0
from normfx.nn.linear_attention import SelfAttentionSLA, SimplifiedLinearAttention
from normfx.nn.convbn import TuneBN, TuneConv, bn_stats, tune, tune_convbn, tune_convbn_functional, untune
from normfx.nn.fixed_point import FixedPoint
from normfx.nn.fixed_point_bn import FixedPointBatchNorm
from normfx.nn.repbn import ChannelAffine, ProgressiveRepBN, RepBN, RepBNScheduler, recalibrate_bn

__all__ = [
    "tune_convbn", "tune_convbn_functional", "bn_stats", "TuneConv", "TuneBN", "tune", "untune",
    "RepBN", "ProgressiveRepBN", "ChannelAffine", "RepBNScheduler", "recalibrate_bn",
    "FixedPoint", "FixedPointBatchNorm", "EvoNorm2dB0", "EvoNorm2dS0", "DirectPred",
    "SimplifiedLinearAttention", "SelfAttentionSLA",
    "LEAF_MODULES",
]

LEAF_MODULES: tuple[type, ...] = (RepBN, ProgressiveRepBN, ChannelAffine, FixedPoint, TuneConv, TuneBN, EvoNorm2dB0,
                                  EvoNorm2dS0, DirectPred, SimplifiedLinearAttention, SelfAttentionSLA)
