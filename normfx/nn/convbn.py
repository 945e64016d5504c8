"""Tune-mode ConvBN blocks (You et al., "Efficient ConvBN Blocks for Transfer Learning and Beyond").

A Tune block is the user's own conv and BN objects, left where they were in the module tree, with
their classes swapped for normfx subclasses (``tune(conv, bn)``): ``isinstance``, ``state_dict``
keys, hooks and the parent's forward all stay. The conv (a ``TuneConv``) computes the block; the BN
(a ``TuneBN``) passes the conv's folded output through (applying a norm-act's activation), and runs
as a plain BN on any other input. ``tune_convbn(x, conv, bn)`` is the same block as a function, and
a functional ``F.batch_norm`` after a conv becomes a ``tune_convbn_functional`` graph node.

* While ``bn.training``: ``bn(conv(x))`` — plain Train mode, batch statistics, identical running-stat
  updates.
* Otherwise (Eval BN, or FrozenBatchNorm in either mode): with ``c = γ/sqrt(σ̂² + ε)`` it runs one conv with
  ``ω' = ω·c`` and ``b' = (b − μ̂)·c + β`` built inside autograd, so the gradients for ω, b, γ, β are
  Eval mode's and the BN input is never stored. Unlike the paper's version, ``ω'`` is not stored
  either: backward recomputes it from ω (a few elementwise ops over the weights), so the memory kept
  for backward is the conv input only, as in Deploy mode.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from normfx.functional import BNStats, out_channel_view
from normfx.kinds import bn_kind, is_frozen_bn, is_plain_conv, original_class

__all__ = ["tune_convbn", "tune_convbn_functional", "bn_stats", "TuneConv", "TuneBN", "tune", "untune",
           "tuned_pair"]


def bn_stats(bn: Any) -> BNStats:
    """The eval-mode statistics of a BatchNorm / FrozenBatchNorm module."""
    return BNStats(bn.running_mean, bn.running_var, bn.weight, bn.bias, float(bn.eps))


def _per_out_sum(t: torch.Tensor, transposed: bool, groups: int) -> torch.Tensor:
    """Sum a weight-shaped tensor down to one value per output channel."""
    if not transposed:
        return t.reshape(t.shape[0], -1).sum(1)
    return t.reshape(groups, t.shape[0] // groups, t.shape[1], -1).sum((1, 3)).reshape(-1)


class _TuneConv(torch.autograd.Function):
    """One conv/linear with BN folded into its weights; saves x and the original parameters only."""

    @staticmethod
    def forward(ctx, x, w, b, gamma, beta, mean, var, eps, spec):  # type: ignore[override]
        inv = torch.rsqrt(var + eps)
        c = inv if gamma is None else gamma * inv
        wf = w * out_channel_view(c, w, spec["transposed"], spec["groups"])
        bf = -mean * c if b is None else (b - mean) * c
        if beta is not None:
            bf = bf + beta
        # Under autocast the folded weights are built in their own precision and the conv runs in
        # the autocast dtype, as Eval mode's conv does; backward then uses the same dtypes.
        dev = x.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        if cdt is None:
            xc, y = x, _run(x, wf, bf, spec)
        else:
            xc = x.to(cdt)
            with torch.autocast(dev, enabled=False):
                y = _run(xc, wf.to(cdt), bf.to(cdt), spec)
        ctx.save_for_backward(xc, w, b, gamma, mean, var)
        ctx.eps, ctx.spec, ctx.x_dtype = eps, spec, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, w, b, gamma, mean, var = ctx.saved_tensors
        spec = ctx.spec
        tr, groups = spec["transposed"], spec["groups"]
        inv = torch.rsqrt(var + ctx.eps)
        c = inv if gamma is None else gamma * inv
        cv = out_channel_view(c, w, tr, groups)
        wf = w * cv
        wc = wf.to(x.dtype)   # the weights the forward's conv ran with
        gy = gy.to(x.dtype)
        need_x = ctx.needs_input_grad[0]
        if spec["kind"] == "linear":
            gx = gy @ wc if need_x else None
            g2, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])
            gwf, gbf = g2.t() @ x2, g2.sum(0)
        else:
            gx, gwf, gbf = torch.ops.aten.convolution_backward(
                gy, x, wc, [wc.shape[1] * groups if tr else wc.shape[0]], spec["stride"], spec["padding"],
                spec["dilation"], tr, spec["output_padding"], groups, [need_x, True, True],
            )
        gwf, gbf = gwf.to(w.dtype), gbf.to(w.dtype)
        if gx is not None:
            gx = gx.to(ctx.x_dtype)
        gw = gwf * cv
        centred = -mean if b is None else b - mean
        gc = _per_out_sum(gwf * w, tr, groups) + gbf * centred
        g_gamma = gc * inv if gamma is not None else None
        g_b = gbf * c if b is not None else None
        g_beta = gbf if ctx.needs_input_grad[4] else None
        return gx, gw, g_b, g_gamma, g_beta, None, None, None, None


def _run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, spec: dict) -> torch.Tensor:
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


def _folded_forward(x: torch.Tensor, conv: Any, s: BNStats) -> torch.Tensor:
    """conv with BN folded into its weights, inside autograd."""
    if is_plain_conv(conv):
        if getattr(conv, "padding_mode", "zeros") != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            spec = dict(_spec(conv), padding=[0] * (conv.weight.dim() - 2))
        else:
            spec = _spec(conv)
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
    conv.__dict__["_normfx_bypass"] = True   # a TuneConv's own forward must not fold again
    try:
        return functional_call(conv, {"weight": wf, "bias": bf}, (x,))
    finally:
        conv.__dict__.pop("_normfx_bypass", None)


def _bn_tail(bn: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if bn_kind(bn) == "norm_act":
        return bn.act(bn.drop(y))
    return y


def _folds(conv: nn.Module, bn: nn.Module, x: torch.Tensor) -> bool:
    """Whether the block computes the folded conv for this call (else plain ``bn(conv(x))``)."""
    linear_not_2d = isinstance(conv, nn.Linear) and x.dim() != 2
    # FrozenBatchNorm has no training behaviour: it folds in model.train() too.
    batch_stats = getattr(bn, "training", False) and not is_frozen_bn(bn)
    return not (batch_stats or bn.running_mean is None or linear_not_2d)


def tune_convbn(x: torch.Tensor, conv: nn.Module, bn: nn.Module) -> torch.Tensor:
    """``bn(conv(x))`` as a Tune-mode block: Train mode while ``bn.training``, else one folded conv.

    Example:
        >>> conv, bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8).eval()
        >>> y = tune_convbn(torch.randn(2, 3, 8, 8), conv, bn)  # == bn(conv(x)), Eval gradients
    """
    if not _folds(conv, bn, x):
        return bn(conv(x))
    return _bn_tail(bn, _folded_forward(x, conv, bn_stats(bn)))


class _Swapped(nn.Module):
    """What the Tune subclasses share: pickling and deep copies rebuild the subclass from the
    module's own class (the subclass is made at run time, so it cannot be found by name)."""

    _normfx_base: Any
    _normfx_mixin: type

    def __reduce_ex__(self, protocol):  # type: ignore[override]
        return _rebuild, (self._normfx_base, self._normfx_mixin), self.__dict__


class TuneConv(_Swapped):
    """Mixin of a Tune block's conv (``tune(conv, bn)`` puts it in the conv's class): while its BN
    folds (eval mode, or FrozenBatchNorm) the conv computes ``BN(conv(x))`` as one conv on folded
    weights built inside autograd, and hands the output to its BN to pass through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        bn = self.__dict__.get("_normfx_bn")
        if bn is None or self.__dict__.get("_normfx_bypass") or not _folds(self, bn, x):
            return self._normfx_base.forward(self, x)
        y = _folded_forward(x, self, bn_stats(bn))
        bn.__dict__["_normfx_folded"] = weakref.ref(y)
        return y


class TuneBN(_Swapped):
    """Mixin of a Tune block's BatchNorm: the output its conv folded passes through (a norm-act
    layer's activation still runs); any other input is normalized as the BatchNorm always did."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ref = self.__dict__.pop("_normfx_folded", None)
        if ref is not None and ref() is x:
            return _bn_tail(self, x)
        return self._normfx_base.forward(self, x)


_CLASSES: dict[tuple[type, type], type] = {}


def _tuned_class(base: type, mixin: type) -> type:
    """``mixin`` over ``base`` (one class per pair, so ``isinstance`` and ``type(m).__name__`` read
    ``TuneConv2d``, ``TuneBatchNorm2d``)."""
    key = (base, mixin)
    if key not in _CLASSES:
        name = "Tune" + base.__name__
        namespace = {"_normfx_base": base, "_normfx_mixin": mixin, "__module__": __name__}
        _CLASSES[key] = type(name, (mixin, base), namespace)
    return _CLASSES[key]


def _rebuild(base: Any, mixin: type) -> nn.Module:
    """Unpickle/deep-copy target of a Tune module: the state is set on it afterwards."""
    obj = base.__new__(base)
    obj.__class__ = _tuned_class(base, mixin)
    return obj


def tune(conv: nn.Module, bn: nn.Module) -> None:
    """Make ``conv`` → ``bn`` a Tune block in place: their classes become ``TuneConv``/``TuneBN``
    subclasses of their own; nothing else about them changes (parameters, keys, hooks, slot).

    The caller has checked that ``conv``'s output feeds ``bn`` alone and that each is used once.
    """
    conv.__class__ = _tuned_class(original_class(conv), TuneConv)
    conv.__dict__["_normfx_bn"] = bn   # a plain reference: not a child, so no new state_dict key
    bn.__class__ = _tuned_class(original_class(bn), TuneBN)


def untune(conv: nn.Module, bn: nn.Module) -> None:
    """Give a Tune block's conv and BN their own classes back (Deploy folds them next)."""
    conv.__class__ = original_class(conv)
    conv.__dict__.pop("_normfx_bn", None)
    bn.__class__ = original_class(bn)
    bn.__dict__.pop("_normfx_folded", None)


def tuned_pair(conv: nn.Module | None) -> nn.Module | None:
    """The BN of a Tune block's conv (None for any other module)."""
    return conv.__dict__.get("_normfx_bn") if isinstance(conv, TuneConv) else None


def tune_convbn_functional(
    x: torch.Tensor, conv: nn.Module, mean: torch.Tensor, var: torch.Tensor,
    weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    """Tune block for a functional ``F.batch_norm(conv(x), mean, var, weight, bias, False, _, eps)``."""
    if isinstance(conv, nn.Linear) and x.dim() != 2:
        return F.batch_norm(conv(x), mean, var, weight, bias, False, 0.0, eps)
    return _folded_forward(x, conv, BNStats(mean, var, weight, bias, float(eps)))
