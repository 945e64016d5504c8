"""The ConvBN pass's reading of a graph: a BatchNorm call as a site (module, functional or Tune
form), the context every visit shares, and the checks a fold makes before it changes anything
(the producer, hooks, the caller's ``filter_fn``/``leaf_modules``, pruning). Nothing here changes
the graph or the model except ``set_weights``, which installs a computed fold."""
from __future__ import annotations

import inspect
from collections import Counter
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from normfx.functional import BNStats
from normfx.kinds import hooks_on, is_conv_like, pruning_hooks
from normfx.match import get_attr, inside_called_module, set_param
from normfx.nn.convbn import bn_stats, tune_convbn, tune_convbn_functional
from normfx.report import Skip, SkipReason
from normfx.scope import Scope

__all__ = ["Ctx", "Site", "Unsupported", "fn_args", "is_tune_node", "functional_name", "dims_match", "set_weights",
           "producer_problem", "guard", "prune_note", "rank", "shape", "single_conv_user", "frozen"]

_BN_PARAMS = list(inspect.signature(F.batch_norm).parameters)  # input, running_mean, ... eps


def fn_args(node: Any) -> dict:
    args = dict(zip(_BN_PARAMS, node.args))
    args.update(node.kwargs)
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    return {**defaults, **args}


def is_tune_node(node: Any) -> bool:
    return node.op == "call_function" and node.target in (tune_convbn, tune_convbn_functional)


def _tensor(gm: fx.GraphModule, arg) -> Any:
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return get_attr(gm, str(arg.target))
    raise Unsupported("its statistics are computed in the graph, not stored attributes")


class Unsupported(Exception):
    pass


class Ctx(NamedTuple):
    """What every site visit needs: the graph module, a name -> module map built once, how often
    each module is used, the names of the modules the graph calls, and the shared conv → BatchNorm
    pairs folded so far (BN id -> its first call's site)."""

    gm: fx.GraphModule
    mods: dict[str, nn.Module]
    uses: Counter
    called: frozenset[str]
    scope: Scope
    shared_folds: dict[int, str]

    def module(self, node) -> Any:
        if not isinstance(node, fx.Node) or node.op not in ("call_module", "get_attr"):
            return None
        return self.mods.get(node.target) if isinstance(node.target, str) else None


class Site:
    """A BatchNorm call in the graph, normalized across module, functional and Tune forms."""

    def __init__(self, ctx: Ctx, node: Any) -> None:
        gm = ctx.gm
        self.node = node
        # Duck-typed: a BatchNorm-like module, graph arguments, statistics (see the branches below).
        self.module: Any = None
        self.conv_node: Any = None  # only for existing Tune blocks
        self.input: Any = None
        self.stats: Any = None
        if node.op == "call_module":
            self.module = ctx.module(node)
            self.name = str(node.target)
            self.input = node.args[0] if node.args else None
            self.training = bool(self.module.training) and not frozen(self.module)
            self.stats = bn_stats(self.module) if self.module.running_mean is not None else None
            self.extra = len(node.args) != 1 or bool(node.kwargs)
        elif is_tune_node(node):
            self.conv_node = node.args[1]
            self.input = node.args[0]
            if node.target is tune_convbn:
                self.module = ctx.module(node.args[2])
                self.name = str(node.args[2].target)
                self.training = bool(self.module.training) and not frozen(self.module)
                self.stats = bn_stats(self.module)
            else:
                _, _, mean, var, w, b, eps = node.args
                self.name = functional_name(node, {"running_mean": mean})
                self.training = False
                self.stats = BNStats(_tensor(gm, mean), _tensor(gm, var), _tensor(gm, w), _tensor(gm, b),
                                     float(eps))  # type: ignore[arg-type]
            self.extra = False
        else:
            a = fn_args(node)
            self.name = functional_name(node, a)
            self.input = a["input"]
            self.training = bool(a["training"]) if not isinstance(a["training"], fx.Node) else True
            self.extra = False
            mean, var = a["running_mean"], a["running_var"]
            if mean is None or var is None:
                self.stats = None
            else:
                self.stats = BNStats(
                    _tensor(gm, mean), _tensor(gm, var), _tensor(gm, a["weight"]), _tensor(gm, a["bias"]),
                    float(a["eps"]),
                )


def frozen(m: Any) -> bool:
    return not hasattr(m, "track_running_stats")  # FrozenBatchNorm has no train-mode behaviour


def functional_name(node: Any, a: dict) -> str:
    mean = a.get("running_mean")
    if isinstance(mean, fx.Node) and mean.op == "get_attr":
        return str(mean.target).rsplit(".", 1)[0] or node.name
    return node.name


def dims_match(conv: Any, bn: Any, stats: BNStats) -> str:
    out = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    if stats.mean.numel() != out:
        return f"BatchNorm has {stats.mean.numel()} channels, {type(conv).__name__} produces {out}"
    if bn is not None and isinstance(conv, nn.Linear) and not isinstance(bn, (nn.BatchNorm1d,)):
        return f"{type(bn).__name__} after Linear"
    return ""


def set_weights(conv: Any, conv_name: Any, w: torch.Tensor, b: torch.Tensor, site: Site, *,
                 before: bool = False) -> str:
    """Install the folded ``(w, b)``. Each requires grad when any tensor it was computed from did
    (the conv's weight or bias, the BN's γ/β; a forward fold's bias also reads the conv's weight),
    so a partly frozen model (``normfx.freeze``) stays trainable where it was and only there.
    Returns what the report adds when this made the conv's pruning permanent (``prune_note``)."""
    note = prune_note(conv, conv_name)
    st = site.stats
    affine = any(t is not None and t.requires_grad for t in (st.weight, st.bias))
    w_grad = conv.weight.requires_grad or (st.weight is not None and st.weight.requires_grad)
    b_grad = (conv.bias is not None and conv.bias.requires_grad) or affine or (before and conv.weight.requires_grad)
    set_param(conv, "weight", w, requires_grad=w_grad)
    set_param(conv, "bias", b, requires_grad=b_grad)
    return note


_SHAPE_OF = ("reshape_as", "view_as", "expand_as")


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values, not only its shape (``size()``, ``.shape``,
    ``y.reshape_as(node)``): a fold that scales ``node`` changes what those users compute."""
    out = []
    for u in node.users:
        if u.op == "call_method" and u.target in ("size", "dim") and u.args[0] is node:
            continue
        if u.op == "call_function" and u.target is getattr and len(u.args) > 1 and u.args[1] in ("shape", "ndim"):
            continue
        if (u.op == "call_method" and u.target in _SHAPE_OF and u.args[0] is not node
                and node not in u.args[2:] and node not in u.kwargs.values()):
            continue
        out.append(u)
    return out


def producer_problem(ctx: Ctx, producer: Any, conv: Any, *, shape_uses: bool = False) -> tuple[SkipReason, str] | None:
    """Why the conv that produces a norm's input cannot take a fold after it, or ``None``: its output
    feeds something else too, the module is called elsewhere, or it is called with extra arguments.
    ``shape_uses``: users that read only the output's shape do not count."""
    if len(value_users(producer) if shape_uses else producer.users) > 1:
        return SkipReason.MULTI_USER, f"output of '{producer.target}' has other users"
    if ctx.uses[id(conv)] > 1:
        return SkipReason.SHARED_MODULE, f"'{producer.target}' is called at several places"
    holder = inside_called_module(ctx.called, str(producer.target))
    if holder:
        return SkipReason.SHARED_MODULE, (f"'{producer.target}' is also called inside '{holder}', "
                                          "whose forward no graph shows")
    if len(producer.args) != 1 or producer.kwargs:
        return SkipReason.UNSUPPORTED, f"'{producer.target}' is called with extra arguments"
    return None


def guard(ctx: Ctx, norm: Any, norm_name: str, conv: Any, conv_name: Any, *, before: bool = False) -> Skip | None:
    """Why a fold of ``norm`` into ``conv`` must not change them, or ``None``: the caller excluded one
    of them (``filter_fn``, ``leaf_modules``; a functional norm belongs to the forward that calls
    it), or hooks would see the change (``_hook_problem``)."""
    owner = (norm_name, norm) if norm is not None else ("", None)
    return ctx.scope.skip(norm_name, owner, (str(conv_name), conv)) or _hook_problem(
        norm, norm_name, conv, conv_name, before=before)


def _hook_problem(norm: Any, norm_name: str, conv: Any, conv_name: Any, *, before: bool = False) -> Skip | None:
    """A fold removes the norm module and changes what its conv computes: hooks on the norm would
    stop firing, and the conv's hooks would see other values (its output's, for a fold after it;
    its input's, for a fold before it; its gradients' either way). Such a site is skipped."""
    on_norm = hooks_on(norm) if norm is not None else ""
    if on_norm:
        return Skip(norm_name, SkipReason.HOOKED, f"'{norm_name}' has {on_norm}: folding would remove the module")
    seen = ("forward_pre", "backward", "backward_pre") if before else ("forward", "backward", "backward_pre")
    on_conv = hooks_on(conv, seen)  # type: ignore[arg-type]
    if on_conv:
        what = "input" if before else "output"
        return Skip(norm_name, SkipReason.HOOKED,
                    f"'{conv_name}' has {on_conv}: folding would change the {what} and gradients they see")
    return None


def prune_note(conv: Any, name: Any) -> str:
    """What the report adds when the folded conv was pruned (``torch.nn.utils.prune``): its folded
    weights keep the pruned zeros as plain Parameters, without the mask."""
    pruned = sorted(h._tensor_name for h in pruning_hooks(conv).values())
    return f"; pruning of {', '.join(repr(f'{name}.{t}') for t in pruned)} made permanent" if pruned else ""


def shape(node: Any) -> tuple[int, ...] | None:
    """The node's tensor shape when the graph has shapes (``example_inputs``), else ``None``."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def rank(node: Any) -> int | None:
    dims = shape(node)
    return None if dims is None else len(dims)


def single_conv_user(ctx: Ctx, node: Any) -> fx.Node | None:
    """The conv/linear call that is the one user of ``node``'s values (users that read only its
    shape, as ``B, C, H, W = x.shape`` before ``self.qkv(x)``, do not count), else ``None``."""
    users = value_users(node)
    if len(users) != 1:
        return None
    user = users[0]
    m = ctx.module(user) if user.op == "call_module" else None
    if is_conv_like(m) and user.args and user.args[0] is node:
        return user
    return None


