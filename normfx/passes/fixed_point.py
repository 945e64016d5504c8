"""Insert ``FixedPoint`` casts (QFX): weights and biases, activations, BatchNorm, residual adds.

Math: each cast is ``x̂ = O(Q(x·2^F))·2^−F`` with ``F = W − I`` (Vitis HLS ``ap_fixed<W, I, Q, O>``),
``I`` trainable (straight-through); K-hot projects a value onto sums of at most K signed powers of two
within its format. Not exact: the pass changes the function (it quantizes). What it preserves: with
every value inside its format's range, a cast moves it by at most half a step (round to nearest) or
one step (truncating modes); ``deploy`` then freezes the binary points and the deployed model equals
the eval-mode quantized one bit for bit (K-hot weights baked), which the ONNX export reproduces.

Sites and what each becomes:

* ``"weight"`` / ``"bias"``: every Conv/Linear's weight and bias get a ``FixedPoint``
  parametrization (``torch.nn.utils.parametrize``): the layer computes with the cast tensor while the
  optimizer updates the float master copy. State-dict keys stay the original ones.
* ``"norm"``: every plain BatchNorm becomes ``FixedPointBatchNorm`` (same parameters and buffers, same
  keys): the per-channel multiply-add ``x·ŝ + t̂`` with the scale ``ŝ`` and shift ``t̂`` cast to
  fixed point (the scale K-hot when ``k_hot`` is set), from batch statistics in training and running
  statistics in eval. It is never folded.
* ``"add"``: a residual ``a + b`` of two tensors gets one cast shared by both inputs (one format, as
  an adder in hardware needs).
* ``"activation"``: the model input and the output of every compute node get a cast (unsigned after
  ReLU-like ops); value-preserving ops (views, max-pooling, dropout, getitem) are not casts' sites.
"""
from __future__ import annotations

import copy
import operator
from typing import Literal, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from normfx.kinds import bn_kind, is_conv_like, is_frozen_bn, is_mode_dependent_leaf, is_norm_layer
from normfx.match import free_name, set_module
from normfx.match import get_attr as getattr_path
from normfx.nn.fixed_point import FixedPoint
from normfx.nn.fixed_point_bn import FixedPointBatchNorm
from normfx.nn.param_keys import keep_state_dict_keys
from normfx.report import Change, PassResult, Skip, SkipReason
from normfx.analysis import Outside

__all__ = ["TARGETS", "Target", "FixedPointBatchNorm", "insert_fixed_point", "insert_fixed_point_outside",
           "freeze_binary_points", "freeze_binary_points_outside"]

Target = Literal["weight", "bias", "activation", "norm", "add"]
"""What ``fixed_point`` casts (``TARGETS``: all of them)."""
TARGETS: tuple[Target, ...] = ("weight", "bias", "activation", "norm", "add")

_UNSIGNED_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)
_UNSIGNED_FUNCS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid}
_SAME_VALUES_MODULES = (nn.Identity, nn.Flatten, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                        nn.Unflatten)
_SAME_VALUES_FUNCS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                      torch.unsqueeze, operator.getitem, getattr, F.dropout, F.max_pool1d, F.max_pool2d,
                      F.max_pool3d, torch.cat, torch.chunk, torch.split}
_SAME_VALUES_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
                        "unsqueeze", "expand", "size", "dim", "chunk", "split", "unbind"}
_ADDS = {operator.add, torch.add, operator.iadd}


def _q(bits: int, int_bits: float | None, rounding: str, overflow: str, *, signed: bool = True,
       channels: int = 1, axis: int = 1) -> FixedPoint:
    return FixedPoint(bits, int_bits, signed=signed, rounding=rounding, overflow=overflow, channels=channels,
                      axis=axis)


def _is_same_values(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _SAME_VALUES_MODULES)
    if node.op == "call_function":
        return node.target in _SAME_VALUES_FUNCS
    if node.op == "call_method":
        return node.target in _SAME_VALUES_METHODS
    return node.op in ("get_attr", "output")


def _is_unsigned(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _UNSIGNED_MODULES)
    if node.op == "call_function":
        return node.target in _UNSIGNED_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_", "sigmoid")


def _integer_indices(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether every use of ``node`` is as the indices of an embedding lookup (an integer tensor,
    such as a language model's ``input_ids``: a fixed-point cast would refuse it)."""
    def index_use(u: fx.Node) -> bool:
        if not u.args or u.args[0] is not node:
            return False
        if u.op == "call_module":
            return isinstance(gm.get_submodule(str(u.target)), (nn.Embedding, nn.EmbeddingBag))
        return u.op == "call_function" and u.target in (F.embedding, F.embedding_bag, F.one_hot)
    return bool(node.users) and all(index_use(u) for u in node.users)


_TUPLE_MODULES = (nn.MultiheadAttention, nn.RNNBase)


def returns_one_tensor(m: nn.Module) -> bool:
    """Whether a leaf module is known to return one tensor: torch.nn's and normfx's modules (but
    attention and RNNs, which return tuples) and the norm/mode-dependent leaves normfx keeps. A module
    kept opaque because its forward could not be traced may return anything (an FPN returns a dict)."""
    if isinstance(m, _TUPLE_MODULES):
        return False
    own = type(m).__module__.startswith(("torch.nn.", "normfx."))
    return own or bn_kind(m) is not None or is_frozen_bn(m) or is_norm_layer(m) or is_mode_dependent_leaf(m)


def _tensor_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that produce tensors (not sizes, dims or other Python values), by a forward dataflow
    pass: inputs, modules known to return one tensor and tensor attributes do; ``size()``/``.shape``
    and what is computed only from them do not."""
    out: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.args:
            continue   # an argument fixed at its default when traced (a Python value, not a tensor)
        if n.op == "placeholder" or (n.op == "call_module" and returns_one_tensor(gm.get_submodule(str(n.target)))):
            out.add(n)
        elif n.op == "get_attr":
            if isinstance(getattr_path(gm, n.target), torch.Tensor):
                out.add(n)
        elif n.op == "call_method" and n.target in ("size", "dim", "numel", "tolist", "item"):
            continue
        elif n.op == "call_function" and n.target is getattr:
            continue
        elif n.op in ("call_function", "call_method") and any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def insert_fixed_point(gm: fx.GraphModule, *, bits: int = 8, int_bits: float | None = None,
                       rounding: str = "nearest_even", overflow: str = "saturate",
                       targets: Sequence[str] = TARGETS, per_channel: bool = False,
                       k_hot: int | None = None, k_hot_weights: bool = False,
                       k_hot_code: str = "csd") -> PassResult:
    """Insert the casts in ``gm`` (in place); see the module docstring for the sites."""
    wanted = set(targets)
    changes: list[Change] = []
    skips: list[Skip] = []
    mods = dict(gm.named_modules())
    tensors = _tensor_nodes(gm)

    def add_cast(after: fx.Node, signed: bool, name: str) -> None:
        q = _q(bits, int_bits, rounding, overflow, signed=signed)
        q.site = ("output", str(after.target) if after.op == "call_module" else after.name)
        qname = free_name(gm, f"fxq_{after.name}")
        gm.add_submodule(qname, q)
        users = list(after.users)
        with gm.graph.inserting_after(after):
            new = gm.graph.call_module(qname, (after,))
        tensors.add(new)
        for u in users:
            u.replace_input_with(after, new)
        changes.append(Change(name, "cast", q.extra_repr()))

    opts = _Options(bits, int_bits, rounding, overflow, set(targets), per_channel, k_hot, k_hot_weights, k_hot_code)
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            m = mods[node.target]
            if isinstance(m, FixedPoint):
                continue
            site = str(node.target)
            if is_conv_like(m):
                changes += _cast_weights(m, site, opts)
            elif isinstance(m, _BatchNorm) and "norm" in wanted:
                result = _quantize_bn(gm, site, m, opts)
                if isinstance(result, Change):
                    changes.append(result)
                else:
                    skips.append(result)
                mods[site] = gm.get_submodule(site)
        if node.op in ("call_function", "call_method") and "add" in wanted and (
            node.target in _ADDS or node.target == "add"
        ):
            ins = [a for a in node.args[:2] if isinstance(a, fx.Node) and a in tensors]
            if len(ins) == 2 and ins[0] is not ins[1]:
                q = _q(bits, int_bits, rounding, overflow)
                q.site = ("inputs", node.name)
                qname = free_name(gm, f"fxq_{node.name}_in")
                gm.add_submodule(qname, q)
                with gm.graph.inserting_before(node):
                    qa = gm.graph.call_module(qname, (ins[0],))
                    qb = gm.graph.call_module(qname, (ins[1],))
                node.replace_input_with(ins[0], qa)
                node.replace_input_with(ins[1], qb)
                changes.append(Change(node.name, "shared input cast", "both inputs in one format"))
        if "activation" in wanted and node.op in ("placeholder", "call_module", "call_function", "call_method"):
            if node.op == "call_module" and isinstance(mods.get(node.target), FixedPoint):
                continue
            # Per-module regions: a submodule that is a region of its own casts inside itself, and
            # only the model's root casts its inputs (a module's inputs were cast where produced).
            if node.op == "placeholder" and not gm.meta.get("normfx_root", True):
                continue
            if node.op == "call_module" and node.target in gm.meta.get("normfx_subregions", ()):
                continue
            if node.op == "call_module" and node not in tensors and node.users:
                skips.append(Skip(f"{node.name} (output)", SkipReason.UNSUPPORTED,
                                  f"'{node.target}' ({type(mods[node.target]).__name__}) may not return one tensor "
                                  "(its forward could not be traced): its output is not cast"))
            elif node in tensors and not _is_same_values(gm, node) and node.users:
                if _integer_indices(gm, node):
                    skips.append(Skip(f"{node.name} (output)", SkipReason.UNSUPPORTED,
                                      "integer tensor: every use is an embedding's indices"))
                else:
                    add_cast(node, not _is_unsigned(gm, node), f"{node.name} (output)")
    gm.graph.lint()
    gm.recompile()
    return PassResult("fixed_point", tuple(changes), tuple(skips))


class _Options(NamedTuple):
    bits: int
    int_bits: float | None
    rounding: str
    overflow: str
    targets: set[str]
    per_channel: bool
    k_hot: int | None
    k_hot_weights: bool
    k_hot_code: str = "csd"


def _cast_weights(m: nn.Module, site: str, o: _Options) -> list[Change]:
    """A Conv/Linear's weight and bias get a FixedPoint parametrization each (a leaf change: the
    layer's forward is untouched, so it needs no graph)."""
    if parametrize.is_parametrized(m):
        return []
    changes = []
    transposed = bool(getattr(m, "transposed", False))
    for t in ("weight", "bias"):
        if t not in o.targets or getattr(m, t, None) is None:
            continue
        per = o.per_channel and t == "weight" and not transposed
        out = int(m.weight.shape[0])
        q = _q(o.bits, o.int_bits, o.rounding, o.overflow, channels=out if per else 1, axis=0)
        q.site = (t, "")
        _init_from(q, getattr(m, t), per)
        if o.k_hot_weights and t == "weight":
            q.k_hot, q.k_hot_code = o.k_hot, o.k_hot_code
        keep_state_dict_keys(m)
        parametrize.register_parametrization(m, t, q, unsafe=True)
        changes.append(Change(f"{site}.{t}", "cast", q.extra_repr()))
    return changes


def _quantize_bn(root: nn.Module, site: str, m: _BatchNorm, o: _Options) -> Change | Skip:
    """A plain BatchNorm becomes a FixedPointBatchNorm in its slot (same parameters and keys)."""
    if isinstance(m, FixedPointBatchNorm):
        return Skip(site, SkipReason.ALREADY_DONE, "already a FixedPointBatchNorm")
    if bn_kind(m) != "plain" or type(m) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return Skip(site, SkipReason.UNSUPPORTED, f"{type(m).__name__} is not a plain BatchNorm")
    scale_q, shift_q = (_q(o.bits, o.int_bits, o.rounding, o.overflow) for _ in range(2))
    scale_q.site, shift_q.site = ("scale", ""), ("shift", "")
    fq = FixedPointBatchNorm.from_bn(m, scale_q=scale_q, shift_q=shift_q, k_hot=o.k_hot, k_hot_code=o.k_hot_code)
    set_module(root, site, fq)
    return Change(site, "fixed-point multiply-add", f"k_hot={o.k_hot} ({o.k_hot_code})" if o.k_hot else "")


def insert_fixed_point_outside(model: nn.Module, outside: list[Outside], *, bits: int = 8,
                               int_bits: float | None = None, rounding: str = "nearest_even",
                               overflow: str = "saturate", targets: Sequence[str] = TARGETS,
                               per_channel: bool = False, k_hot: int | None = None,
                               k_hot_weights: bool = False, k_hot_code: str = "csd") -> PassResult:
    """The casts that need no graph, on modules no traced region calls: weights and biases, and
    BatchNorms (leaf changes). Activations and residual adds inside an untraceable forward cannot
    be found without its graph: one skip per untraceable module says so."""
    o = _Options(bits, int_bits, rounding, overflow, set(targets), per_channel, k_hot, k_hot_weights, k_hot_code)
    changes: list[Change] = []
    skips: list[Skip] = []
    for site, m, *_ in outside:
        if is_conv_like(m):
            changes += _cast_weights(m, site, o)
        elif isinstance(m, _BatchNorm) and "norm" in o.targets:
            result = _quantize_bn(model, site, m, o)
            if isinstance(result, Change):
                changes.append(result)
            else:
                skips.append(result)
    if o.targets & {"activation", "add"}:
        owners = {entry.owner: entry.why for entry in outside if entry.owner is not None}
        for qualname, why in owners.items():
            skips.append(Skip(qualname or "<root>", SkipReason.UNTRACEABLE,
                              f"activations and residual adds in its forward are not cast: {why}"))
    return PassResult("fixed_point", tuple(changes), tuple(skips))


@torch.no_grad()
def _init_from(q: FixedPoint, t: torch.Tensor, per_channel: bool) -> None:
    """Start a weight's binary point where its range fits (training refines it)."""
    mx = t.detach().abs().reshape(t.shape[0], -1).amax(1) if per_channel else t.detach().abs().amax().reshape(1)
    q.observed_max.copy_(mx.float())
    q.calibrate_from_observed()
    q.observed_max.zero_()


def freeze_binary_points(gm: fx.GraphModule) -> PassResult:
    """Deploy step: every trainable binary point becomes a fixed integer (a buffer), K-hot weights
    are baked, and every ``FixedPointBatchNorm`` keeps its fixed-point scale and shift as constants.
    Leaf changes only: the same step serves modules outside traced regions."""
    return PassResult("freeze_binary_points", tuple(_freeze_modules(list(gm.named_modules()))))


def freeze_binary_points_outside(model: nn.Module, outside: list[Outside]) -> PassResult:
    """``freeze_binary_points`` on the modules no traced region calls."""
    return PassResult("freeze_binary_points", tuple(_freeze_modules([(o.qualname, o.module) for o in outside])))


def _freeze_modules(named: list[tuple[str, nn.Module]]) -> list[Change]:
    changes = []
    for name, m in named:
        if isinstance(m, FixedPoint) and m.trainable:
            value = m.integer_bits().clone()
            del m.int_bits
            m.register_buffer("int_bits", value)
            changes.append(Change(name, "freeze", m.hls_type()))
    for name, m in named:
        for t, plist in (list(m.parametrizations.items()) if parametrize.is_parametrized(m) else []):
            q = plist[0]
            if len(plist) == 1 and isinstance(q, FixedPoint) and q.k_hot:
                # Bake the K-hot projection (a table lookup ONNX has no op for) into the weight; the
                # cast stays (on K-hot values it is the identity), so the export still writes Q/DQ.
                value = getattr(m, t).detach().clone()
                parametrize.remove_parametrizations(m, t, leave_parametrized=False)
                setattr(m, t, nn.Parameter(value, requires_grad=False))
                plain = copy.deepcopy(q)
                plain.k_hot = None
                parametrize.register_parametrization(m, t, plain, unsafe=True)
                changes.append(Change(f"{name}.{t}", "bake", f"{q.k_hot}-hot weights"))
    for name, m in named:
        if isinstance(m, FixedPointBatchNorm) and m.deployed_scale is None and m.track_running_stats:
            m.bake()
            changes.append(Change(name, "bake", "fixed-point scale and shift from running statistics"))
    return changes
