"""Simplified Linear Attention (SLAB, Guo et al., ICML 2024): attention whose cost grows linearly with
the number of tokens, in place of softmax attention.

Per head, with ``P`` a learned positional encoding (zero-initialised, one vector per token):

    Q, K ← ReLU(Q), ReLU(K + P)
    O = Q (Kᵀ V) / (Q · Σ_j K_j + 1e-6) + DWC(V)

``DWC`` is a depthwise ``k × k`` convolution over V laid out on the token grid, one set of weights
shared by all heads (as in SLAB's code); prefix tokens (cls/distillation) are left out of it and
still attend linearly. The core runs in float32 whatever autocast says. ``(Q Kᵀ) V`` or ``Q (Kᵀ V)``
is picked by cost, so past ``N > d`` tokens the cost is ``O(N·d²)``. Unlike softmax attention there
is no ``1/√d`` scale: the normalizer ``1/(Q·ΣK)`` makes each output a weighted mean of values.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SimplifiedLinearAttention", "SelfAttentionSLA", "sla_reference"]


class SimplifiedLinearAttention(nn.Module):
    """SLA over ``[B, N, C]`` tokens: ``num_prefix_tokens`` prefix tokens, then a ``grid`` of patches.

    Args:
        dim: token width C (also the width of q, k and v).
        num_heads: heads; ``dim`` must divide evenly.
        grid: ``(height, width)`` of the patch tokens.
        num_prefix_tokens: tokens before the grid (cls, distillation), excluded from the DWC term.
        kernel_size: the depthwise convolution's kernel (odd).
        qkv_bias: bias of the fused q/k/v projection.

    Example:
        >>> a = normfx.nn.SimplifiedLinearAttention(32, 4, grid=(4, 4), num_prefix_tokens=1)
        >>> a(torch.randn(2, 17, 32)).shape
        torch.Size([2, 17, 32])
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], *, num_prefix_tokens: int = 0,
                 kernel_size: int = 5, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)   # kept for the attention it replaces; SLA has no attention map
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2, groups=self.head_dim)
        tokens = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        self.positional_encoding = nn.Parameter(torch.zeros(1, tokens, dim))

    @classmethod
    def from_projections(cls, qkv: nn.Linear, proj: nn.Linear, num_heads: int, grid: tuple[int, int], *,
                         num_prefix_tokens: int = 0, kernel_size: int = 5, attn_drop: float = 0.0,
                         proj_drop: float = 0.0) -> "SimplifiedLinearAttention":
        """An SLA that reuses the given q/k/v and output projections (their Parameters, not copies)."""
        dim = proj.in_features
        if qkv.out_features != 3 * dim or qkv.in_features != dim or proj.out_features != dim:
            raise ValueError(f"qkv {qkv.in_features}→{qkv.out_features} and proj {proj.in_features}→"
                             f"{proj.out_features} are not a self-attention of width {dim}")
        with torch.device("meta"):                     # no throwaway q/k/v and output projections
            new = cls(dim, num_heads, grid, num_prefix_tokens=num_prefix_tokens, kernel_size=kernel_size,
                      qkv_bias=qkv.bias is not None, attn_drop=attn_drop, proj_drop=proj_drop)
        new.qkv, new.proj = qkv, proj
        ref = qkv.weight
        new.dwc = new.dwc.to_empty(device=ref.device).to(ref.dtype)
        new.dwc.reset_parameters()                    # torch's default init, as a freshly built conv
        new.positional_encoding = nn.Parameter(torch.zeros(new.positional_encoding.shape, device=ref.device,
                                                           dtype=ref.dtype))
        return new

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False, *,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``[B, N, C]`` tokens (prefix tokens, then the grid row by row), or ``[B, H, W, C]``, the
        grid itself (torchvision's Swin attention calling convention), returned in the same layout.
        ``attn_mask``/``is_causal`` (torch's names) and ``mask`` (timm's Swin) must be unset: SLA has no
        attention map to mask."""
        if attn_mask is not None or is_causal or mask is not None:
            raise ValueError("SimplifiedLinearAttention has no attention map to mask: masks and causal attention "
                             "are not supported (a Swin block must attend over its whole stage, unshifted)")
        if x.dim() == 4:
            b, gh, gw, c = x.shape
            if (gh, gw) != self.grid or self.num_prefix_tokens:
                raise ValueError(f"SimplifiedLinearAttention expects a [B, {self.grid[0]}, {self.grid[1]}, "
                                 f"{self.dim}] grid, got {tuple(x.shape)}")
            return self.forward(x.reshape(b, gh * gw, c)).reshape(b, gh, gw, c)
        b, n, c = x.shape
        p, (gh, gw) = self.num_prefix_tokens, self.grid
        if n != p + gh * gw or c != self.dim:
            raise ValueError(f"SimplifiedLinearAttention expects [B, {p} + {gh}·{gw}, {self.dim}] tokens, "
                             f"got {tuple(x.shape)}")
        q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)
        q, k = F.relu(q), F.relu(k + self.positional_encoding)
        h, d = self.num_heads, self.head_dim
        q, k, v = (t.reshape(b, n, h, d).transpose(1, 2) for t in (q, k, v))        # [B, H, N, d]
        with torch.autocast(x.device.type, enabled=False):
            out = _core(q.float(), k.float(), v.float())
            grid_v = v[:, :, p:].float().reshape(b * h, gh, gw, d).permute(0, 3, 1, 2)   # [B·H, d, gh, gw]
            conv = F.conv2d(grid_v, self.dwc.weight.float(), None if self.dwc.bias is None else self.dwc.bias.float(),
                            padding=self.dwc.padding, groups=d)
            local = conv.permute(0, 2, 3, 1).reshape(b, h, gh * gw, d)
            out = torch.cat([out[:, :, :p], out[:, :, p:] + local], dim=2) if p else out + local
        out = out.transpose(1, 2).reshape(b, n, c).to(x.dtype)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, grid={self.grid}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, kernel_size={self.dwc.kernel_size[0]}")


def _core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Q(KᵀV) / (Q·ΣK + 1e-6)`` per head, the association order picked by cost."""
    n, d = q.shape[-2], q.shape[-1]
    z = 1.0 / (torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2)) + 1e-6)
    if n > d:                                         # Q(KᵀV) is O(N·d²), (QKᵀ)V is O(N²·d)
        out = q @ (k.transpose(-2, -1) @ v)
    else:
        out = (q @ k.transpose(-2, -1)) @ v
    return out * z.unsqueeze(-1)


def sla_reference(x: torch.Tensor, m: SimplifiedLinearAttention, order: str) -> torch.Tensor:
    """The formula in float64 with a chosen association order (``"qk_v"`` or ``"q_kv"``), for tests."""
    x = x.double()
    b, n, c = x.shape
    p, (gh, gw), h, d = m.num_prefix_tokens, m.grid, m.num_heads, m.head_dim
    qkv = F.linear(x, m.qkv.weight.double(), None if m.qkv.bias is None else m.qkv.bias.double())
    q, k, v = qkv.reshape(b, n, 3, c).unbind(2)
    q, k = torch.relu(q), torch.relu(k + m.positional_encoding.double())
    q, k, v = (t.reshape(b, n, h, d).transpose(1, 2) for t in (q, k, v))
    num = (q @ k.transpose(-2, -1)) @ v if order == "qk_v" else q @ (k.transpose(-2, -1) @ v)
    den = (q * k.sum(2, keepdim=True)).sum(-1, keepdim=True) + 1e-6
    out = num / den
    grid_v = v[:, :, p:].reshape(b * h, gh, gw, d).permute(0, 3, 1, 2)
    conv = F.conv2d(grid_v, m.dwc.weight.double(), m.dwc.bias.double(), padding=m.dwc.padding, groups=d)
    out[:, :, p:] += conv.permute(0, 2, 3, 1).reshape(b, h, gh * gw, d)
    out = out.transpose(1, 2).reshape(b, n, c)
    return F.linear(out, m.proj.weight.double(), None if m.proj.bias is None else m.proj.bias.double())


class SelfAttentionSLA(nn.Module):
    """``nn.MultiheadAttention``'s call signature over an SLA, for self-attention only:
    ``(out, None) = m(x, x, x, need_weights=False)`` (torchvision's ViT ``EncoderBlock``)."""

    def __init__(self, sla: SimplifiedLinearAttention, batch_first: bool = True) -> None:
        super().__init__()
        self.sla = sla
        self.batch_first = batch_first

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = False, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query:
            raise ValueError("SelfAttentionSLA replaces self-attention: query, key and value must be one tensor")
        if key_padding_mask is not None or attn_mask is not None or is_causal or need_weights:
            raise ValueError("SelfAttentionSLA: no masks, no causal attention and no attention weights")
        x = query if self.batch_first else query.transpose(0, 1)
        out = self.sla(x)
        return (out if self.batch_first else out.transpose(0, 1)), None
