"""``FixedPoint``: a trainable ``ap_fixed<W, I, Q, O>`` cast (QFX, Dai et al. 2024).

Forward: ``x̂ = O(Q(x·2^F))·2^−F`` with ``F = W − I`` (``normfx.functional.fixed_point_cast``), where
``I = round(int_bits)``. Backward (straight-through, LSQ-style):

* ``x``: gradient passes where the value is in range, is zero where it overflowed;
* ``int_bits``: through the step ``s = 2^(I − W)``. In range, ``∂x̂/∂s = m − x/s`` (the rounding
  error); out of range, ``∂x̂/∂s = m_sat`` (the saturation value). Under a reconstruction loss the
  first term pushes ``s`` down (more fraction bits) and the second pushes it up (less clipping), so
  the binary point settles where rounding and clipping errors balance. ``∂s/∂I = s·ln 2``; the
  rounding of ``int_bits`` is straight-through.

``int_bits`` is a Parameter (trainable) unless fixed at construction; per-channel casts hold one per
channel along ``axis``. While ``observing`` the cast records ``max |x|`` (per channel) and returns
``x`` unchanged: ``normfx.calibrate`` uses it to set ``int_bits``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from normfx.functional import (OVERFLOW, ROUNDING, fixed_mode, integer_range, k_hot_project, k_hot_table,
                                overflow_fixed, round_fixed)

__all__ = ["FixedPoint", "fixed_point_qdq", "exporting"]


@torch.library.custom_op("normfx::fixed_point_qdq", mutates_args=())
def fixed_point_qdq(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, axis: int) -> torch.Tensor:
    """``clamp(round_half_even(x / scale), qmin, qmax) · scale``: a round-to-nearest-even, saturating
    ``ap_fixed`` cast as one op, which ``normfx.export`` writes as QuantizeLinear → (Clip) →
    DequantizeLinear. ``scale`` is ``2^−F``, a scalar or one per channel along ``axis``."""
    if scale.dim() == 1 and scale.numel() > 1:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


@fixed_point_qdq.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, axis: int) -> torch.Tensor:
    return torch.empty_like(x)


class _FixedPointSTE(torch.autograd.Function):
    """The cast with its straight-through gradients in one node (few elementwise passes):
    ``∂x̂/∂x = 1`` in range, 0 outside; ``∂x̂/∂s = m − x/s`` in range, ``m_sat`` outside."""

    @staticmethod
    def forward(ctx, x, step, lo: int, hi: int, bits: int, signed: bool, rounding: str, overflow: str):
        v = x * (1.0 / step)                      # exact: step is a power of two
        m = torch.round(v) if rounding == "nearest_even" else round_fixed(v, rounding)
        sat = m.clamp(lo, hi)
        inside = sat == m
        out = sat if overflow in ("saturate", "saturate_sym") else overflow_fixed(m, bits, signed, overflow)
        if ctx.needs_input_grad[1]:
            # ∂x̂/∂s: m − v = sat − v in range, sat outside
            ctx.save_for_backward(inside, torch.addcmul(sat, v, inside, value=-1))
        else:
            ctx.save_for_backward(inside)
        ctx.step_shape = step.shape
        return out * step

    @staticmethod
    def backward(ctx, g):
        inside, *rest = ctx.saved_tensors
        gx = g * inside if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = g * rest[0]
            shape = ctx.step_shape   # () or x's rank with the channel axis kept (see FixedPoint._view)
            if len(shape) == 0:
                gs = gs.sum()
            else:
                gs = gs.sum(dim=[d for d, n in enumerate(shape) if n == 1], keepdim=True)
        return gx, gs, None, None, None, None, None, None


class exporting:  # noqa: N801 - a context manager used like a function
    """Within ``with exporting(model):`` every ``FixedPoint`` computes through ``fixed_point_qdq``
    (same numbers; an op the ONNX exporter maps to QuantizeLinear/DequantizeLinear)."""

    def __init__(self, model: nn.Module) -> None:
        self.casts = [m for m in model.modules() if isinstance(m, FixedPoint)]

    def __enter__(self) -> "exporting":
        for q in self.casts:
            q.export_form = True
        return self

    def __exit__(self, *exc: object) -> None:
        for q in self.casts:
            q.export_form = False


class FixedPoint(nn.Module):
    """Cast to ``ap_fixed<bits, int_bits, rounding, overflow>`` (``ap_ufixed`` when ``signed=False``)."""

    saves_current = False  # as a weight's parametrization: checkpoints keep the float master weight

    def __init__(self, bits: int = 8, int_bits: float | None = None, *, signed: bool = True,
                 rounding: str = "nearest_even", overflow: str = "saturate", channels: int = 1,
                 axis: int = 1, init_int_bits: float = 1.0) -> None:
        super().__init__()
        if not 2 <= bits <= 24:
            raise ValueError(f"bits must be in [2, 24] (exact in float32), got {bits}")
        self.bits, self.signed, self.axis = int(bits), bool(signed), int(axis)
        self.rounding = fixed_mode(rounding, "rounding")
        self.overflow = fixed_mode(overflow, "overflow")
        value = torch.full((channels,), float(init_int_bits if int_bits is None else int_bits))
        if int_bits is None:
            self.int_bits = nn.Parameter(value)
        else:
            self.register_buffer("int_bits", value)
        self.register_buffer("observed_max", torch.zeros(channels))
        self.observing = False
        self.export_form = False
        self.k_hot: int | None = None  # project the cast value to at most K signed powers of two

    @property
    def trainable(self) -> bool:
        return isinstance(self.int_bits, nn.Parameter)

    @property
    def per_channel(self) -> bool:
        return self.int_bits.numel() > 1

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.numel() == 1:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return t.reshape(shape)

    def integer_bits(self) -> torch.Tensor:
        """``I`` as used in the forward: ``int_bits`` rounded (half away from zero)."""
        return torch.round(self.int_bits.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"FixedPoint casts floating-point tensors, got {x.dtype}")
        if self.observing:
            with torch.no_grad():
                dims = [d for d in range(x.dim()) if not (self.per_channel and d == self.axis % x.dim())]
                cur = x.detach().abs().amax(dim=dims) if dims else x.detach().abs()
                self.observed_max.copy_(torch.maximum(self.observed_max, cur.float().reshape(-1)))
            return x
        if self.export_form:
            lo, hi = integer_range(self.bits, self.signed)
            lo = -hi if (self.overflow == "saturate_sym" and self.signed) else lo
            step = torch.exp2(self.integer_bits() - self.bits).to(x.dtype)
            step = step.reshape(()) if step.numel() == 1 else step
            return fixed_point_qdq(x, step, lo, hi, self.axis % x.dim())
        ib = self.int_bits
        ib = ib + (torch.round(ib) - ib).detach()                  # straight-through rounding of I
        lo, hi = integer_range(self.bits, self.signed)
        if self.overflow == "saturate_sym" and self.signed:
            lo = -hi
        step = torch.exp2(self._view(ib, x) - self.bits).to(x.dtype)  # s = 2^-F
        y = _FixedPointSTE.apply(x, step, lo, hi, self.bits, self.signed, self.rounding, self.overflow)
        return self._k_hot(y) if self.k_hot else y

    def k_hot_table(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Every value with at most ``k_hot`` signed powers of two ``2^e`` on this cast's grid
        (``e ≥ −F``) and within its range (per-channel casts: the union of their formats)."""
        ib = self.integer_bits()
        f, top = int(self.bits - ib.min()), int(ib.max())
        table = k_hot_table(self.k_hot, range(-f, top), dtype=torch.float64)
        lo, hi = integer_range(self.bits, self.signed)
        if ib.numel() == 1:
            step = 2.0 ** (top - self.bits)
            table = table[(table >= lo * step) & (table <= hi * step)]
        return table.to(dtype)

    def _k_hot(self, y: torch.Tensor) -> torch.Tensor:
        """Nearest K-hot value, straight-through in backward."""
        return y + (k_hot_project(y.detach(), self.k_hot_table(y.dtype)) - y).detach()

    @torch.no_grad()
    def calibrate_from_observed(self, margin: float = 0.0) -> None:
        """Set ``int_bits`` so the observed ``max |x|`` (times ``1 + margin``) fits, and stop observing."""
        mx = self.observed_max * (1.0 + margin)
        # the smallest I with max < 2^(I - sign): floor(log2 max) + 1 integer bits (+1 for the sign)
        bits = torch.where(mx > 0, torch.floor(torch.log2(mx.clamp_min(1e-30))) + 1,
                           torch.full_like(mx, 1.0 - self.bits))
        if self.signed:
            bits = bits + 1
        self.int_bits.copy_(bits.clamp(1 - self.bits * 2, self.bits * 2))
        self.observing = False

    def fill_state(self, state_dict: dict, prefix: str, original: torch.Tensor) -> None:
        """A checkpoint without this cast's keys (a float model's): keep the current binary point."""
        for name, t in (*self.named_parameters(), *self.named_buffers()):
            state_dict.setdefault(prefix + name, t.detach().clone())

    @property
    def onnx_expressible(self) -> bool:
        """QuantizeLinear rounds half to even and saturates: only those modes export to ONNX."""
        return self.rounding == "nearest_even" and self.overflow in ("saturate", "saturate_sym")

    def hls_types(self) -> list[str]:
        """``hls_type`` of every channel."""
        return [self.hls_type(c) for c in range(self.int_bits.numel())]

    def hls_type(self, channel: int = 0) -> str:
        """``ap_fixed<W, I, Q, O>`` (or ``ap_ufixed``) for one channel, as Vitis HLS spells it."""
        i = int(self.integer_bits().reshape(-1)[channel])
        kind = "ap_fixed" if self.signed else "ap_ufixed"
        return f"{kind}<{self.bits}, {i}, {ROUNDING[self.rounding]}, {OVERFLOW[self.overflow]}>"

    def extra_repr(self) -> str:
        ib = self.integer_bits()
        i = int(ib[0]) if ib.numel() == 1 else f"per-channel[{ib.numel()}]"
        return (f"bits={self.bits}, int_bits={i}, signed={self.signed}, rounding={self.rounding}, "
                f"overflow={self.overflow}, trainable={self.trainable}" + (f", k_hot={self.k_hot}" if self.k_hot else ""))

