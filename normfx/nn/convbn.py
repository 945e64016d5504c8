"""Tune-mode ConvBN blocks (You et al., "Efficient ConvBN Blocks for Transfer Learning and Beyond").

A Tune block is the user's own conv and BN objects, left where they were in the module tree, with
their classes swapped for normfx subclasses (``tune(conv, bn)``): ``isinstance``, ``state_dict``
keys, hooks and the parent's forward all stay. The conv (a ``TuneConv``) returns ``conv(x)``, the
value it always returned, and leaves its BN (a ``TuneBN``) a link to that output; the BN pairs with
it only when it receives that very tensor from the conv's autograd node and no hook can see the
difference (``observed``), and runs as a plain BN on any other input. ``tune_convbn(x, conv, bn)``
is the block as a function, and a functional ``F.batch_norm`` after a conv becomes a
``tune_convbn_functional`` graph node (one conv on folded weights: nothing can sit between).

* While ``bn.training``: ``bn(conv(x))`` — plain Train mode, batch statistics, identical running-stat
  updates.
* Otherwise (Eval BN, or FrozenBatchNorm in either mode), paired: the forward is Eval mode's (the
  conv on ω, then the BN's affine), but neither saves the conv output. With ``c = γ/sqrt(σ̂² + ε)``
  the BN's backward hands the gradient of its output to the conv's, which builds ``ω' = ω·c`` and
  runs one conv backward with it; γ's gradient comes from the weight gradient
  (``Σ gy·conv(x) = ⟨∂L/∂ω', ω⟩`` per channel). Gradients for ω, b, γ, β are Eval mode's and the
  memory kept for backward is the conv input only, as in Deploy mode; unlike the paper's version,
  ``ω'`` is not stored either. ``tune_path(bn)`` says how a block ran.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from normfx.functional import BNStats
from normfx.kinds import bn_kind, hooks_on, is_frozen_bn, is_plain_conv, original_class
from normfx.nn.sync_bn import sync, synced_by_normfx
from normfx.nn.convbn_autograd import Link, TuneBNOut, TuneConvOut, folded_forward, padded_input

__all__ = ["tune_convbn", "tune_convbn_functional", "bn_stats", "TuneConv", "TuneBN", "tune", "untune",
           "tuned_pair", "tune_path", "observed"]


def bn_stats(bn: Any) -> BNStats:
    """The eval-mode statistics of a BatchNorm / FrozenBatchNorm module."""
    return BNStats(bn.running_mean, bn.running_var, bn.weight, bn.bias, float(bn.eps))


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
    # Hooks on either (or global ones): a graph node standing for their calls would skip them.
    if not _folds(conv, bn, x) or hooks_on(conv) or hooks_on(bn):
        return bn(conv(x))
    return _bn_tail(bn, folded_forward(x, conv, bn_stats(bn)))


class _Swapped(nn.Module):
    """What the subclasses normfx puts a module's class in share (Tune blocks, exact fixed-point
    sums): pickling and deep copies rebuild the subclass from the module's own class (the subclass
    is made at run time, so it cannot be found by name). ``_normfx_prefix`` goes before the base
    class's name (``TuneConv2d``; ``""`` keeps the name)."""

    _normfx_base: Any
    _normfx_mixin: type
    _normfx_prefix: str = "Tune"

    def __reduce_ex__(self, protocol):  # type: ignore[override]
        state = {k: v for k, v in self.__dict__.items() if k not in ("_normfx_link", "_normfx_path")}
        return _rebuild, (self._normfx_base, self._normfx_mixin), state


class TuneConv(_Swapped):
    """Mixin of a Tune block's conv (``tune(conv, bn)`` puts it in the conv's class). It returns
    ``conv(x)``, the value the conv always returned, saving its input only. While its BN folds (eval
    mode, or FrozenBatchNorm) and no hook can observe the conv's output or gradient, it leaves its
    BN a link to that output: a BN that receives exactly it applies its affine without saving
    anything, and backward is the folded block's (Eval mode's gradients, Deploy mode's memory).
    Anything else between them (a forward hook that returns a tensor, a wrapper, checkpointing)
    and the BN runs as the BatchNorm it is: exact, with Eval mode's memory."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if torch.compiler.is_compiling():
            # Compiled (torch.compile, torch.export): plain conv -> BN, Eval mode's exact computation.
            # The link to the BN is Python state a graph cannot carry (dynamo breaks the graph at it);
            # inductor's efficient_conv_bn_eval pass is the compiled counterpart of the fused path.
            return self._normfx_base.forward(self, x)
        bn = self.__dict__.get("_normfx_bn")
        if bn is None or not _folds(self, bn, x):
            return self._normfx_base.forward(self, x)
        why = observed(self, bn) or ("" if is_plain_conv(self) else
                                     f"{self._normfx_base.__name__} has its own forward: the BatchNorm runs as is")
        if why:
            bn.__dict__["_normfx_path"] = why
            return self._normfx_base.forward(self, x)
        x, spec = padded_input(self, x)
        s = bn_stats(bn)
        link = Link()
        u = TuneConvOut.apply(x, self.weight, self.bias, s.weight, s.bias, s.mean, s.var, s.eps, spec, link)
        link.out, link.node_id = weakref.ref(u), None if u.grad_fn is None else id(u.grad_fn)
        bn.__dict__["_normfx_link"] = link
        return u


class TuneBN(_Swapped):
    """Mixin of a Tune block's BatchNorm: the output its conv left a link to is normalized without
    saving it (a norm-act layer's activation still runs); any other input is normalized as the
    BatchNorm always did."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if torch.compiler.is_compiling():
            return self._normfx_base.forward(self, x)     # its conv ran plain too (TuneConv.forward)
        link = self.__dict__.pop("_normfx_link", None)
        # The very tensor its conv returned, from the conv's own autograd node (a reentrant
        # checkpoint runs the conv without autograd and recomputes it in backward: no pairing).
        if (link is not None and link.out is not None and link.out() is x
                and ((x.grad_fn is not None and id(x.grad_fn) == link.node_id) or not torch.is_grad_enabled())):
            link.paired = True
            self.__dict__["_normfx_path"] = "fused"
            return _bn_tail(self, TuneBNOut.apply(x, link, bn_stats(self)))
        if link is not None:
            self.__dict__["_normfx_path"] = ("its input is not its conv's output (something between them: a forward "
                                             "hook returning a tensor, a wrapper, checkpointing)")
        return self._normfx_base.forward(self, x)


def observed(conv: nn.Module, bn: nn.Module) -> str:
    """Why user code could see the conv's output or gradient, or the BN's gradient, differently on
    the fused Tune path (forward/backward hooks on the conv, backward hooks on the BatchNorm, their
    global counterparts): the reason, or ``""`` when nothing observes them."""
    on_conv = hooks_on(conv, ("forward", "backward", "backward_pre"))
    if on_conv:
        return f"the conv has {on_conv}"
    on_bn = hooks_on(bn, ("backward", "backward_pre"))
    return f"the BatchNorm has {on_bn}" if on_bn else ""


def tune_path(bn: nn.Module) -> str | None:
    """How a Tune block's BatchNorm ran in its last forward: ``"fused"`` (Eval gradients, Deploy
    memory), the reason it ran as a plain BatchNorm instead (still exact), or ``None`` (not a Tune
    BatchNorm, or it has not run in eval mode yet)."""
    return bn.__dict__.get("_normfx_path") if isinstance(bn, TuneBN) else None


_CLASSES: dict[tuple[type, type], type] = {}


def _tuned_class(base: type, mixin: type[_Swapped]) -> type:
    """``mixin`` over ``base`` (one class per pair, so ``isinstance`` and ``type(m).__name__`` read
    ``TuneConv2d``, ``TuneBatchNorm2d``: the mixin's ``_normfx_prefix`` and the base's name)."""
    key = (base, mixin)
    if key not in _CLASSES:
        name = mixin._normfx_prefix + base.__name__
        namespace = {"_normfx_base": base, "_normfx_mixin": mixin, "__module__": __name__}
        _CLASSES[key] = type(name, (mixin, base), namespace)
    return _CLASSES[key]


def _rebuild(base: Any, mixin: type) -> nn.Module:
    """Unpickle/deep-copy target of a swapped module: the state is set on it afterwards."""
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
    if synced_by_normfx(bn):      # normfx.sync_bn came first: the Tune BatchNorm keeps synchronizing
        sync(bn, bn.__dict__["_normfx_group"])


def untune(conv: nn.Module, bn: nn.Module) -> None:
    """Give a Tune block's conv and BN their own classes back (Deploy folds them next)."""
    conv.__class__ = original_class(conv)
    conv.__dict__.pop("_normfx_bn", None)
    bn.__class__ = original_class(bn)
    if synced_by_normfx(bn):
        sync(bn, bn.__dict__["_normfx_group"])
    bn.__dict__.pop("_normfx_link", None)
    bn.__dict__.pop("_normfx_path", None)


def tuned_pair(conv: nn.Module | None) -> nn.Module | None:
    """The BN of a Tune block's conv (None for any other module)."""
    return conv.__dict__.get("_normfx_bn") if isinstance(conv, TuneConv) else None


def tune_convbn_functional(
    x: torch.Tensor, conv: nn.Module, mean: torch.Tensor, var: torch.Tensor,
    weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    """Tune block for a functional ``F.batch_norm(conv(x), mean, var, weight, bias, False, _, eps)``."""
    if isinstance(conv, nn.Linear) and x.dim() != 2 or hooks_on(conv):
        return F.batch_norm(conv(x), mean, var, weight, bias, False, 0.0, eps)
    return folded_forward(x, conv, BNStats(mean, var, weight, bias, float(eps)))
