"""Replaces ``ProgressiveRepBN`` (λ = 0) with its eval-mode affine, folded into a neighbouring Linear/Conv.

Math (exact): in eval mode ``RepBN(x) = a·x + b`` per channel, ``a = γ/sqrt(σ² + ε) + η``,
``b = β − γ·μ/sqrt(σ² + ε)``. Into the Linear that consumes it: ``W' = W·diag(a)``, ``c' = W·b + c``
(also through ops that keep the channel axis: dropout, ``x[:, 0]`` token selection, token mean-pool,
``contiguous``; and into ``nn.MultiheadAttention``'s packed in-projection for self-attention). Into
the Linear/Conv that produces it: ``W' = diag(a)·W``, ``c' = a·c + b`` — including the ``a·c`` term
that SLAB's own ``merge_bn`` drops for a preceding conv's bias. Into a following conv that does not
zero-pad, channels-first. What cannot fold stays as one multiply-add (``ChannelAffine``), reported.
"""
from __future__ import annotations

import operator
from typing import cast

import torch
import torch.fx as fx
import torch.nn as nn

from normfx.functional import fold_bn_after, fold_bn_before
from normfx.kinds import hooks_on
from normfx.match import module_uses, set_module, set_param
from normfx.nn.repbn import ChannelAffine, ProgressiveRepBN
from normfx.errors import RepBNNotFinishedError, TrainingModeError
from normfx.report import Change, PassResult, Skip, SkipReason
from normfx.scope import EVERYWHERE, Scope
from normfx.analysis import Outside

__all__ = ["fold_repbn", "fold_repbn_outside", "RepBNNotFinishedError"]


_DROPOUTS = (nn.Dropout, nn.Identity)


def fold_repbn(gm: fx.GraphModule, scope: Scope = EVERYWHERE) -> PassResult:
    """Replaces every ``ProgressiveRepBN`` (λ = 0) with its affine, folded into a neighbour if possible.

    Raises:
        RepBNNotFinishedError: a ProgressiveRepBN has λ > 0 (the message says how many steps remain).
        TrainingModeError: a ProgressiveRepBN is in training mode.
    """
    mods = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods.get(n.target), ProgressiveRepBN)]
    excluded = {n: scope.skip(str(n.target), (str(n.target), mods[n.target])) for n in nodes}
    for n in nodes:
        if excluded[n] is None:
            _check_finished(str(n.target), mods[n.target])
    uses = module_uses(gm)
    changes: list[Change] = []
    skips: list[Skip] = []
    for n in nodes:
        skip = excluded[n]
        if skip is not None:
            skips.append(skip)
            continue
        hooked = hooks_on(mods[n.target])
        if hooked:
            # Replacing it would stop its hooks: it stays, computing the same affine at λ = 0.
            skips.append(Skip(str(n.target), SkipReason.HOOKED, f"'{n.target}' has {hooked}: kept as it is"))
            continue
        changes.append(_fold_one(gm, mods, uses, n, scope))
    return PassResult("fold_repbn", tuple(changes), tuple(skips))


def _check_finished(site: str, m: ProgressiveRepBN) -> None:
    lam = float(m.lam)
    if lam > 0:
        left = round(lam * m.total_steps)
        raise RepBNNotFinishedError(
            f"ProgressiveRepBN '{site}' has λ = {lam:.4g}: about {left} of {m.total_steps} scheduler "
            "steps remain. Train until RepBNScheduler reaches λ = 0 before deploy"
        )
    if m.training:
        raise TrainingModeError(f"ProgressiveRepBN '{site}' is in training mode; call model.eval() before deploy")


def fold_repbn_outside(model: nn.Module, outside: list[Outside], scope: Scope = EVERYWHERE) -> PassResult:
    """A ProgressiveRepBN no traced region calls cannot fold into a neighbour (only a graph shows
    which Linear it feeds): it becomes its per-channel affine in its slot, one multiply-add, and
    the report says why it was not folded."""
    found = [(o.qualname, o.module, o.why) for o in outside if isinstance(o.module, ProgressiveRepBN)]
    skips = [sk for site, m, _ in found if (sk := scope.skip(site, (site, m))) is not None]
    found = [f for f in found if f[0] not in {sk.site for sk in skips}]
    for site, m, _ in found:
        _check_finished(site, m)
    changes = []
    for site, m, why in found:
        set_module(model, site, _affine_of(m))
        changes.append(Change(site, "affine", f"kept as one multiply-add, not folded (untraceable: {why})"))
    return PassResult("fold_repbn", tuple(changes), tuple(skips))


def _affine_of(m: ProgressiveRepBN) -> ChannelAffine:
    rep = m.repbn
    a, b = rep.affine()
    ref = next(iter(rep.parameters()))
    affine = ChannelAffine(a.to(ref.dtype), b.to(ref.dtype), channels_last=rep.channels_last)
    affine.train(m.training)  # a new module must not come back in training mode
    return affine


def _fold_one(gm: fx.GraphModule, mods: dict, uses, node: fx.Node, scope: Scope) -> Change:
    rep = mods[node.target].repbn
    a, b = rep.affine()
    site = str(node.target)
    x = node.args[0]
    producer = _producer(gm, mods, uses, x, rep.channels_last) if isinstance(x, fx.Node) else None
    if producer is not None and (hooks_on(producer, ("forward", "backward", "backward_pre"))
                                 or scope.skip(site, (_names(mods, [producer])[0], producer))):
        producer = None   # its hooks would see the folded output, or the caller excluded it
    if producer is not None and _fold_into_producer(producer, a, b):
        # A leaf change: the parent's forward is untouched.
        set_module(gm, site, nn.Identity().train(mods[node.target].training))
        return Change(site, "fold", f"into preceding '{_names(mods, [producer])[0]}'")
    targets = _consumers(gm, mods, uses, node, rep.channels_last)
    if targets is not None and any(hooks_on(t, ("forward_pre", "backward", "backward_pre"))
                                   or scope.skip(site, (name, t)) for t, name in zip(targets, _names(mods, targets))):
        targets = None   # their hooks would see the unnormalized input, or the caller excluded one
    if targets is not None:
        for target in targets:
            _fold_into_consumer(target, a, b)
        set_module(gm, site, nn.Identity().train(mods[node.target].training))
        return Change(site, "fold", "into following " + ", ".join(f"'{t}'" for t in _names(mods, targets)))
    set_module(gm, site, _affine_of(mods[node.target]))
    return Change(site, "affine", "no Linear/Conv to fold into: kept as one multiply-add")


def _names(mods: dict, targets: list[nn.Module]) -> list[str]:
    inv = {id(m): k for k, m in mods.items()}
    return [inv.get(id(t), type(t).__name__) for t in targets]


def _fold_into_producer(m: nn.Module, a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a·(Wx + c) + b`` -> ``(diag(a)W)x + (a·c + b)``, for a Linear or a (non-transposed) conv."""
    out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
    if out != a.numel():
        return False
    w = cast(torch.Tensor, m.weight)
    bias = cast("torch.Tensor | None", m.bias)
    _assign(m, "weight", "bias", *fold_bn_after(w, bias, None, scale_shift=(a, b)))
    return True


def _consumers(gm, mods, uses, node: fx.Node, channels_last: bool) -> list[nn.Module] | None:
    """The Linears (or MHA / conv) that every path from ``node`` reaches through channel-keeping ops.

    ``channels_last`` says where the channel axis is on the current path; ``Flatten(start_dim=1)``
    of a channels-first tensor moves it last (and a Linear with ``in_features == C`` after it proves
    the spatial size was 1).
    """
    channels = mods[node.target].repbn.bn.num_features
    found: list[nn.Module] = []
    frontier = [(node, channels_last)]
    while frontier:
        cur, last = frontier.pop()
        for user in cur.users:
            m = mods.get(user.target) if user.op == "call_module" else None
            if _reads_shape_only(user):
                continue  # x.shape / x.size(): the same for the folded input
            if isinstance(m, _DROPOUTS) and uses[id(m)] == 1:
                frontier.append((user, last))
            elif isinstance(m, nn.Linear) and last and uses[id(m)] == 1 and user.args[0] is cur \
                    and m.in_features == channels:
                found.append(m)
            elif isinstance(m, nn.MultiheadAttention) and last and uses[id(m)] == 1 \
                    and _self_attention(user, cur) and m._qkv_same_embed_dim and m.in_proj_weight is not None:
                found.append(m)
            elif not last and isinstance(m, nn.modules.conv._ConvNd) and uses[id(m)] == 1 \
                    and not m.transposed and _no_zero_pad(m) and user.args[0] is cur:
                found.append(m)
            elif not last and _flattens_from_1(user, m):
                frontier.append((user, True))
            elif last and _keeps_channels(user, cur):
                frontier.append((user, last))
            else:
                return None
    return found or None


def _flattens_from_1(user: fx.Node, m: nn.Module | None) -> bool:
    if isinstance(m, nn.Flatten):
        return m.start_dim == 1 and m.end_dim == -1
    if user.op == "call_function" and user.target is torch.flatten:
        return bool((user.args[1] if len(user.args) > 1 else user.kwargs.get("start_dim", 0)) == 1)
    return False


def _producer(gm, mods, uses, x: fx.Node, channels_last: bool) -> nn.Module | None:
    """The Linear/Conv whose output channels are the affine's channels, walking back through
    ``permute``/``transpose``/``flatten``/``contiguous`` nodes that only feed this path."""
    axis: int | str = "last" if channels_last else 1
    while True:
        if len(x.users) != 1:
            return None
        m = mods.get(x.target) if x.op == "call_module" else None
        if m is not None:
            if uses[id(m)] != 1 or len(x.args) != 1 or x.kwargs:
                return None
            if isinstance(m, nn.Linear) and axis == "last":
                return m
            if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and axis == 1:
                return m
            return None
        if x.op != "call_method" and not (x.op == "call_function" and x.target in (torch.permute, torch.transpose,
                                                                                   torch.flatten)):
            return None
        name = x.target if isinstance(x.target, str) else x.target.__name__
        args = list(x.args[1:])
        if name == "contiguous":
            pass
        elif name == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            if not all(isinstance(d, int) for d in dims):
                return None
            pos = len(dims) - 1 if axis == "last" else axis
            src = dims[pos]
            axis = "last" if src in (-1, len(dims) - 1) else src  # type: ignore[assignment]
        elif name == "transpose" and len(args) == 2 and all(isinstance(d, int) for d in args):
            i, j = args
            here = -1 if axis == "last" else axis
            if here in (i, j):
                other = j if here == i else i
                axis = "last" if other == -1 else other  # type: ignore[assignment]
            elif axis == "last":
                return None  # a transpose with positive dims hides whether "last" moved
        elif name == "flatten" and axis == 1 and args and isinstance(args[0], int) and args[0] >= 2:
            pass
        else:
            return None
        if not isinstance(x.args[0], fx.Node):
            return None
        x = x.args[0]


def _self_attention(user: fx.Node, cur: fx.Node) -> bool:
    q = user.args[0] if user.args else user.kwargs.get("query")
    k = user.args[1] if len(user.args) > 1 else user.kwargs.get("key")
    v = user.args[2] if len(user.args) > 2 else user.kwargs.get("value")
    return q is cur and k is cur and v is cur


def _no_zero_pad(m: nn.Module) -> bool:
    pad = m.padding if not isinstance(m.padding, str) else ((1,) if m.padding == "same" else (0,))
    return m.padding_mode != "zeros" or all(p == 0 for p in pad)


def _reads_shape_only(user: fx.Node) -> bool:
    if user.op == "call_function" and user.target is getattr:
        return user.args[1] in ("shape", "dtype", "device", "ndim")
    return user.op == "call_method" and user.target in ("size", "dim")


def _keeps_channels(user: fx.Node, cur: fx.Node) -> bool:
    """Ops on ``[B, N, C]`` tokens that keep C last and commute with a per-channel affine."""
    if user.op == "call_method" and user.target == "contiguous":
        return True
    if user.op in ("call_function", "call_method") and user.target in (operator.getitem, "__getitem__"):
        idx = user.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        return user.args[0] is cur and len(idx) <= 2 and all(isinstance(i, (int, slice)) for i in idx)
    if (user.op == "call_method" and user.target == "mean") or (
            user.op == "call_function" and user.target is torch.mean):
        dims = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        return user.args[0] is cur and all(isinstance(d, int) and d in (0, 1) for d in dims)
    return False


def _fold_into_consumer(m: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """``W(a·x + b) + c`` -> ``(W·diag(a))x + (W·b + c)`` (MHA: its packed in-projection)."""
    names = ("in_proj_weight", "in_proj_bias") if isinstance(m, nn.MultiheadAttention) else ("weight", "bias")
    w, c = (getattr(m, n) for n in names)
    _assign(m, *names, *fold_bn_before(w, c, None, groups=getattr(m, "groups", 1), scale_shift=(a, b)))


def _assign(m: nn.Module, wname: str, bname: str, w: torch.Tensor, b: torch.Tensor) -> None:
    old_b = getattr(m, bname)
    grad = getattr(m, wname).requires_grad
    set_param(m, wname, w, requires_grad=grad)
    set_param(m, bname, b, requires_grad=grad or (old_b is not None and old_b.requires_grad))
