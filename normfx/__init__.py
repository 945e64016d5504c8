"""normfx: torch.fx passes that change how a PyTorch model normalizes.

The public API is the one-liners below; each takes a model and returns a transformed copy, with a
report of what it did available from ``normfx.last_report(model)``.
"""
from __future__ import annotations

import logging

from normfx import lab
from normfx.passes.sync_bn import SyncBNConfig
from normfx.api import (apply, convbn, sync_bn, deploy, directpred, evonorm, fixed_point, freeze, linear_attention,
                        repbn)
from normfx.binary_points import BinaryPointMove, binary_point_moves, param_groups
from normfx.calibrate import calibrate
from normfx.passes.directpred import DirectPredConfig
from normfx.passes.evonorm import EvoNormConfig
from normfx.passes.fixed_point import FixedPointConfig
from normfx.passes.fold_convbn import ConvBNConfig
from normfx.passes.freeze import FreezeConfig
from normfx.passes.linear_attention import LinearAttentionConfig
from normfx.passes.registry import TRANSFORMS, DeployConfig
from normfx.passes.swap_layernorm import RepBNConfig
from normfx.nn.repbn import RepBNScheduler, recalibrate_bn
from normfx.errors import (AlreadyTransformedError, ExportError, NormfxError, RepBNNotFinishedError,
                           SpecializedCallError, TraceFailure, TrainingModeError)
from normfx.onnx import ExportReport, OutputCheck, export
from normfx.onnx.qonnx import hls4ml_config, qonnx_for_hls4ml
from normfx.onnx.resources import LayerCost, ResourceEstimate, resource_estimate
from normfx.roles import TrainableSummary, trainable_summary
from normfx.report import Change, PassResult, Report, Skip, SkipReason, last_report
from normfx.trace import trace, untraceable_modules

__all__ = [
    "apply",
    "TRANSFORMS",
    "ConvBNConfig",
    "DeployConfig",
    "RepBNConfig",
    "EvoNormConfig",
    "DirectPredConfig",
    "LinearAttentionConfig",
    "FreezeConfig",
    "FixedPointConfig",
    "SyncBNConfig",
    "sync_bn",
    "convbn",
    "deploy",
    "repbn",
    "evonorm",
    "directpred",
    "linear_attention",
    "freeze",
    "trainable_summary",
    "TrainableSummary",
    "lab",
    "fixed_point",
    "calibrate",
    "param_groups",
    "binary_point_moves",
    "BinaryPointMove",
    "RepBNScheduler",
    "recalibrate_bn",
    "RepBNNotFinishedError",
    "export",
    "hls4ml_config",
    "qonnx_for_hls4ml",
    "resource_estimate",
    "ResourceEstimate",
    "LayerCost",
    "ExportReport",
    "ExportError",
    "OutputCheck",
    "trace",
    "untraceable_modules",
    "last_report",
    "Report",
    "PassResult",
    "Change",
    "Skip",
    "SkipReason",
    "TraceFailure",
    "NormfxError",
    "AlreadyTransformedError",
    "SpecializedCallError",
    "TrainingModeError",
]
__version__ = "0.1.0"

logging.getLogger("normfx").addHandler(logging.NullHandler())
