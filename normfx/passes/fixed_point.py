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
from collections import Counter
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Literal, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from normfx.config import check_choice, check_int
from normfx.errors import AlreadyTransformedError
from normfx.functional import K_HOT_CODES, KHotCode, Overflow, Rounding, fixed_mode
from normfx.kinds import pruning_hooks
from normfx.passes.fold_convbn import CONVBN
from normfx.kinds import bn_kind, is_conv_like
from normfx.match import free_name, set_module
from normfx.nn.fixed_point import FixedPoint
from normfx.nn.exact_sums import exact_sums
from normfx.nn.fixed_point_bn import FixedPointBatchNorm
from normfx.nn.param_keys import keep_state_dict_keys
from normfx.report import Change, PassResult, Skip, SkipReason
from normfx.scope import EVERYWHERE, Scope
from normfx.analysis import Outside
from normfx.passes.fixed_point_sites import ADDS, integer_indices, returns_one_tensor, same_values, tensor_nodes, \
    unsigned
from normfx.transform import Step, Transform

__all__ = ["TARGETS", "Target", "FixedPointBatchNorm", "insert_fixed_point", "insert_fixed_point_outside",
           "freeze_binary_points", "freeze_binary_points_outside", "returns_one_tensor", "FixedPointConfig",
           "FIXED_POINT"]

Target = Literal["weight", "bias", "activation", "norm", "add"]
"""What ``fixed_point`` casts (``TARGETS``: all of them)."""
TARGETS: tuple[Target, ...] = ("weight", "bias", "activation", "norm", "add")

def _q(bits: int, int_bits: float | None, rounding: str, overflow: str, *, signed: bool = True,
       channels: int = 1, axis: int = 1) -> FixedPoint:
    return FixedPoint(bits, int_bits, signed=signed, rounding=rounding, overflow=overflow, channels=channels,
                      axis=axis)


def insert_fixed_point(gm: fx.GraphModule, scope: Scope = EVERYWHERE, *, bits: int = 8, int_bits: float | None = None,
                       rounding: str = "nearest_even", overflow: str = "saturate",
                       targets: Sequence[str] = TARGETS, per_channel: bool = False,
                       k_hot: int | None = None, k_hot_weights: bool = False,
                       k_hot_code: str = "csd", weight_bits: int | None = None) -> PassResult:
    """Insert the casts in ``gm`` (in place); see the module docstring for the sites."""
    wanted = set(targets)
    changes: list[Change] = []
    skips: list[Skip] = []
    mods = dict(gm.named_modules())
    tensors = tensor_nodes(gm)

    def add_cast(after: fx.Node, signed: bool, name: str) -> None:
        q = _q(bits, int_bits, rounding, overflow, signed=signed).train(gm.training)   # the model's mode
        owner = (str(after.target), mods[str(after.target)]) if after.op == "call_module" else ("", None)
        excluded = scope.skip(name, owner)
        if excluded or scope.plan:
            _sort([excluded or Change(name, "cast", q.extra_repr())], changes, skips)
            return
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

    opts = _Options(bits, int_bits, rounding, overflow, set(targets), per_channel, k_hot, k_hot_weights, k_hot_code,
                    weight_bits)
    calls: Counter[str] = Counter()   # module calls so far, per module: its first call is its one site
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            calls[str(node.target)] += 1
        if node.op == "call_module" and calls[str(node.target)] == 1:
            m = mods[node.target]
            if isinstance(m, FixedPoint):
                continue
            site = str(node.target)
            if is_conv_like(m):
                _sort(_cast_weights(m, site, opts, scope), changes, skips)
            elif isinstance(m, _BatchNorm) and "norm" in wanted:
                _sort([_quantize_bn(gm, site, m, opts, scope)], changes, skips)
                mods[site] = gm.get_submodule(site)
        if node.op in ("call_function", "call_method") and "add" in wanted and (
            node.target in ADDS or node.target == "add"
        ):
            ins = [a for a in node.args[:2] if isinstance(a, fx.Node) and a in tensors]
            excluded = scope.skip(node.name, ("", None)) if len(ins) == 2 else None
            if len(ins) == 2 and ins[0] is not ins[1] and (excluded or scope.plan):
                _sort([excluded or Change(node.name, "shared input cast", "both inputs in one format")], changes, skips)
            elif len(ins) == 2 and ins[0] is not ins[1]:
                q = _q(bits, int_bits, rounding, overflow).train(gm.training)
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
            out_site = output_site(node, calls[str(node.target)] if node.op == "call_module" else 1)
            if node.op == "call_module" and node not in tensors and node.users:
                excluded = scope.skip(out_site, (str(node.target), mods[node.target]))
                skips.append(excluded or Skip(out_site, SkipReason.UNSUPPORTED,
                                  f"'{node.target}' ({type(mods[node.target]).__name__}) may not return one tensor "
                                  "(its forward could not be traced): its output is not cast"))
            elif node in tensors and not same_values(gm, node) and node.users:
                if integer_indices(gm, node):
                    skips.append(Skip(out_site, SkipReason.UNSUPPORTED,
                                      "integer tensor: every use is an embedding's indices"))
                else:
                    add_cast(node, not unsigned(gm, node), out_site)
    if not scope.plan:
        gm.graph.lint()
        gm.recompile()
    return PassResult("fixed_point", tuple(changes), tuple(skips))


def output_site(node: fx.Node, call: int = 1) -> str:
    """How an activation cast's site is reported: ``<module> (output)`` after a module call (the
    module's name; ``(output 2)`` for its ``call``-th call, 2), ``<node> (output)`` after a function
    or an input."""
    if node.op != "call_module":
        return f"{node.name} (output)"
    return f"{node.target} (output{f' {call}' if call > 1 else ''})"


def _sort(results: list[Change | Skip], changes: list[Change], skips: list[Skip]) -> None:
    for r in results:
        (changes if isinstance(r, Change) else skips).append(r)  # type: ignore[arg-type]


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
    weight_bits: int | None = None


def _cast_weights(m: nn.Module, site: str, o: _Options, scope: Scope) -> list[Change | Skip]:
    """A Conv/Linear's weight and bias get a FixedPoint parametrization each (a leaf change: the
    layer's forward is untouched, so it needs no graph)."""
    if parametrize.is_parametrized(m):
        return []
    changes: list[Change | Skip] = []
    transposed = bool(getattr(m, "transposed", False))
    for t in ("weight", "bias"):
        if t not in o.targets or getattr(m, t, None) is None:
            continue
        per = o.per_channel and t == "weight" and not transposed
        out = int(m.weight.shape[0])
        width = o.weight_bits if t == "weight" and o.weight_bits is not None else o.bits
        q = _q(width, o.int_bits, o.rounding, o.overflow, channels=out if per else 1, axis=0)
        q.site = (t, "")
        if o.k_hot_weights and t == "weight":
            q.k_hot, q.k_hot_code = o.k_hot, o.k_hot_code
        excluded = scope.skip(f"{site}.{t}", (site, m))
        if excluded or scope.plan:   # a dry run reports the cast before its binary point is set from the weight
            changes.append(excluded or Change(f"{site}.{t}", "cast", q.extra_repr()))
            continue
        _init_from(q, getattr(m, t), per)
        if t == "weight":
            exact_sums(m)   # before parametrize subclasses the class (a layer that cannot keeps float32 sums)
        keep_state_dict_keys(m)
        parametrize.register_parametrization(m, t, q, unsafe=True)
        m.parametrizations.train(m.training)   # torch builds the containers in training mode
        changes.append(Change(f"{site}.{t}", "cast", q.extra_repr()))
    return changes


def _quantize_bn(root: nn.Module, site: str, m: _BatchNorm, o: _Options, scope: Scope) -> Change | Skip:
    """A plain BatchNorm becomes a FixedPointBatchNorm in its slot (same parameters and keys)."""
    if isinstance(m, FixedPointBatchNorm):
        return Skip(site, SkipReason.ALREADY_DONE, "already a FixedPointBatchNorm")
    if bn_kind(m) != "plain" or type(m) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return Skip(site, SkipReason.UNSUPPORTED, f"{type(m).__name__} is not a plain BatchNorm")
    excluded = scope.skip(site, (site, m))
    if excluded or scope.plan:
        return excluded or Change(site, "fixed-point multiply-add",
                                  f"k_hot={o.k_hot} ({o.k_hot_code})" if o.k_hot else "")
    scale_q, shift_q = (_q(o.bits, o.int_bits, o.rounding, o.overflow) for _ in range(2))
    scale_q.site, shift_q.site = ("scale", ""), ("shift", "")
    fq = FixedPointBatchNorm.from_bn(m, scale_q=scale_q, shift_q=shift_q, k_hot=o.k_hot, k_hot_code=o.k_hot_code)
    set_module(root, site, fq.train(m.training))
    return Change(site, "fixed-point multiply-add", f"k_hot={o.k_hot} ({o.k_hot_code})" if o.k_hot else "")


def insert_fixed_point_outside(model: nn.Module, outside: list[Outside], scope: Scope = EVERYWHERE, *,
                               bits: int = 8,
                               int_bits: float | None = None, rounding: str = "nearest_even",
                               overflow: str = "saturate", targets: Sequence[str] = TARGETS,
                               per_channel: bool = False, k_hot: int | None = None,
                               k_hot_weights: bool = False, k_hot_code: str = "csd",
                               weight_bits: int | None = None) -> PassResult:
    """The casts that need no graph, on modules no traced region calls: weights and biases, and
    BatchNorms (leaf changes). Activations and residual adds inside an untraceable forward cannot
    be found without its graph: one skip per untraceable module says so."""
    o = _Options(bits, int_bits, rounding, overflow, set(targets), per_channel, k_hot, k_hot_weights, k_hot_code,
                 weight_bits)
    changes: list[Change] = []
    skips: list[Skip] = []
    for site, m, *_ in outside:
        if is_conv_like(m):
            _sort(_cast_weights(m, site, o, scope), changes, skips)
        elif isinstance(m, _BatchNorm) and "norm" in o.targets:
            _sort([_quantize_bn(model, site, m, o, scope)], changes, skips)
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


def freeze_binary_points(gm: fx.GraphModule, scope: Scope = EVERYWHERE) -> PassResult:
    """Deploy step: every trainable binary point becomes a fixed integer (a buffer), K-hot weights
    are baked, and every ``FixedPointBatchNorm`` keeps its fixed-point scale and shift as constants.
    Leaf changes only: the same step serves modules outside traced regions."""
    return _freeze_modules(list(gm.named_modules()), scope)


def freeze_binary_points_outside(model: nn.Module, outside: list[Outside], scope: Scope = EVERYWHERE) -> PassResult:
    """``freeze_binary_points`` on the modules no traced region calls."""
    return _freeze_modules([(o.qualname, o.module) for o in outside], scope)


def _freeze_modules(named: list[tuple[str, nn.Module]], scope: Scope) -> PassResult:
    changes = []
    named, skips = scope.split(named, lambda m: isinstance(m, (FixedPoint, FixedPointBatchNorm))
                               or parametrize.is_parametrized(m))
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
    return PassResult("freeze_binary_points", tuple(changes), skips)


@dataclass(frozen=True)
class FixedPointConfig:
    """Options of ``normfx.fixed_point`` (see it for their meaning). Rounding and overflow names are
    stored as normfx's (an HLS name such as ``"AP_RND_CONV"`` is translated)."""

    bits: int = 8
    int_bits: float | None = None
    rounding: Rounding = "nearest_even"
    overflow: Overflow = "saturate"
    targets: tuple[Target, ...] = TARGETS
    per_channel: bool = False
    k_hot: int | None = None
    k_hot_weights: bool = False
    k_hot_code: KHotCode = "csd"
    fold_bn: bool = False
    weight_bits: int | None = None

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; the targets are {list(TARGETS)}")
        check_int("bits", self.bits, 2, 24)
        if self.weight_bits is not None:
            check_int("weight_bits", self.weight_bits, 2, 24)
        if self.k_hot is not None:
            check_int("k_hot", self.k_hot, 1, 4)
        if self.k_hot_weights and not self.k_hot:
            raise ValueError("k_hot_weights=True needs k_hot=K (the number of signed powers of two)")
        check_choice("k_hot_code", self.k_hot_code, K_HOT_CODES)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "rounding", fixed_mode(self.rounding, "rounding"))
        object.__setattr__(self, "overflow", fixed_mode(self.overflow, "overflow"))


def _steps(c: FixedPointConfig) -> tuple[Step, ...]:
    opts: dict[str, Any] = {f.name: getattr(c, f.name) for f in fields(c) if f.name != "fold_bn"}
    cast = Step("fixed_point", partial(insert_fixed_point, **opts), partial(insert_fixed_point_outside, **opts),
                view="module")
    return (*CONVBN.deploy, cast) if c.fold_bn else (cast,)


def _check(model: nn.Module, _: FixedPointConfig) -> None:
    """A second ``fixed_point`` would wrap calibrated or trained casts in new ones, and a cast on a
    pruned tensor would cast ``<name>_orig`` behind the mask's back: both refused."""
    names = [n for n, m in model.named_modules() if isinstance(m, FixedPoint)]
    if names:
        raise AlreadyTransformedError(
            f"{type(model).__name__} already has fixed-point casts ({len(names)}, e.g. '{names[0]}'): "
            "normfx.fixed_point applies once. Call it on the float model to change the options.")
    for name, m in model.named_modules():
        for hook in pruning_hooks(m).values():
            t = hook._tensor_name
            raise ValueError(
                f"'{name}.{t}' is pruned (torch.nn.utils.prune): normfx.fixed_point casts plain parameters. Call "
                f"torch.nn.utils.prune.remove(model.{name or '<module>'}, {t!r}) on every pruned tensor first "
                "(the pruned entries stay zero)")


FIXED_POINT = Transform(
    name="fixed_point", config=FixedPointConfig, steps=_steps, exact=False, check=_check, tensors="own",
    summary="trainable fixed-point casts (ap_fixed) on weights, activations, BatchNorm and residual adds",
    paper="Dai et al., QFX (2024)",
    deploy=(Step("freeze_binary_points", freeze_binary_points, freeze_binary_points_outside),),
    page="fixed_point.md",
    inspect=(("fixed_point", FixedPointConfig()),),
)
