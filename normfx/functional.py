"""Pure tensor math, no graph: the BatchNorm folds.

With ``c = γ / sqrt(σ̂² + ε)`` (You et al., eq. 2):

* BN after a conv/linear: ``ω' = ω·c`` per output channel, ``b' = (b − μ̂)·c + β``.
* BN before a conv/linear (``a = c``, ``t = β − μ̂·c``): ``ω' = ω·a`` per *input* channel and
  ``b' = b + Σ ω·t`` — exact only when the conv pads with something the affine commutes with.

The folds are computed in float64 and cast back to the weight's dtype, so a bf16/fp16 model keeps
its dtype and loses nothing to the fold itself.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["bn_scale_shift", "fold_bn_after", "fold_bn_before", "scale_is_safe", "out_channel_view"]


class BNStats(NamedTuple):
    """The four tensors and eps that define an eval-mode BatchNorm; γ/β may be None (affine=False)."""

    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def bn_scale_shift(bn: BNStats, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, t)`` with ``BN(x) = c·x + t`` per channel, in ``dtype``."""
    var = bn.var.detach().to(dtype)
    mean = bn.mean.detach().to(dtype)
    c = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        c = c * bn.weight.detach().to(dtype)
    t = -mean * c
    if bn.bias is not None:
        t = t + bn.bias.detach().to(dtype)
    return c, t


def scale_is_safe(c: torch.Tensor, weight: torch.Tensor) -> tuple[bool, str]:
    """Whether folding scale ``c`` into ``weight`` stays finite in ``weight.dtype``."""
    if not torch.isfinite(c).all():
        bad = (~torch.isfinite(c)).nonzero().flatten()[:5].tolist()
        return False, f"γ/sqrt(σ²+ε) is not finite at channels {bad}"
    limit = torch.finfo(weight.dtype).max
    if weight.numel():
        lo, hi = torch.aminmax(weight.detach())
        wmax = max(abs(float(lo)), abs(float(hi)))
    else:
        wmax = 0.0
    if float(c.abs().amax()) * wmax > limit:
        return False, f"folded weights would overflow {weight.dtype} (max {limit:.3g})"
    return True, ""


def out_channel_view(c: torch.Tensor, weight: torch.Tensor, transposed: bool = False, groups: int = 1) -> torch.Tensor:
    """Reshape per-output-channel ``c`` to broadcast against a conv/linear ``weight``."""
    k = weight.dim() - 2
    if not transposed:
        return c.reshape([-1] + [1] * (weight.dim() - 1))
    # ConvTranspose weight: [in, out/groups, *k]; output channel o = g*(out/groups) + j.
    in_ch = weight.shape[0]
    return c.reshape(groups, 1, -1, *([1] * k)).expand(groups, in_ch // groups, -1, *([1] * k)).reshape(
        in_ch, -1, *([1] * k)
    )


def fold_bn_after(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn: BNStats | None,
    *,
    transposed: bool = False,
    groups: int = 1,
    scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``BN(conv(x))`` into one conv: returns ``(ω', b')`` in the weight's dtype.

    ``weight`` is a Conv/ConvTranspose/Linear weight (Linear: ``[out, in]``). ``scale_shift`` is
    ``bn_scale_shift(bn)`` when the caller has it already.
    """
    c, t = scale_shift if scale_shift is not None else bn_scale_shift(bn)
    w = weight.detach()
    if transposed:
        folded = w.to(torch.float64, copy=True).mul_(out_channel_view(c, w, transposed, groups)).to(w.dtype)
    else:
        folded = _scale_rows(w, c)
    b = t if bias is None else bias.detach().to(torch.float64) * c + t
    return folded, b.to(weight.dtype)


def _scale_rows(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``w[o] * c[o]`` computed in float64, in cache-sized blocks of rows through one reused float64
    buffer (a float64 copy of the whole weight, or a fresh one per block, costs more in memory
    traffic and page faults than the multiply itself)."""
    out = torch.empty_like(w, memory_format=torch.contiguous_format)
    flat, dst, cc = w.reshape(w.shape[0], -1), out.view(w.shape[0], -1), c.reshape(-1, 1)
    rows, cols = flat.shape
    step = max(1, 131072 // max(1, cols))
    buf = torch.empty(min(step, rows), cols, dtype=torch.float64)
    for i in range(0, rows, step):
        n = min(step, rows - i)
        b = buf[:n]
        b.copy_(flat[i:i + n]).mul_(cc[i:i + n])
        dst[i:i + n].copy_(b)
    return out


def fold_bn_before(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: BNStats | None, *, groups: int = 1,
    scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``conv(BN(x))`` into one conv (non-transposed conv or linear): ``(ω', b')``.

    Only exact when the conv's padding commutes with the affine (no zero padding); the caller checks.
    Any per-input-channel affine ``a·x + t`` folds the same way: pass ``scale_shift=(a, t)``.
    """
    a, t = scale_shift if scale_shift is not None else bn_scale_shift(bn)
    w64 = weight.detach().to(torch.float64)
    out_ch, in_per_group = w64.shape[0], w64.shape[1]
    # Input channel of weight[o, i] is (o // (out/groups)) * in_per_group + i.
    a_g = a.reshape(groups, 1, in_per_group)
    t_g = t.reshape(groups, 1, in_per_group)
    wg = w64.reshape(groups, out_ch // groups, in_per_group, -1)
    w = (wg * a_g.unsqueeze(-1)).reshape(w64.shape)
    shift = (wg.sum(-1) * t_g).sum(-1).reshape(out_ch)
    b = shift if bias is None else bias.detach().to(torch.float64) + shift
    return w.to(weight.dtype), b.to(weight.dtype)
