"""Structural re-parameterization from the graph (Deploy): parallel linear branches on one input that
are summed become one convolution.

RepVGG, MobileOne, ACNet and their kin train ``BN(conv_k×k(x)) + BN(conv_1×1(x)) + BN(x)`` and ship a
``reparameterize()`` of their own to deploy it as one conv. After ``fold_convbn`` each branch is a
conv with a bias, or a BatchNorm of ``x`` itself (the identity branch), or ``x``; this pass finds
every sum whose terms are all such branches of the same input node — through ``nn.Identity`` calls
(a folded BatchNorm's slot, a ``drop_path`` at rate 0), nested adds, differences and per-channel
constant scales (FastViT's ``x + γ·(mixer(x) − norm(x))``) — and merges them into the branch with
the largest kernel, each branch times its sign and scale:

* a smaller kernel is zero-padded to the large one, centred (``(K − k)/2`` on each side of every
  spatial axis, which its padding must match: ``p_K − p_k = (K − k)/2``);
* an identity branch is the kernel with one 1 at the padding offset (``W[o, o mod C/g, p]``, grouped
  convs included) and, through a BatchNorm, that 1 scaled by ``γ/√(σ² + ε)`` with bias
  ``β − μ·γ/√(σ² + ε)``;
* weights and biases add (in float64, cast back), so the merged conv computes the sum exactly up
  to float rounding.

Conditions (each failure is reported with its reason on a sum that has branches of one input): one
conv type, stride, dilation, groups and channel count across the convs, zero padding, and for an
identity branch stride 1 and ``2·p = K − 1``; every branch module called once in the graph, its
output used by the sum alone, no hooks, inside the caller's scope, not cast to fixed point. The
merged convs' other branches leave their slots (``nn.Identity``), so the state_dict loses their keys.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from normfx.analysis import Outside
from normfx.kinds import bn_kind, fold_refusal, hooks_on
from normfx.match import called_modules, get_attr, inside_called_module, module_uses, set_module, set_param
from normfx.report import Change, PassResult, Skip, SkipReason
from normfx.scope import EVERYWHERE, Scope

__all__ = ["merge_branches", "merge_branches_outside"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ADDS = (operator.add, operator.iadd, torch.add)
_NO = SkipReason.UNSUPPORTED


@dataclass
class _Term:
    """One summed branch: ``kind`` ``conv`` (a conv of ``input``), ``bn`` (a BatchNorm of ``input``)
    or ``id`` (``input`` itself); ``nodes`` are the graph nodes only this branch uses."""

    kind: str
    input: fx.Node
    name: str = ""
    module: Any = None
    nodes: tuple[fx.Node, ...] = ()
    factor: Any = 1.0
    """What the branch is multiplied by in the sum: 1, a constant, or a layer scale's per-channel
    ``γ`` (float64); ``sign`` -1 for a subtracted branch."""
    sign: float = 1.0


def _is_add(node: fx.Node) -> bool:
    """Whether ``node`` is a sum (``a + b``, ``a += b``, ``torch.add(a, b)``; a literal 0 operand, as
    in ``out = 0`` then ``out += branch(x)``, drops out) or a difference (``a - b``): a block's top."""
    return _linear(node, None) is not None


_SUBS = (operator.sub, operator.isub, torch.sub)
_MULS = (operator.mul, operator.imul, torch.mul, "mul", "mul_")


def _linear(node: fx.Node, const: Any) -> list[tuple[fx.Node, Any]] | None:
    """``[(operand, factor)]`` when ``node`` is a sum, a difference, or a product with a constant
    per-channel tensor (FastViT's layer scale ``y * γ``, γ of shape ``[C, 1, 1]``: ``const`` reads it;
    ``None``: products are not asked for), else ``None``."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if node.op == "call_function" and node.target in _ADDS + _SUBS:
        if not all(isinstance(v, fx.Node) or (type(v) in (int, float) and v == 0) for v in (a, b)):
            return None
        sign = -1.0 if node.target in _SUBS else 1.0
        out = [(v, f) for v, f in ((a, 1.0), (b, sign)) if isinstance(v, fx.Node)]
        return out or None
    if const is None or node.target not in _MULS or node.op not in ("call_function", "call_method"):
        return None
    for y, c in ((a, b), (b, a)):
        if isinstance(y, fx.Node) and isinstance(c, fx.Node) and c.op == "get_attr":
            value = const(c)
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[1:].numel() == 1:
                return [(y, value.detach().double())]   # its shape is checked against the conv's (_problem)
        if isinstance(y, fx.Node) and isinstance(c, (int, float)) and node.op == "call_function":
            return [(y, float(c))]
    return None


def _terms(node: fx.Node, mods: dict[str, nn.Module], const: Any = None, chain: tuple[fx.Node, ...] = (),
           factor: Any = 1.0, sign: float = 1.0) -> list[_Term]:
    """The branches summed into ``node``: through adds, differences, per-channel constant scales
    and ``nn.Identity`` calls whose output only the sum uses, down to a conv, a BatchNorm or the
    shared input; each with the factor it is summed with."""
    m = mods.get(node.target) if node.op == "call_module" and isinstance(node.target, str) else None
    private = len(node.users) == 1
    operands = _linear(node, const if chain else None)
    if operands is not None and (private or not chain):
        return [t for a, f in operands for t in _terms(a, mods, const, (*chain, node), *_times(factor, sign, f))]
    if chain and private and isinstance(m, nn.Identity) and len(node.args) == 1 and not node.kwargs:
        return _terms(node.args[0], mods, const, (*chain, node), factor, sign)  # type: ignore[arg-type]
    single = len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node)
    kind = "conv" if isinstance(m, _CONVS) else "bn" if m is not None and bn_kind(m) in ("plain", "norm_act") else ""
    if chain and private and single and kind:
        source, through = _through_identities(node.args[0], mods)  # type: ignore[arg-type]
        return [_Term(kind, source, str(node.target), m, (*chain, node, *through), factor, sign)]
    return [_Term("id", node, nodes=chain, factor=factor, sign=sign)]


def _times(factor: Any, sign: float, f: Any) -> tuple[Any, float]:
    """``(factor, sign)`` times an operand's ``f``: a difference's ±1 goes to the sign."""
    if isinstance(f, float) and abs(f) == 1.0:
        return factor, sign * f
    return factor * f, sign


def _through_identities(node: fx.Node, mods: dict[str, nn.Module]) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """The value an ``nn.Identity`` chain passes on (RepGhost's ``bn(nn.Identity()(x))``: the BN's
    input is ``x``), and the private Identity calls on the way."""
    through: tuple[fx.Node, ...] = ()
    while (node.op == "call_module" and isinstance(mods.get(str(node.target)), nn.Identity) and len(node.users) == 1
           and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node)):
        through += (node,)
        node = node.args[0]
    return node, through


def _describe(t: _Term, first: bool) -> str:
    """``+ conv``, ``- bn``, ``+ scaled bn`` (a layer scale's per-channel factor)."""
    f = t.factor
    name = ("scaled " if isinstance(f, torch.Tensor) or f != 1 else "") + (t.name or "identity")
    return ("- " if t.sign < 0 else "" if first else "+ ") + name


def _problem(terms: list[_Term], uses: Any, called: frozenset[str]) -> tuple[SkipReason, str] | None:
    """Why these branches cannot merge into one conv (``None`` when they can)."""
    for t in terms:
        holder = inside_called_module(called, t.name) if t.module is not None else ""
        if holder:
            return SkipReason.SHARED_MODULE, f"'{t.name}' is also called inside '{holder}' (a forward no graph shows)"
    convs = [t.module for t in terms if t.kind == "conv"]
    first = convs[0]
    for c in convs:
        if type(c) is not type(first):
            return _NO, f"convs of different kinds ({type(first).__name__}, {type(c).__name__})"
        for attr in ("stride", "dilation", "groups", "in_channels", "out_channels"):
            if getattr(c, attr) != getattr(first, attr):
                return _NO, f"the convs' {attr} differ ({getattr(first, attr)} and {getattr(c, attr)})"
        if c.padding_mode != "zeros" or isinstance(c.padding, str):
            return _NO, "a conv pads otherwise than with explicit zeros"
        if any(d != 1 for d in c.dilation):
            return _NO, "dilated convs"
        if c.weight.dtype != first.weight.dtype or c.weight.device != first.weight.device:
            return _NO, "the convs' weights differ in dtype or device"
    big = max(convs, key=lambda c: c.weight[0, 0].numel())
    for c in convs:
        for k, kb, p, pb in zip(c.kernel_size, big.kernel_size, c.padding, big.padding):
            if k > kb or (kb - k) % 2 or pb - p != (kb - k) // 2:
                return _NO, f"kernels {tuple(c.kernel_size)} and {tuple(big.kernel_size)} are not centred alike"
    for t in terms:
        f = t.factor
        if isinstance(f, torch.Tensor) and f.numel() > 1 and (
                f.dim() != big.weight.dim() - 1 or f.shape[0] != big.out_channels):
            return _NO, f"a branch is scaled by a tensor of shape {list(f.shape)}, not one per output channel"
        if t.kind == "conv" and uses[id(t.module)] > 1:
            return SkipReason.SHARED_MODULE, f"'{t.name}' is called at several places"
        if t.kind == "bn":
            if uses[id(t.module)] > 1:
                return SkipReason.SHARED_MODULE, f"'{t.name}' is called at several places"
            if t.module.training or t.module.running_mean is None:
                return _NO, f"'{t.name}' normalizes with batch statistics"
            if bn_kind(t.module) == "norm_act" and not (isinstance(t.module.act, nn.Identity)
                                                          and isinstance(t.module.drop, nn.Identity)):
                return _NO, f"'{t.name}' applies an activation"
            if t.module.running_mean.numel() != big.out_channels:
                return _NO, f"'{t.name}' has {t.module.running_mean.numel()} channels, the convs {big.out_channels}"
        if t.kind != "conv":
            if big.in_channels != big.out_channels or any(s != 1 for s in big.stride):
                return _NO, "an identity branch beside a conv that changes the shape"
            if any(2 * p != k - 1 for k, p in zip(big.kernel_size, big.padding)):
                return _NO, "an identity branch beside a conv whose output is not the input's size"
    for t in terms:
        if t.module is not None and hooks_on(t.module):
            return SkipReason.HOOKED, f"'{t.name}' has {hooks_on(t.module)}: merging would remove the module"
        if t.module is not None and fold_refusal(t.module):
            return _NO, str(fold_refusal(t.module))
    return None


def _identity_kernel(big: Any, scale: torch.Tensor) -> torch.Tensor:
    """``scale[o]`` at ``W[o, o mod (C/g), p]``: the conv form of a per-channel scaling of the input."""
    w = torch.zeros(big.weight.shape, dtype=torch.float64, device=big.weight.device)
    per_group = big.in_channels // big.groups
    o = torch.arange(big.out_channels, device=w.device)
    w[(o, o % per_group, *(torch.full_like(o, p) for p in big.padding))] = scale
    return w


def _merged(terms: list[_Term], big: Any) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.zeros(big.weight.shape, dtype=torch.float64, device=big.weight.device)
    bias = torch.zeros(big.out_channels, dtype=torch.float64, device=big.weight.device)
    ones = torch.ones(big.out_channels, dtype=torch.float64, device=weight.device)
    for t in terms:
        f = (t.factor.flatten().to(weight.device) if isinstance(t.factor, torch.Tensor) else t.factor) * ones * t.sign
        rows = f.view(-1, *([1] * (weight.dim() - 1)))
        if t.kind == "conv":
            c = t.module
            pad: list[int] = []
            for k, kb in zip(reversed(c.kernel_size), reversed(big.kernel_size)):
                pad += [(kb - k) // 2] * 2
            weight += F.pad(c.weight.detach().double(), pad) * rows
            if c.bias is not None:
                bias += c.bias.detach().double() * f
        elif t.kind == "bn":
            bn = t.module
            scale = torch.rsqrt(bn.running_var.double() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.detach().double()
            shift = -bn.running_mean.double() * scale
            if bn.bias is not None:
                shift = shift + bn.bias.detach().double()
            weight += _identity_kernel(big, scale * f)
            bias += shift * f
        else:
            weight += _identity_kernel(big, f)
    return weight, bias


def merge_branches(gm: fx.GraphModule, scope: Scope = EVERYWHERE) -> PassResult:
    """Merge every sum of linear branches of one input into its largest conv (see the module doc)."""
    mods = dict(gm.named_modules(remove_duplicate=False))
    uses, called = module_uses(gm), called_modules(gm)
    changes: list[Change] = []
    skips: list[Skip] = []
    merged: set[fx.Node] = set()
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}       # merging only erases nodes: positions hold
    for node in reversed(nodes):                         # the outermost sum of a block first
        if not _is_add(node) or node in merged or not node.users:
            continue
        terms = _terms(node, mods, lambda n: get_attr(gm, str(n.target)))
        convs = [t for t in terms if t.kind == "conv"]
        if not convs or len({t.input for t in terms}) != 1:
            continue                                        # not branches of one input: no site
        merged.update(n for t in terms for n in t.nodes)
        big = max(convs, key=lambda t: t.module.weight[0, 0].numel())
        site = big.name
        parts = " ".join(_describe(t, i == 0) for i, t in enumerate(terms))
        why = _problem(terms, uses, called)
        if why:
            skips.append(Skip(site, why[0], f"branches {parts}: {why[1]}"))
            continue
        excluded = scope.skip(site, *((t.name, t.module) for t in terms if t.module is not None))
        if excluded:
            skips.append(excluded)
            continue
        changes.append(Change(site, "merge", f"{parts} -> one {tuple(big.module.kernel_size)} conv"))
        if scope.plan:
            continue
        weight, bias = _merged(terms, big.module)
        conv = big.module
        grad = any(p.requires_grad for t in terms if t.module is not None for p in t.module.parameters())
        set_param(conv, "weight", weight.to(conv.weight.dtype), requires_grad=grad)
        set_param(conv, "bias", bias.to(conv.weight.dtype), requires_grad=grad)
        base = big.nodes[-1]
        node.replace_all_uses_with(base)
        private = {x for t in terms for x in t.nodes} - {base}
        for n in sorted(private, key=position.__getitem__, reverse=True):   # users before what they use
            if not n.users:
                gm.graph.erase_node(n)
        for t in terms:
            if t.module is not None and t is not big:
                set_module(gm, t.name, nn.Identity().train(t.module.training))
    if changes and not scope.plan:
        gm.graph.lint()
        gm.recompile()
    return PassResult("merge_branches", tuple(changes), tuple(skips))


def merge_branches_outside(model: nn.Module, outside: list[Outside], scope: Scope = EVERYWHERE) -> PassResult:
    """Outside traced regions there is no graph to find the sum in: nothing to do."""
    return PassResult("merge_branches", (), ())
