"""Softmax self-attention → Simplified Linear Attention (SLAB), reusing the q/k/v and output projections.

Sites, in the module tree's order:

* timm's ``Attention`` (ViT, DeiT: the token grid from ``patch_embed.grid_size``, the prefix tokens
  from ``num_prefix_tokens``) and torchvision's ViT ``EncoderBlock.self_attention``
  (``nn.MultiheadAttention``; grid ``image_size // patch_size``, one class token). A ViT is one stage
  (stage 0).
* Swin window attention: timm's ``swin_transformer.WindowAttention`` (the stage resolution from its
  block's ``input_resolution``) and torchvision's ``ShiftedWindowAttention`` (the stage resolution from
  one probe forward at ``image_size``: torchvision's Swin does not record its input size). As in
  SLAB's Swin, the window is widened to the stage's resolution and the shift dropped: the SLA attends
  over the whole stage map. Stages are numbered 0, 1, ... by resolution, in order; by default the
  first half of them (SLAB's ``LLSS`` for the four stages of Swin-T/S/B).

Leaf swaps: each attention module's slot gets the new module (timm's Swin block also gets its window
set to the stage resolution, its shift to 0 and its mask removed); the model's tree stays as it is.
Skipped with their reason: attention with q/k normalization, gating or a separate q/k/v projection,
attention in a model whose token grid is unknown (another ``nn.MultiheadAttention``: cross-attention,
text), a dynamic image size, Swin V2's cosine attention, a torchvision Swin without ``image_size``,
stages not selected.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn as nn

from normfx.config import check_choice
from normfx.match import set_module
from normfx.nn.linear_attention import SelfAttentionSLA, SimplifiedLinearAttention
from normfx.report import Change, PassResult, Skip, SkipReason
from normfx.scope import EVERYWHERE, Scope
from normfx.transform import Step, Transform

__all__ = ["swap_attention", "drop_class_token", "LinearAttentionConfig", "LINEAR_ATTENTION"]


def _timm_attention(m: nn.Module) -> bool:
    return type(m).__name__ == "Attention" and type(m).__module__.startswith("timm.")


def _swin_kind(m: nn.Module) -> str | None:
    """``"timm"``, ``"torchvision"`` (Swin V1 window attention normfx maps), ``"other"`` (another window
    attention: Swin V2's cosine attention) or ``None``."""
    cls, mod = type(m).__name__, type(m).__module__
    if cls == "WindowAttention" and mod == "timm.models.swin_transformer":
        return "timm"
    if cls == "ShiftedWindowAttention" and mod.startswith("torchvision."):
        return "torchvision"
    if "WindowAttention" in cls:
        return "other"
    return None


def swap_attention(model: nn.Module, *, kernel_size: int = 5, stages: Sequence[int] | None = None,
                   image_size: tuple[int, int] | None = None, dropped_prefix: int = 0,
                   scope: Scope = EVERYWHERE) -> PassResult:
    """Every supported softmax self-attention of ``model`` in the selected stages becomes an SLA (in place).

    ``dropped_prefix``: prefix tokens the caller removes after the swap (``drop_class_token``)."""
    changes: list[Change] = []
    skips: list[Skip] = []
    grid, prefix, dynamic = _token_grid(model)
    prefix -= dropped_prefix
    named = [(n, m) for n, m in model.named_modules() if n]
    swin = [(n, m) for n, m in named if _swin_kind(m) in ("timm", "torchvision")]
    resolution = _swin_resolutions(model, swin, image_size)
    order = list(dict.fromkeys(r for r in resolution.values()))
    n_stages = len(order) if order else 1
    selected = set(range(max(1, n_stages // 2))) if stages is None else set(stages)   # a ViT: stage 0
    known = bool(order) or not swin            # a torchvision Swin without image_size: its stages are unknown
    if stages is not None and known and (not selected or not selected <= set(range(n_stages))):
        raise ValueError(f"stages={tuple(stages)}: the model's attention is in stages 0..{n_stages - 1}")

    def unselected(stage: int) -> str:
        return f"stage {stage} not selected (stages={sorted(selected)})"

    for name, m in named:
        kind = _swin_kind(m)
        if kind == "other":
            skips.append(Skip(name, SkipReason.UNSUPPORTED,
                              f"{type(m).__name__}: Swin V2's cosine window attention is not supported"))
        elif kind is not None:
            if name not in resolution:
                skips.append(Skip(name, SkipReason.UNSUPPORTED, "torchvision's SwinTransformer does not record its "
                                  "input size: pass image_size=(H, W) to map its stages"))
                continue
            res, stage = resolution[name], order.index(resolution[name])
            if stage not in selected:
                skips.append(Skip(name, SkipReason.UNSUPPORTED, unselected(stage)))
                continue
            block = name.rpartition(".")[0]
            excluded = scope.skip(name, (name, m), *([(block, model.get_submodule(block))] if kind == "timm" else []))
            detail = (f"stage {stage}, {m.num_heads} heads, window widened to the stage's {res[0]}×{res[1]} tokens, "
                      f"no shift, DWC {kernel_size}×{kernel_size}")
            if excluded:
                skips.append(excluded)
                continue
            if scope.plan:
                changes.append(Change(name, "linear attention", detail))
                continue
            sla = SimplifiedLinearAttention.from_projections(m.qkv, m.proj, m.num_heads, res, kernel_size=kernel_size,
                                                             attn_drop=_p(m, "attn_drop", "attention_dropout"),
                                                             proj_drop=_p(m, "proj_drop", "dropout"))
            if kind == "timm":
                _widen_timm_block(model.get_submodule(block), res)
            set_module(model, name, sla.train(m.training))
            changes.append(Change(name, "linear attention", detail))
        elif _timm_attention(m) or isinstance(m, nn.MultiheadAttention):
            why = _why_not(m, grid, dynamic) or (None if 0 in selected else unselected(0))
            if why:
                skips.append(Skip(name, SkipReason.UNSUPPORTED, why))
                continue
            assert grid is not None
            excluded = scope.skip(name, (name, m))
            if excluded:
                skips.append(excluded)
                continue
            if not scope.plan:
                set_module(model, name, _build(m, grid, prefix, kernel_size).train(m.training))
            detail = (f"{m.num_heads} heads, grid {grid[0]}×{grid[1]}, {prefix} prefix token(s), "
                      f"DWC {kernel_size}×{kernel_size}")
            changes.append(Change(name, "linear attention", detail))
    return PassResult("linear_attention", tuple(changes), tuple(skips))


def _p(m: nn.Module, *names: str) -> float:
    """A dropout probability stored as an ``nn.Dropout`` (timm) or a float (torchvision)."""
    for n in names:
        v = getattr(m, n, None)
        if isinstance(v, nn.Dropout):
            return float(v.p)
        if isinstance(v, (int, float)):
            return float(v)
    return 0.0


def _widen_timm_block(block: Any, res: tuple[int, int]) -> None:
    """timm's Swin block partitions and shifts around its attention: one window of the stage's size, no
    shift, no mask (what SLAB's Swin block does once its window reaches the stage resolution)."""
    block.window_size, block.shift_size = tuple(res), (0, 0)
    block.window_area = res[0] * res[1]
    block.dynamic_mask = False
    block.attn_mask = None


def _swin_resolutions(model: nn.Module, sites: list[tuple[str, nn.Module]],
                      image_size: tuple[int, int] | None) -> dict[str, tuple[int, int]]:
    """The ``(H, W)`` of the map each Swin window attention sees: timm's from its block, torchvision's by
    one forward of zeros at ``image_size`` (omitted when it is not given)."""
    out: dict[str, tuple[int, int]] = {}
    probe = []
    for name, m in sites:
        if _swin_kind(m) == "timm":
            block = model.get_submodule(name.rpartition(".")[0])
            out[name] = tuple(int(v) for v in block.input_resolution)  # type: ignore[assignment]
        else:
            probe.append((name, m))
    if probe and image_size is not None:
        seen: dict[str, tuple[int, int]] = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, tuple(args[0].shape[1:3])))
                 for n, m in probe]
        conv = next((c for c in model.modules() if isinstance(c, nn.Conv2d)), None)
        if conv is None:
            raise ValueError(f"image_size={image_size}: {type(model).__name__} has no Conv2d patch embedding to read "
                             "the input channels from, so its Swin stages cannot be probed")
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                model(torch.zeros(1, conv.in_channels, *image_size, device=conv.weight.device,
                                  dtype=conv.weight.dtype))
        except Exception as e:
            raise ValueError(f"image_size={image_size}: one forward of {type(model).__name__} on a "
                             f"[1, {conv.in_channels}, {image_size[0]}, {image_size[1]}] input failed ({e}); pass the "
                             "size the model takes") from e
        finally:
            for h in hooks:
                h.remove()
            for m, t in modes.items():
                m.training = t
        out.update(seen)
    return out


def drop_class_token(model: nn.Module, *, check_only: bool = False) -> str:
    """SLAB-DeiT's head: a timm ViT without its class token, average-pooling the patch tokens (in place).

    Removes ``cls_token`` (and its position in ``pos_embed``), lowers ``num_prefix_tokens`` by one and
    sets ``global_pool="avg"``; ``state_dict`` loses ``cls_token`` and ``pos_embed`` one position.
    ``check_only``: raise if it cannot, change nothing.

    Returns:
        A sentence for the report saying what changed.

    Raises:
        ValueError: not a timm ``VisionTransformer`` with a class token, a distilled model (its head reads
            the class and distillation tokens) or a dynamic image size.
    """
    name = type(model).__name__
    if not type(model).__module__.startswith("timm.") or getattr(model, "cls_token", None) is None \
            or not hasattr(model, "global_pool"):
        raise ValueError(f"cls_token='drop' needs a timm VisionTransformer with a class token; {name} has none "
                         "normfx can drop (torchvision's VisionTransformer.forward reads x[:, 0]): use "
                         "cls_token='exclude'")
    if getattr(model, "dist_token", None) is not None:
        raise ValueError(f"cls_token='drop': {name} is distilled, its head reads the class and distillation "
                         "tokens; use cls_token='exclude'")
    if getattr(model, "dynamic_img_size", False):
        raise ValueError(f"cls_token='drop': {name} takes dynamic image sizes; build it with a fixed img_size")
    if check_only:
        return ""
    m: Any = model
    m.cls_token = None
    if m.pos_embed is not None and not m.no_embed_class:
        m.pos_embed = nn.Parameter(m.pos_embed.detach()[:, 1:].clone(), requires_grad=m.pos_embed.requires_grad)
    m.num_prefix_tokens -= 1
    if hasattr(m, "has_class_token"):
        m.has_class_token = False
    pooled = m.global_pool
    m.global_pool = "avg"
    return (f"cls_token='drop': {name}'s class token removed, the head average-pools the patch tokens "
            f"(was global_pool={pooled!r})")


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
        with torch.device("meta"):
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


@dataclass(frozen=True)
class LinearAttentionConfig:
    """Options of ``normfx.linear_attention`` (see it for their meaning); an int ``image_size`` is
    stored as ``(size, size)``."""

    kernel_size: int = 5
    stages: tuple[int, ...] | None = None
    cls_token: Literal["exclude", "drop"] = "exclude"
    image_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        k = self.kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {k!r}")
        check_choice("cls_token", self.cls_token, ("exclude", "drop"))
        st = self.stages
        if st is not None:
            if isinstance(st, (int, str)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in st):
                raise ValueError(f"stages must be a sequence of stage indices, e.g. (0, 1), got {st!r}")
            object.__setattr__(self, "stages", tuple(st))
        size: Any = self.image_size
        size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
        if size is not None and (not isinstance(size, (tuple, list)) or len(size) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise ValueError(f"image_size must be a positive int or (H, W), got {self.image_size!r}")
        object.__setattr__(self, "image_size", None if size is None else tuple(size))


def _swap(model: nn.Module, scope: Scope, c: LinearAttentionConfig) -> tuple[PassResult, tuple[str, ...]]:
    drop = c.cls_token == "drop"
    result = swap_attention(model, kernel_size=c.kernel_size, stages=c.stages, image_size=c.image_size,
                            dropped_prefix=int(drop), scope=scope)
    notes = ["linear_attention: the function changes; fine-tune after the swap"]
    if drop and not scope.plan:
        notes.append(drop_class_token(model))
    return result, tuple(notes)


def _check(model: nn.Module, c: LinearAttentionConfig) -> None:
    if c.cls_token == "drop":
        drop_class_token(model, check_only=True)     # every error before anything changes


LINEAR_ATTENTION = Transform(
    name="linear_attention", config=LinearAttentionConfig, exact=False, check=_check, tensors="own",
    steps=lambda c: (Step("linear_attention", model_pass=partial(_swap, c=c)),),
    summary="softmax self-attention → simplified linear attention, cost linear in tokens (SLAB's SLA)",
    paper="Guo et al., SLAB (ICML 2024)",
    page="linear_attention.md",
    inspect=(("linear_attention", LinearAttentionConfig()),), sites="attention",
)
