"""Exact sums in fixed-point layers: a conv or linear layer whose weight is cast to fixed point sums
its products the way integer hardware does.

A fixed-point conv multiplies values on two grids (the input's step ``s_x``, the weight's ``s_w``):
every product is an integer multiple of ``s_x·s_w`` and so is the sum. In float32 the sum is exact
only while every partial sum stays below ``2^24·s_x·s_w``; past that, each summation order rounds
differently, and the output cast after the layer turns a last-bit difference at a rounding tie into a
whole step (ResNet-50 at 8 bits: outputs off by 2, with no training at all). An FPGA's accumulator is
exact.

In eval mode, a layer with ``ExactSums`` computes its conv/linear in float64 (exact while
``|Σ| < 2^53·s_x·s_w``: at 8 bits, any fan-in below 2^38) and rounds the exact ``Σ + bias`` to its
input's dtype once. The ONNX export computes the same value with integer kernels
(``normfx.onnx.exact_sums``), so PyTorch and ONNX Runtime agree bit for bit. In training mode the
layer sums in float32 as before: float64 sums cost a multiple of the training step on CPU
(``benchmarks/exact_sums.py``), and the straight-through gradients are estimates that a last-bit
difference at a rounding tie does not change. Under ``torch.autocast``, or when the
input is not a float32/16 tensor, the layer computes as it always did.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from normfx.nn.convbn import _Swapped, _tuned_class
from normfx.nn.fixed_point import FixedPoint

__all__ = ["ExactSums", "exact_sums", "has_exact_sums"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ExactSums(_Swapped):
    """Mixin put in a conv's or linear layer's class by ``exact_sums`` (the class keeps its name,
    ``isinstance`` and state-dict keys)."""

    _normfx_prefix = ""

    def _sums_exactly(self, x: torch.Tensor) -> bool:
        """Whether this call sums in float64: eval mode, the weight is cast to fixed point, the
        input is a float32/16 tensor, no autocast, and no export is tracing the layer (the exporter
        writes integer kernels instead)."""
        if self.training or x.dtype not in _FLOATS or torch.is_autocast_enabled(x.device.type):
            return False
        if not parametrize.is_parametrized(self, "weight"):
            return False
        cast = self.parametrizations["weight"][0]
        return isinstance(cast, FixedPoint) and not cast.export_form


class _ExactConv(ExactSums):
    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        if not self._sums_exactly(input):
            return super()._conv_forward(input, weight, bias)  # type: ignore[misc]
        b = None if bias is None else bias.double()
        return super()._conv_forward(input.double(), weight.double(), b).to(input.dtype)  # type: ignore[misc]


class _ExactLinear(ExactSums):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._sums_exactly(input):
            return super().forward(input)  # type: ignore[misc]
        weight: torch.Tensor = self.weight   # type: ignore[assignment]
        bias: torch.Tensor | None = self.bias   # type: ignore[assignment]
        b = None if bias is None else bias.double()
        return F.linear(input.double(), weight.double(), b).to(input.dtype)


def eligible(m: nn.Module) -> bool:
    """A Conv1d/2d/3d or Linear (or a subclass) that computes as its base class does: a subclass
    with a forward of its own (a weight-standardizing conv) keeps it, and sums as it did."""
    cls: Any = type(m)
    if issubclass(cls, nn.Linear):
        return cls.forward is nn.Linear.forward
    base = next((c for c in _CONVS if issubclass(cls, c)), None)
    return base is not None and cls.forward is base.forward and cls._conv_forward is base._conv_forward


def exact_sums(m: nn.Module) -> bool:
    """Make ``m`` sum exactly (before its weight is parametrized: ``torch.nn.utils.parametrize``
    subclasses the class it finds). Returns whether it could."""
    if isinstance(m, ExactSums):
        return True
    if not eligible(m) or parametrize.is_parametrized(m) or getattr(type(m), "_normfx_base", None) is not None:
        return False
    m.__class__ = _tuned_class(type(m), _ExactLinear if isinstance(m, nn.Linear) else _ExactConv)
    return True


def has_exact_sums(m: nn.Module) -> bool:
    """Whether ``m`` is a layer ``exact_sums`` made exact."""
    return isinstance(m, ExactSums)
