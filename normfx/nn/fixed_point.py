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

import math

import torch
import torch.nn as nn

from normfx.nn.param_keys import full, sharded
from normfx.functional import (OVERFLOW, ROUNDING, KHotCode, fixed_mode, integer_range, k_hot_project, k_hot_table,
                                overflow_fixed, round_fixed)

__all__ = ["FixedPoint", "fixed_point_qdq", "fixed_point_quant", "exporting"]


@torch.library.custom_op("normfx::fixed_point_qdq", mutates_args=())
def fixed_point_qdq(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, axis: int) -> torch.Tensor:
    """``clamp(round_half_even(x / scale), qmin, qmax) · scale``: a round-to-nearest-even, saturating
    ``ap_fixed`` cast as one op, which ``normfx.export`` writes as QuantizeLinear → (Clip) →
    DequantizeLinear. ``scale`` is ``2^−F``, a scalar or one per channel along ``axis``."""
    return _scaled_cast(x, scale, qmin, qmax, "nearest_even", axis)


@fixed_point_qdq.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, axis: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("normfx::fixed_point_quant", mutates_args=())
def fixed_point_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, rounding: str,
                      axis: int) -> torch.Tensor:
    """``clamp(Q(x / scale), qmin, qmax) · scale`` with any rounding ``Q``: a saturating cast as one
    op, which ``normfx.export(..., format="qonnx")`` writes as a QONNX ``Quant`` node. ``scale`` is
    ``2^−F``, a scalar or one per channel along ``axis``."""
    return _scaled_cast(x, scale, qmin, qmax, rounding, axis)


def _scaled_cast(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, rounding: str,
                 axis: int) -> torch.Tensor:
    """The export ops' eager value: ``clamp(Q(x / scale), qmin, qmax) · scale``."""
    if scale.dim() == 1 and scale.numel() > 1:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    v = x / scale
    m = torch.round(v) if rounding == "nearest_even" else round_fixed(v, rounding)
    return torch.clamp(m, qmin, qmax) * scale


@fixed_point_quant.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, rounding: str, axis: int) -> torch.Tensor:
    return torch.empty_like(x)


_htb = torch.ops.aten.hardtanh_backward.default        # grad where lo < self < hi, else 0
_htb_out = torch.ops.aten.hardtanh_backward.grad_input  # the same into a given tensor
_LN2 = math.log(2.0)
# Where a per-tensor binary point is read into a Python float (no tensor ops per call; on an
# accelerator that read would synchronize, so the step stays a tensor there).
_SCALAR_STEP_DEVICES = {"cpu"}
# C = 1.5·2^p (p = significand bits − 1): for |v| < 2^(p−1), (v + C) − C is v rounded to an integer,
# half to even, in two IEEE additions (the sum's spacing is exactly 1); scaled by the step s, it rounds
# to a multiple of s. In-range values must stay below 2^(p−1) steps: words of up to 22 bits in
# float32, 51 in float64 (the second entry).
_ROUND_CONST = {torch.float32: (1.5 * 2.0 ** 23, 22), torch.float64: (1.5 * 2.0 ** 52, 51)}


def _traceable_cast(x: torch.Tensor, int_bits: torch.Tensor, lo: int, hi: int, bits: int, signed: bool,
                    rounding: str, overflow: str, axis: int) -> torch.Tensor:
    """The cast in plain differentiable tensor ops, for ``torch.compile`` and ``torch.export``: no
    autograd.Function, no ``out=`` writes and no Python number read from a tensor (a data-dependent
    guard for export, a graph break for dynamo). Values are ``_FixedPointSTE``'s (the same ops on
    ``v = x/s``), and so are its straight-through gradients: with ``inside = [lo ≤ round(v) ≤ hi]``,
    ``∂x̂/∂x = inside`` and ``∂x̂/∂s = m_sat − inside·x/s``. (``torch.clamp`` would pass no gradient
    at a value equal to a bound, so the mask is explicit.)"""
    i = int_bits + (torch.round(int_bits) - int_bits).detach()       # round, straight through
    steps = torch.exp2(i - bits).to(x.dtype)
    shape = [1] * x.dim()
    if steps.numel() > 1:
        shape[axis] = -1
    step = steps.reshape(shape if steps.numel() > 1 else ())
    v = x / step                                                       # exact: a power of two
    with torch.no_grad():
        m = torch.round(v) if rounding == "nearest_even" else round_fixed(v, rounding)
        inside = ((m >= lo) & (m <= hi)).to(x.dtype)
        m_sat = torch.clamp(m, lo, hi)
    out = (m_sat + inside * (v - v.detach())) * step
    if overflow in ("saturate", "saturate_sym"):
        return out
    # The value wraps; the gradient is the saturated one, as in eager.
    return out + ((overflow_fixed(m, bits, signed, overflow) - m_sat) * step).detach()


class _FixedPointSTE(torch.autograd.Function):
    """The whole cast, binary point included, as one autograd node:
    ``I = round(int_bits)`` (straight-through), ``s = 2^(I − W)``, ``x̂ = O(Q(x/s))·s``;
    ``∂x̂/∂x = 1`` in range, 0 outside; ``∂x̂/∂s = m − x/s`` in range, ``m_sat`` outside;
    ``∂s/∂int_bits = s·ln 2``.

    Written for CPU time, which memory passes and per-op overhead dominate: one saved tensor, two
    fresh allocations in forward and one in backward, no boolean masks (a bool tensor and its
    promotion back to float cost several float ops each), and no autograd graph for the binary
    point. The saved ``r`` (in units ``u``: the step, or 1) encodes both gradients: ``r = m − x/s``
    in range (``|r| < u``, for every rounding mode) and ``r = m_sat`` outside (``|r| ≥ u`` for signed
    types of 2+ bits; an unsigned value below range, whose ``m_sat`` is 0, is stored as ``−u`` and
    contributes 0 to ``∂x̂/∂s``). So ``∂x̂/∂x = [−u < r < u]``.

    Per-tensor casts on CPU in float32/float64 that round to nearest-even and saturate (the
    defaults, and what ONNX expresses) take a shorter path: ``(x + C·s) − C·s`` rounds to the grid
    in two passes, with no division, ``round`` or rescaling; every other case computes
    ``v = x/s``, rounds and clamps ``v``, and rescales.
    """

    @staticmethod
    def forward(ctx, x, int_bits, lo: int, hi: int, bits: int, signed: bool, rounding: str, overflow: str,
                axis: int):
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        saturating = overflow in ("saturate", "saturate_sym")
        lo_mark = lo - 1 if lo == 0 and need else lo   # unsigned: the below-range marker
        step: float | torch.Tensor
        # Compiled code keeps the step a tensor: a Python float read from int_bits would be baked into
        # a graph that every cast shares (the binary point's gradient came out 2^k times too large).
        compiling = torch.compiler.is_compiling()
        if int_bits.numel() == 1 and x.device.type in _SCALAR_STEP_DEVICES and not compiling:
            step = 2.0 ** (round(float(int_bits)) - bits)   # a Python float: no tensor ops per call
        else:                                     # per channel, on an accelerator (no sync), or compiled
            steps = torch.exp2(torch.round(int_bits) - bits).to(x.dtype)
            shape = [1] * x.dim()
            if steps.numel() > 1:
                shape[axis] = -1
            step = steps.reshape(shape if steps.numel() > 1 else ())
        const, max_bits = _ROUND_CONST.get(x.dtype, (0.0, 0))
        # (x + C·s) − C·s is exact only as two separately rounded float ops; a compiler may fuse,
        # contract or reassociate them (inductor: 98% of a ResNet-18's outputs off), so compiled
        # code (a tensor step) rounds explicitly.
        if isinstance(step, float) and saturating and rounding == "nearest_even" and bits <= max_bits:
            c = const * step
            y = x + c
            y.sub_(c)                                           # round(x/s)·s, not yet clamped
            out = y.clamp(lo_mark * step, hi * step)
            if need:
                xin = _htb_out(x, y, (lo - 0.5) * step, (hi + 0.5) * step, grad_input=y)  # x in range, else 0
                ctx.save_for_backward(torch.sub(out, xin, out=xin))                       # r·s
            unit = step
        else:
            v = x * (1.0 / step)                  # exact: step is a power of two
            m = torch.round(v) if rounding == "nearest_even" else round_fixed(v, rounding)
            out = m if saturating else overflow_fixed(m, bits, signed, overflow)
            if need:
                r = _htb_out(v, m, lo - 0.5, hi + 0.5, grad_input=v)   # v in range, 0 outside
                m.clamp_(lo_mark, hi)                                   # m_sat, with the marker
                ctx.save_for_backward(torch.sub(m, r, out=r))
            elif saturating:
                out.clamp_(lo, hi)
            out.mul_(step)
            unit = 1.0
        if saturating and lo_mark != lo:
            out.clamp_(min=0)                     # the marker was only for r
        ctx.unsigned, ctx.int_bits_dtype, ctx.step, ctx.unit = lo == 0, int_bits.dtype, step, unit
        return out

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        step, u = ctx.step, ctx.unit
        per_tensor = not isinstance(step, torch.Tensor) or step.dim() == 0
        gx = gi = None
        if ctx.needs_input_grad[1]:
            rr = _htb(r, r, -u, float("inf")) if ctx.unsigned else r   # the −u markers count 0
            if per_tensor and g.is_contiguous() and rr.is_contiguous():
                gs = torch.dot(g.reshape(-1), rr.reshape(-1))
            elif per_tensor:
                gs = (g * rr).sum()
            else:
                gs = (g * rr).sum(dim=[d for d, n in enumerate(step.shape) if n == 1], keepdim=True)
            # ∂/∂int_bits = Σ g·r·(s/u)·ln 2
            gi = (gs * (_LN2 * step / u)).reshape(-1).to(ctx.int_bits_dtype)   # int_bits' (channels,)
            if ctx.needs_input_grad[0] and rr is not r:
                gx = _htb_out(g, r, -u, u, grad_input=rr)   # reuse the temporary
        if ctx.needs_input_grad[0] and gx is None:
            gx = _htb(g, r, -u, u)
        return gx, gi, None, None, None, None, None, None, None


class exporting:  # noqa: N801 - a context manager used like a function
    """Within ``with exporting(model):`` every ``FixedPoint`` computes through ``fixed_point_qdq``
    (same numbers; an op the ONNX exporter maps to QuantizeLinear/DequantizeLinear), or with
    ``form="qonnx"`` through ``fixed_point_quant`` (a QONNX ``Quant`` node)."""

    def __init__(self, model: nn.Module, form: str = "qdq") -> None:
        self.casts = [m for m in model.modules() if isinstance(m, FixedPoint)]
        self.form = form

    def __enter__(self) -> "exporting":
        for q in self.casts:
            q.export_form = self.form
        return self

    def __exit__(self, *exc: object) -> None:
        for q in self.casts:
            q.export_form = False


class FixedPoint(nn.Module):
    """Cast to ``ap_fixed<bits, int_bits, rounding, overflow>`` (``ap_ufixed`` when ``signed=False``)."""

    saves_current = False  # as a weight's parametrization: checkpoints keep the float master weight
    refuses_fold = ("the conv's weights are cast to fixed point: folding would leave the fixed-point grid (use "
                    "normfx.fixed_point(..., fold_bn=True) to fold first)")
    """``normfx.kinds.fold_refusal``: a weight this casts must not be rewritten by a fold."""
    int_bits: torch.Tensor
    observed_max: torch.Tensor

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
        self.export_form: str | bool = False   # "qdq" or "qonnx" while exporting
        self.k_hot: int | None = None  # project the cast value to at most K powers of two
        self.k_hot_code: str = "csd"   # how the K terms count: signed powers of two, or ones of the word
        # What the fixed_point pass made this cast for: (role, layer) with role one of "weight",
        # "bias", "scale", "shift", "output", "inputs" and the layer relative to the module that
        # holds the cast ("" for the holder itself). Export's HLS sidecar reads it.
        self.site: tuple[str, str] | None = None

    @property
    def trainable(self) -> bool:
        return isinstance(self.int_bits, nn.Parameter)

    @property
    def per_channel(self) -> bool:
        return self.int_bits.numel() > 1

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
        int_bits = self.int_bits
        if sharded(x) or sharded(int_bits):     # FSDP's state_dict (see normfx.nn.param_keys.full)
            x, int_bits = full(x), full(int_bits)
        lo, hi = self._range()
        if self.export_form:
            step = torch.exp2(torch.round(int_bits.detach()) - self.bits).to(x.dtype)
            step = step.reshape(()) if step.numel() == 1 else step
            if self.export_form == "qonnx":
                return fixed_point_quant(x, step, lo, hi, self.rounding, self.axis % x.dim())
            return fixed_point_qdq(x, step, lo, hi, self.axis % x.dim())
        if torch.compiler.is_compiling():    # torch.compile and torch.export: tensor ops only
            y = _traceable_cast(x, int_bits, lo, hi, self.bits, self.signed, self.rounding, self.overflow,
                                self.axis % x.dim())
        else:
            y = _FixedPointSTE.apply(x, int_bits, lo, hi, self.bits, self.signed, self.rounding,
                                     self.overflow, self.axis % x.dim())
        return self._k_hot(y, torch.round(int_bits.detach()).reshape(-1)) if self.k_hot else y

    def _range(self) -> tuple[int, int]:
        """The integer range ``[lo, hi]`` of the word (``saturate_sym`` drops the most negative)."""
        lo, hi = integer_range(self.bits, self.signed)
        return (-hi, hi) if self.overflow == "saturate_sym" and self.signed else (lo, hi)

    def k_hot_table(self, dtype: torch.dtype = torch.float64, int_bits: int | None = None) -> torch.Tensor:
        """Every value with at most ``k_hot`` signed powers of two ``2^e`` on the grid of the format
        with ``int_bits`` integer bits (``e ≥ I − W``) and within its range, sorted. ``int_bits``
        defaults to the cast's own (a per-tensor cast's only one)."""
        ib = int(self.integer_bits().reshape(-1)[0]) if int_bits is None else int(int_bits)
        code: KHotCode = getattr(self, "k_hot_code", "csd")
        key = (self.k_hot, code, ib, self.bits, self.signed, self.overflow, dtype, self.int_bits.device)
        cache = self.__dict__.setdefault("_k_hot_cache", {})
        if key not in cache:   # the binary point moves rarely: reuse the table
            lo, hi = self._range()
            step = 2.0 ** (ib - self.bits)
            table = k_hot_table(self.k_hot or 1, range(ib - self.bits, ib), dtype=torch.float64, code=code)
            table = table[(table >= lo * step) & (table <= hi * step)]
            cache[key] = table.to(device=self.int_bits.device, dtype=dtype)
        return cache[key]

    def _k_hot(self, y: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
        """Nearest K-hot value on each channel's own grid and range, straight-through in backward.

        Per-channel casts project each channel with its own format's table: a union of the
        formats would hand a channel values its word cannot hold (the deployed cast would then
        saturate them into a different, many-term value)."""
        yd = y.detach()
        if ib.numel() == 1:
            proj = k_hot_project(yd, self.k_hot_table(y.dtype, int(ib[0])))
        else:
            axis = self.axis % y.dim()
            moved = yd.movedim(axis, 0)
            out = torch.empty_like(moved)
            for value in torch.unique(ib).tolist():
                idx = (ib == value).nonzero().reshape(-1).to(y.device)
                out[idx] = k_hot_project(moved[idx], self.k_hot_table(y.dtype, int(value)))
            proj = out.movedim(0, axis)
        return y + (proj - y).detach()

    @torch.no_grad()
    def calibrate_from_observed(self, margin: float = 0.0) -> None:
        """Set ``int_bits`` so the observed ``max |x|`` (times ``1 + margin``) fits, and stop observing."""
        mx: torch.Tensor = self.observed_max * (1.0 + margin)
        # the smallest I with max < 2^(I - sign): floor(log2 max) + 1 integer bits (+1 for the sign)
        bits = torch.where(mx > 0, torch.floor(torch.log2(mx.clamp_min(1e-30))) + 1,
                           torch.full_like(mx, 1.0 - self.bits))
        if self.signed:
            bits = bits + 1
        self.int_bits.copy_(bits.clamp(1 - self.bits * 2, self.bits * 2))
        self.observing = False
        # where training starts from (normfx.binary_point_moves); a plain attribute, no state-dict key
        self.__dict__["start_int_bits"] = self.integer_bits().reshape(-1).clone().cpu()

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
                f"overflow={self.overflow}, trainable={self.trainable}"
                + (f", k_hot={self.k_hot}" if self.k_hot else "")
                + (f", k_hot_code={self.k_hot_code!r}" if self.k_hot and getattr(self, "k_hot_code", "csd") != "csd"
                   else ""))

