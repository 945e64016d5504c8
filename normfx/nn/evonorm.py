"""EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation Layers",
NeurIPS 2020): normalization and activation in one layer.

* **B0**: ``y = x / max(√(s²_batch + ε), v·x + √(s²_instance + ε)) · γ + β`` — ``s²_batch`` the
  variance over batch and space per channel (a running variance in eval mode), ``s²_instance`` over
  space per sample and channel.
* **S0**: ``y = x·σ(v·x) / √(s²_group + ε) · γ + β`` — ``s²_group`` the variance of the input over
  space and the channels of its group, per sample (no batch statistics: eval = train).
* Without nonlinearity (``apply_act=False``) both are ``y = x·γ + β``, as the paper's code defines
  them (the layer that replaces a BatchNorm with no activation after it).

Statistics are computed in float32 whatever the input dtype (autocast included); variances are
biased (population) ones, so a 1×1 feature map's instance variance is 0, not NaN. ``PRESETS`` holds
the two conventions normfx offers (see ``docs/evonorm.md`` for every difference).
"""
from __future__ import annotations

import logging
from typing import Literal, NamedTuple

import torch
import torch.nn as nn

from normfx.nn.sync_bn import sync_group, synced_moments, update_running, world_size

__all__ = ["EvoNorm2dB0", "EvoNorm2dS0", "Preset", "PRESETS", "EvoNormPreset", "fit_groups"]

logger = logging.getLogger("normfx")

Preset = Literal["paper", "timm"]


class EvoNormPreset(NamedTuple):
    """The conventions of one reference implementation."""

    eps_b0: float
    eps_s0: float
    momentum: float          # running variance: r ← (1 − momentum)·r + momentum·s²
    unbiased_running: bool   # the running variance takes s²·n/(n − 1) (timm) or s² (paper)


PRESETS: dict[str, EvoNormPreset] = {
    # The authors' code: tensorflow/tpu, models/official/resnet/resnet_model.py (evonorm, _batch_std,
    # _group_std): EPSILON 1e-5, MOVING_AVERAGE_DECAY 0.9, biased batch variance (tf.nn.moments),
    # moving variance starting at ones, groups lowered until they divide. (google-research's Flax
    # port is another team's and decays its running variance with momentum 0.99.)
    "paper": EvoNormPreset(eps_b0=1e-5, eps_s0=1e-5, momentum=0.1, unbiased_running=False),
    # timm/layers/evo_norm.py: B0 ε 1e-3, S0 ε 1e-5, momentum 0.1, unbiased running variance.
    "timm": EvoNormPreset(eps_b0=1e-3, eps_s0=1e-5, momentum=0.1, unbiased_running=True),
}


def fit_groups(channels: int, groups: int, where: str = "", *, warn: bool = True) -> int:
    """The largest group count ≤ ``groups`` that divides ``channels`` (the reference code's rule),
    with a warning (unless ``warn=False``) when it had to be lowered."""
    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}")
    g = min(groups, channels)
    while channels % g:
        g -= 1
    if g != groups and warn:
        logger.warning("EvoNorm-S0%s: %d channels are not divisible by groups=%d; using %d groups",
                       f" at {where}" if where else "", channels, groups, g)
    return g


def _view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


class _EvoNorm(nn.Module):
    """Shared parameters: γ (``weight``), β (``bias``) and, with the nonlinearity, ``v``."""

    normfx_norm_layer = True

    def __init__(self, num_features: int, apply_act: bool, eps: float) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.apply_act = bool(apply_act)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v: nn.Parameter | None = nn.Parameter(torch.ones(num_features)) if apply_act else None

    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor] | str:
        """``normfx.kinds.eval_affine``: without the nonlinearity the layer is ``x·γ + β`` in training and
        in eval alike, a constant affine a fold can take; with it, why it is not one."""
        if self.apply_act:
            return ("EvoNorm is not folded: it normalizes with per-sample statistics (and B0 with per-batch "
                    "ones in training); it stays a layer of its own")
        return self.weight, self.bias

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() < 3 or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects [N, {self.num_features}, *spatial] "
                             f"input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        xf = x.float()   # statistics in float32 whatever the input dtype
        y = xf if self.v is None else self._normalize(xf, self.v.float())
        return (y * _view(self.weight.float(), y) + _view(self.bias.float(), y)).to(x.dtype)

    def _normalize(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EvoNorm2dB0(_EvoNorm):
    """EvoNorm-B0 (batch-dependent): ``x / max(√(s²_batch + ε), v·x + √(s²_instance + ε)) · γ + β``.

    Args:
        num_features: channels C of a ``[N, C, *spatial]`` input.
        apply_act: with the nonlinearity (the layer replaces BN + activation); without it the
            layer is ``x·γ + β``.
        eps: ε under both square roots.
        momentum: running variance update ``r ← (1 − momentum)·r + momentum·s²_batch``.
        unbiased_running: update with ``s²·n/(n − 1)`` (timm) instead of ``s²`` (the paper's code).

    Example:
        >>> m = normfx.nn.EvoNorm2dB0(8)
        >>> m(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    running_var: torch.Tensor

    @property
    def normfx_syncs_itself(self) -> bool:
        """``normfx.sync_bn``: with its nonlinearity the layer takes a batch variance, synchronized in
        ``_normalize``; without it the layer is ``x·γ + β`` and has nothing to synchronize."""
        return self.apply_act

    def __init__(self, num_features: int, *, apply_act: bool = True, eps: float = 1e-5, momentum: float = 0.1,
                 unbiased_running: bool = False) -> None:
        super().__init__(num_features, apply_act, eps)
        self.momentum = float(momentum)
        self.unbiased_running = bool(unbiased_running)
        self.register_buffer("running_var", torch.ones(num_features))

    def _normalize(self, xf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(2, xf.dim()))
        if self.training:
            synced, group = sync_group(self)
            n: float | torch.Tensor
            if synced and world_size(group) > 1:      # normfx.sync_bn under torch.distributed
                _, var, n = synced_moments(xf, group)
            else:
                var = xf.var(dim=(0, *spatial), unbiased=False)
                n = xf.numel() / xf.shape[1]
            update_running(None, self.running_var, None, var, n, self.momentum, unbiased=self.unbiased_running)
        else:
            var = self.running_var.float()
        left = _view(torch.sqrt(var + self.eps), xf)
        instance = torch.sqrt(xf.var(dim=spatial, unbiased=False, keepdim=True) + self.eps)
        return xf / torch.maximum(left, xf * _view(v, xf) + instance)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, apply_act={self.apply_act}, eps={self.eps}, momentum={self.momentum}, "
                f"unbiased_running={self.unbiased_running}")


class EvoNorm2dS0(_EvoNorm):
    """EvoNorm-S0 (sample-based): ``x·σ(v·x) / √(s²_group + ε) · γ + β``; the same in train and eval.

    Args:
        num_features: channels C of a ``[N, C, *spatial]`` input.
        groups: channel groups for ``s²_group``; must divide ``num_features`` (``fit_groups`` lowers it).
        apply_act: with the nonlinearity; without it the layer is ``x·γ + β``.
        eps: ε under the square root.

    Example:
        >>> m = normfx.nn.EvoNorm2dS0(8, groups=4)
        >>> m(torch.randn(2, 8, 3, 3)).shape
        torch.Size([2, 8, 3, 3])
    """

    def __init__(self, num_features: int, *, groups: int = 32, apply_act: bool = True, eps: float = 1e-5) -> None:
        super().__init__(num_features, apply_act, eps)
        if groups < 1 or num_features % groups:
            raise ValueError(f"EvoNorm2dS0: groups={groups} must divide num_features={num_features} "
                             "(normfx.nn.evonorm.fit_groups picks the largest that does)")
        self.groups = int(groups)

    def _normalize(self, xf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, c = xf.shape[:2]
        grouped = xf.reshape(n, self.groups, -1)
        std = torch.sqrt(grouped.var(dim=2, unbiased=False, keepdim=True) + self.eps)
        std = std.expand(n, self.groups, c // self.groups).reshape(n, c, *([1] * (xf.dim() - 2)))
        return xf * torch.sigmoid(xf * _view(v, xf)) / std

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, apply_act={self.apply_act}, eps={self.eps}"
