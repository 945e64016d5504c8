"""``FixedPointBatchNorm``: BatchNorm as a fixed-point per-channel multiply-add (QFX), and the
one-pass batch-statistics autograd function it trains with.

``y = x·ŝ + t̂`` with ``ŝ = Q_s(γ/√(σ² + ε))`` (K-hot projected when ``k_hot``) and
``t̂ = Q_t(β − μ·γ/√(σ² + ε))``, each ``Q`` a ``FixedPoint`` cast; batch statistics in training (and
the running statistics updated as BatchNorm does), running statistics in eval. The same parameters
and buffers as the BatchNorm it replaces, so state_dict keys stay.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from normfx.nn.fixed_point import FixedPoint
from normfx.nn.sync_bn import sync_group, synced_moments, update_running, world_size

__all__ = ["FixedPointBatchNorm"]


class FixedPointBatchNorm(nn.BatchNorm2d):
    """BatchNorm as a fixed-point per-channel multiply-add: ``x·ŝ + t̂``.

    ``ŝ = Q_s(γ/√(σ² + ε))`` (K-hot projected when ``k_hot``) and ``t̂ = Q_t(β − μ·γ/√(σ² + ε))`` with
    batch statistics in training (running statistics updated as BatchNorm does) and running
    statistics in eval. Subclasses BatchNorm2d so parameters, buffers and state-dict keys are the
    BatchNorm's; works for 1d/2d/3d inputs (channel axis 1).
    """

    deployed_scale: torch.Tensor | None
    deployed_shift: torch.Tensor | None
    normfx_syncs_itself = True   # normfx.sync_bn: batch statistics over every rank in scale_shift

    def eval_affine(self) -> str:
        """``normfx.kinds.eval_affine``: its multiply-add is on the fixed-point grid, which a fold into
        the conv would leave."""
        return ("a fixed-point BatchNorm computes its multiply-add on the fixed-point grid: folding it would "
                "leave the grid (use normfx.fixed_point(..., fold_bn=True) to fold first)")

    def __init__(self, num_features: int, *, scale_q: FixedPoint, shift_q: FixedPoint,
                 k_hot: int | None = None, k_hot_code: str = "csd", **kw) -> None:
        super().__init__(num_features, **kw)
        self.scale_q, self.shift_q = scale_q, shift_q
        self.k_hot = k_hot
        self.scale_q.k_hot = k_hot
        self.scale_q.k_hot_code = k_hot_code
        self.register_buffer("deployed_scale", None)
        self.register_buffer("deployed_shift", None)

    @classmethod
    def from_bn(cls, bn: _BatchNorm, *, scale_q: FixedPoint, shift_q: FixedPoint,
                k_hot: int | None, k_hot_code: str = "csd") -> "FixedPointBatchNorm":
        new = cls(bn.num_features, scale_q=scale_q, shift_q=shift_q, k_hot=k_hot, k_hot_code=k_hot_code, eps=bn.eps,
                  momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats)
        for name in ("weight", "bias"):
            setattr(new, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(bn, name))
        new.train(bn.training)
        return new

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def scale_shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(scale, shift)`` of the float BatchNorm (batch statistics in training)."""
        if self.training or not self.track_running_stats:
            update = self.training and self.track_running_stats
            m = 0.0
            if update:
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)  # type: ignore[arg-type]
            synced, group = sync_group(self)
            if synced and world_size(group) > 1:       # normfx.sync_bn under torch.distributed
                mean, var, n = synced_moments(x, group)
                if update:
                    assert self.running_var is not None
                    update_running(self.running_mean, self.running_var, mean, var, n, m)
            else:
                mean, var = _BatchStats.apply(x, self.running_mean if update else None,
                                              self.running_var if update else None, m)
        else:
            assert self.running_mean is not None and self.running_var is not None
            mean, var = self.running_mean, self.running_var
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale, shift

    def quantized_scale_shift(self, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ŝ, t̂)``: the fixed-point (and K-hot) scale and shift."""
        return self.scale_q(scale), self.shift_q(shift)   # scale_q.k_hot projects the scale

    @torch.no_grad()
    def bake(self) -> None:
        """Deploy: compute ``(ŝ, t̂)`` once from the running statistics and keep them as constants
        (eval forwards then are one multiply-add; a train-mode forward drops them)."""
        if not self.track_running_stats:
            return  # batch statistics at every call: nothing constant to keep
        was = self.training
        self.train(False)
        probe = self.running_mean.new_zeros(1, self.num_features)  # eval reads the running statistics
        s, t = self.quantized_scale_shift(*self.scale_shift(probe))
        self.train(was)
        self.deployed_scale, self.deployed_shift = s.clone(), t.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training and self.deployed_scale is not None:
            s, t = self.deployed_scale, self.deployed_shift
        else:
            if self.training:
                self.deployed_scale = self.deployed_shift = None
            s, t = self.quantized_scale_shift(*self.scale_shift(x))
            if self.training and x.dim() <= 5 and s.dtype == x.dtype:
                # x·ŝ + t̂ through torch's fused BatchNorm kernel with identity statistics (ε = 0):
                # one pass forward and one backward; values may differ from the separate Mul/Add in
                # the last bit (a fused multiply-add), which only the eval graph must reproduce.
                return F.batch_norm(x, s.new_zeros(s.shape), s.new_ones(s.shape), s, t, False, 0.0, 0.0)
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * s.view(view) + t.view(view)


class _BatchStats(torch.autograd.Function):
    """Per-channel batch mean and biased variance over every axis but 1, and, when running
    statistics are given, their in-place update as BatchNorm does it (unbiased variance, momentum)
    — one pass through torch's BatchNorm statistics kernel. Backward in one pass:
    ``∂/∂x = ḡ_μ/n + 2·ḡ_σ²·(x − μ)/n``."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, momentum: float):
        if running_mean is not None and running_mean.dtype != x.dtype:
            var, mean = torch.var_mean(x, [d for d in range(x.dim()) if d != 1], unbiased=False)
            with torch.no_grad():
                n = x.numel() / x.shape[1]
                running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
                running_var.mul_(1 - momentum).add_(momentum * var.to(running_var.dtype) * n / max(n - 1, 1))
        else:
            mean, var = torch.batch_norm_update_stats(x, running_mean, running_var, momentum)
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx, g_mean, g_var):
        x, mean = ctx.saved_tensors
        n = x.numel() / x.shape[1]
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
        a = torch.zeros_like(mean) if g_var is None else g_var * (2.0 / n)
        b = g_mean / n - a * mean
        view = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(b.view(view), x, a.view(view)), None, None, None
