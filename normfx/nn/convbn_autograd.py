"""The autograd of a paired Tune block (``normfx.nn.convbn``): the conv's output node and the BN's,
the one conv backward on folded weights that serves both, and the Eval-mode forward on folded
weights (``folded_forward``) that a functional Tune block runs. No module lives here."""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from normfx.functional import BNStats, out_channel_view
from normfx.kinds import is_plain_conv

__all__ = ["Link", "TuneConvOut", "TuneBNOut", "folded_forward", "padded_input"]

def _per_out_dot(a: torch.Tensor, w: torch.Tensor, transposed: bool, groups: int) -> torch.Tensor:
    """``Σ a·w`` over each output channel of two weight-shaped tensors (a dot product per channel)."""
    if not transposed:
        return torch.linalg.vecdot(a.reshape(a.shape[0], -1), w.reshape(w.shape[0], -1), dim=1)
    return (a * w).reshape(groups, a.shape[0] // groups, a.shape[1], -1).sum((1, 3)).reshape(-1)


class _TuneConv(torch.autograd.Function):
    """One conv/linear with BN folded into its weights; saves x and the original parameters only.

    The function form (``tune_convbn_functional``): one graph node stands for ``BN(conv(x))``, so
    nothing can sit between the two."""

    @staticmethod
    def forward(ctx, x, w, b, gamma, beta, mean, var, eps, spec):  # type: ignore[override]
        inv = torch.rsqrt(var + eps)
        c = inv if gamma is None else gamma * inv
        wf = w * out_channel_view(c, w, spec["transposed"], spec["groups"])
        bf = -mean * c if b is None else (b - mean) * c
        if beta is not None:
            bf = bf + beta
        xc, y = _conv_autocast(x, wf, bf, spec)
        ctx.save_for_backward(xc, w, b, gamma, mean, var)
        ctx.eps, ctx.spec, ctx.x_dtype = eps, spec, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        return _folded_backward(ctx, gy, ctx.needs_input_grad[0], ctx.needs_input_grad[4])


def _conv_autocast(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                   spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input as the conv saw it, conv(x))``: under autocast the weights are built in their own
    precision and the conv runs in the autocast dtype, as Eval mode's conv does."""
    dev = x.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    if cdt is None:
        return x, _run(x, w, b, spec)
    xc = x.to(cdt)
    with torch.autocast(dev, enabled=False):
        return xc, _run(xc, w.to(cdt), None if b is None else b.to(cdt), spec)


def _folded_backward(ctx: Any, gy: torch.Tensor, need_x: bool, need_beta: bool) -> tuple:
    """Gradients of ``BN_eval(conv(x))`` from the gradient ``gy`` of the BN's output, with the BN
    input never stored: ``Σ gy·conv(x)`` per channel is ``⟨∂L/∂ω', ω⟩`` (the folded weight's
    gradient against the weight), so γ's gradient comes from the conv's weight gradient."""
    x, w, b, gamma, mean, var = ctx.saved_tensors
    spec = ctx.spec
    tr, groups = spec["transposed"], spec["groups"]
    inv = torch.rsqrt(var + ctx.eps)
    c = inv if gamma is None else gamma * inv
    cv = out_channel_view(c, w, tr, groups)
    wc = (w * cv).to(x.dtype)   # the folded weights, in the precision the conv ran in
    gx, gwf, gbf = _run_backward(gy.to(x.dtype), x, wc, spec, need_x, need_bias=True)
    # In float32 at the least: the γ term below sums ω·∂L/∂ω' with cancellation, and a bf16/fp16
    # weight gradient would carry its rounding into it.
    acc = torch.promote_types(w.dtype, torch.float32)
    gwf, gbf = gwf.to(acc), gbf.to(acc)
    if gx is not None:
        gx = gx.to(ctx.x_dtype)
    centred = -mean if b is None else b - mean
    gc = _per_out_dot(gwf, w.to(acc), tr, groups) + gbf * centred
    gw = gwf.mul_(cv).to(w.dtype)   # gwf is ours (convolution_backward's fresh output, or its cast)
    g_gamma = (gc * inv).to(gamma.dtype) if gamma is not None else None
    g_b = (gbf * c).to(b.dtype) if b is not None else None
    g_beta = gbf if need_beta else None
    return gx, gw, g_b, g_gamma, g_beta, None, None, None, None


class Link:
    """What a Tune conv's forward leaves for its BatchNorm: the output it produced (by identity),
    and whether the BN took that output straight (``paired``)."""

    __slots__ = ("out", "node_id", "paired", "gy")

    def __init__(self) -> None:
        self.out: weakref.ref | None = None
        # id() of the conv output's autograd node (None without autograd). Not the node itself: the
        # node is the autograd context that holds this link, and torch's garbage collector does not
        # traverse a context's attributes, so that cycle would never be freed (a leak of every step's
        # links). While the output lives, its node is referenced (by it, or by the graph after an
        # in-place op), so its id cannot be reused.
        self.node_id: int | None = None
        self.paired = False
        self.gy: torch.Tensor | None = None   # the gradient the BN's backward passed on


class TuneConvOut(torch.autograd.Function):
    """``conv(x)`` as the conv computes it (same value, same autocast dtype), saving its input and
    the original parameters only. If the BatchNorm took this output straight (``link.paired``),
    the gradient that arrives is the BN *output*'s and backward is the folded block's; otherwise it
    is a plain conv's backward."""

    @staticmethod
    def forward(ctx, x, w, b, gamma, beta, mean, var, eps, spec, link):  # type: ignore[override]
        xc, u = _conv_autocast(x, w, b, spec)
        ctx.save_for_backward(xc, w, b, gamma, mean, var)
        ctx.eps, ctx.spec, ctx.x_dtype, ctx.link = eps, spec, x.dtype, link
        return u

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        need_x, need_beta = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        link, gy = ctx.link, ctx.link.gy
        link.gy = None
        if link.paired and gy is not None and g.data_ptr() == gy.data_ptr() and g.shape == gy.shape:
            return (*_folded_backward(ctx, g, need_x, need_beta), None)
        if link.paired:
            # The output also went somewhere besides its BatchNorm (user code called the two
            # modules itself): separate the BN's share of the gradient from the rest.
            return _shared_output_backward(ctx, g, gy)
        return _conv_backward(ctx, g, need_x)


def _conv_backward(ctx: Any, g: torch.Tensor, need_x: bool) -> tuple:
    """A plain conv's backward from the gradient of its output."""
    x, w, b, *_ = ctx.saved_tensors
    spec = ctx.spec
    gx, gw, gb = _run_backward(g.to(x.dtype), x, w.to(x.dtype), spec, need_x, need_bias=b is not None)
    gx = gx.to(ctx.x_dtype) if gx is not None else None
    g_b = gb.to(b.dtype) if b is not None and gb is not None else None
    return gx, gw.to(w.dtype), g_b, None, None, None, None, None, None, None


def _shared_output_backward(ctx: Any, g: torch.Tensor, gy: torch.Tensor | None) -> tuple:
    """The conv output reached its BatchNorm and something else: ``g`` is the BN output's gradient
    ``gy`` plus the other users' share. Rare (it needs user code outside every traced forward), so
    the conv's output is recomputed for γ's gradient."""
    x, w, b, gamma, mean, var = ctx.saved_tensors
    gy = torch.zeros_like(g) if gy is None else gy
    inv = torch.rsqrt(var + ctx.eps)
    c = inv if gamma is None else gamma * inv
    spec = ctx.spec
    shape = [1, -1] + [1] * (g.dim() - 2) if spec["kind"] == "conv" else [-1]
    acc = torch.promote_types(w.dtype, torch.float32)
    gy32 = gy.to(acc)
    with torch.no_grad():
        u = _run(x, w.to(x.dtype), None if b is None else b.to(x.dtype), spec).to(acc)
    dims = [d for d in range(g.dim()) if d != (1 if spec["kind"] == "conv" else g.dim() - 1)]
    g_beta = gy32.sum(dims) if ctx.needs_input_grad[4] else None
    g_gamma = (gy32 * (u - mean.reshape(shape)) * inv.reshape(shape)).sum(dims) if gamma is not None else None
    grad_u = (g.to(acc) - gy32) + gy32 * c.reshape(shape)
    gx, gw, gb, *_ = _conv_backward(ctx, grad_u, ctx.needs_input_grad[0])
    return (gx, gw, gb, None if g_gamma is None else g_gamma.to(gamma.dtype), g_beta,
            None, None, None, None, None)


class TuneBNOut(torch.autograd.Function):
    """The eval-mode BatchNorm of its conv's output, saving nothing: its backward passes the BN
    output's gradient on to the conv's (``TuneConvOut``), which owns γ, β and the fold."""

    @staticmethod
    def forward(ctx, u, link, s):  # type: ignore[override]
        ctx.link, ctx.u_dtype = link, u.dtype
        return F.batch_norm(u, s.mean, s.var, None if s.weight is None else s.weight.detach(),
                            None if s.bias is None else s.bias.detach(), False, 0.0, s.eps)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        gy = gy.to(ctx.u_dtype)    # as autograd would cast it: the conv's backward compares it by storage
        ctx.link.gy = gy
        return gy, None, None


def _run_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, spec: dict, need_x: bool,
                  need_bias: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(∂/∂x, ∂/∂w, ∂/∂b)`` of ``_run(x, w, b, spec)`` from its output's gradient ``g``."""
    if spec["kind"] == "linear":
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        return (g @ w if need_x else None), g2.t() @ x2, (g2.sum(0) if need_bias else None)
    tr, groups = spec["transposed"], spec["groups"]
    gx, gw, gb = torch.ops.aten.convolution_backward(
        g, x, w, [w.shape[1] * groups if tr else w.shape[0]], spec["stride"], spec["padding"],
        spec["dilation"], tr, spec["output_padding"], groups, [need_x, True, need_bias],
    )
    return gx, gw, gb


def _run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, spec: dict) -> torch.Tensor:
    if spec["kind"] == "linear":
        return F.linear(x, w, b)
    return torch.ops.aten.convolution(
        x, w, b, spec["stride"], spec["padding"], spec["dilation"], spec["transposed"],
        spec["output_padding"], spec["groups"],
    )


def _spec(conv: Any) -> dict:
    if isinstance(conv, nn.Linear):
        return {"kind": "linear", "transposed": False, "groups": 1}
    return {
        "kind": "conv", "stride": list(conv.stride), "padding": list(conv.padding),
        "dilation": list(conv.dilation), "transposed": bool(conv.transposed),
        "output_padding": list(conv.output_padding), "groups": conv.groups,
    }


def padded_input(conv: Any, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``(x, spec)`` for ``_run``: a non-zero ``padding_mode`` pads ``x`` here and convolves unpadded."""
    if getattr(conv, "padding_mode", "zeros") == "zeros":
        return x, _spec(conv)
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    return x, dict(_spec(conv), padding=[0] * (conv.weight.dim() - 2))


def folded_forward(x: torch.Tensor, conv: Any, s: BNStats) -> torch.Tensor:
    """conv with BN folded into its weights, inside autograd."""
    if is_plain_conv(conv):
        x, spec = padded_input(conv, x)
        return _TuneConv.apply(x, conv.weight, conv.bias, s.weight, s.bias, s.mean, s.var, s.eps, spec)
    # A conv subclass with its own forward (e.g. timm's Conv2dSame): call it on the folded weights.
    # ω' is then kept by autograd, as in the paper's Tune mode.
    tr, groups = bool(getattr(conv, "transposed", False)), getattr(conv, "groups", 1)
    inv = torch.rsqrt(s.var + s.eps)
    c = inv if s.weight is None else s.weight * inv
    wf = conv.weight * out_channel_view(c, conv.weight, tr, groups)
    bf = -s.mean * c if conv.bias is None else (conv.bias - s.mean) * c
    if s.bias is not None:
        bf = bf + s.bias
    return functional_call(conv, {"weight": wf, "bias": bf}, (x,))


