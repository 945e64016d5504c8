"""Softmax self-attention → Simplified Linear Attention (SLAB), reusing the q/k/v and output projections.

Sites: timm's ``Attention`` (ViT, DeiT: the token grid from ``patch_embed.grid_size``, the prefix
tokens from ``num_prefix_tokens``) and torchvision's ViT ``EncoderBlock.self_attention``
(``nn.MultiheadAttention``; grid ``image_size // patch_size``, one class token). Leaf swaps: each
attention module's slot gets the new module, the model's tree stays as it is. Skipped with their
reason: attention with q/k normalization, gating or a separate q/k/v projection, attention in a model
whose token grid is unknown (another ``nn.MultiheadAttention``: cross-attention, text), a dynamic
image size, and Swin's window attention (not supported).
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from normfx.match import set_module
from normfx.nn.linear_attention import SelfAttentionSLA, SimplifiedLinearAttention
from normfx.report import Change, PassResult, Skip, SkipReason

__all__ = ["swap_attention"]


def _timm_attention(m: nn.Module) -> bool:
    return type(m).__name__ == "Attention" and type(m).__module__.startswith("timm.")


def _is_swin(m: nn.Module) -> bool:
    return "WindowAttention" in type(m).__name__ or type(m).__name__ == "ShiftedWindowAttention"


def swap_attention(model: nn.Module, *, kernel_size: int = 5) -> PassResult:
    """Every supported softmax self-attention of ``model`` becomes an SLA (in place)."""
    changes: list[Change] = []
    skips: list[Skip] = []
    grid, prefix, dynamic = _token_grid(model)
    for name, m in list(model.named_modules()):
        if not name:
            continue
        if _is_swin(m):
            skips.append(Skip(name, SkipReason.UNSUPPORTED, "Swin window attention is not supported yet"))
        elif _timm_attention(m) or isinstance(m, nn.MultiheadAttention):
            why = _why_not(m, grid, dynamic)
            if why:
                skips.append(Skip(name, SkipReason.UNSUPPORTED, why))
                continue
            assert grid is not None
            new = _build(m, grid, prefix, kernel_size)
            new.train(m.training)
            set_module(model, name, new)
            detail = (f"{m.num_heads} heads, grid {grid[0]}×{grid[1]}, {prefix} prefix token(s), "
                      f"DWC {kernel_size}×{kernel_size}")
            changes.append(Change(name, "linear attention", detail))
    return PassResult("linear_attention", tuple(changes), tuple(skips))


def _token_grid(model: nn.Module) -> tuple[tuple[int, int] | None, int, bool]:
    """``(grid, prefix tokens, dynamic size)`` of a ViT: timm's from its patch embedding, torchvision's
    from ``image_size // patch_size``; ``(None, 0, False)`` when the model says nothing."""
    pe: Any = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "grid_size", None) is not None:
        dynamic = bool(getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_size", False))
        g = tuple(int(v) for v in pe.grid_size)
        return (g[0], g[1]), int(getattr(model, "num_prefix_tokens", 1)), dynamic
    size, patch = getattr(model, "image_size", None), getattr(model, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and hasattr(model, "class_token"):
        return (size // patch, size // patch), 1, False
    return None, 0, False


def _why_not(m: Any, grid: tuple[int, int] | None, dynamic: bool) -> str | None:
    if grid is None:
        return "no token grid: the model has no patch embedding normfx reads (cross-attention or text?)"
    if dynamic:
        return "the model takes dynamic image sizes: the token grid is not fixed"
    if isinstance(m, nn.MultiheadAttention):
        if not m._qkv_same_embed_dim or m.in_proj_weight is None:
            return "separate q/k/v projections (kdim/vdim differ)"
        if m.bias_k is not None or m.add_zero_attn:
            return "bias_k/add_zero_attn"
        return None
    if not isinstance(getattr(m, "q_norm", nn.Identity()), nn.Identity) or \
            not isinstance(getattr(m, "k_norm", nn.Identity()), nn.Identity):
        return "q/k normalization"
    if getattr(m, "gate", None) is not None or not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
        return "gated or output-normalized attention"
    if m.qkv.out_features != 3 * m.proj.in_features or m.proj.in_features != m.qkv.in_features:
        return "attention width differs from the token width"
    return None


def _build(m: Any, grid: tuple[int, int], prefix: int, kernel_size: int) -> nn.Module:
    if isinstance(m, nn.MultiheadAttention):
        dim = m.embed_dim
        qkv = nn.Linear(dim, 3 * dim, bias=m.in_proj_bias is not None)
        qkv.weight = m.in_proj_weight          # the same Parameters, not copies
        if m.in_proj_bias is not None:
            qkv.bias = m.in_proj_bias
        sla = SimplifiedLinearAttention.from_projections(qkv, m.out_proj, m.num_heads, grid, num_prefix_tokens=prefix,
                                                         kernel_size=kernel_size, attn_drop=m.dropout)
        return SelfAttentionSLA(sla, batch_first=m.batch_first)
    return SimplifiedLinearAttention.from_projections(m.qkv, m.proj, m.num_heads, grid, num_prefix_tokens=prefix,
                                                      kernel_size=kernel_size, attn_drop=m.attn_drop.p,
                                                      proj_drop=m.proj_drop.p)
