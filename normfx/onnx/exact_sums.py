"""Exact sums in an exported fixed-point graph: each Conv, Gemm or MatMul whose input and weight
come from 8-bit DequantizeLinear nodes becomes an integer kernel (ConvInteger / MatMulInteger,
int32 accumulation), scaled by ``s_x·s_w`` and biased in float64, then rounded to float32 once.

That is the value PyTorch computes for a layer with ``normfx.nn.exact_sums`` (its sum in float64,
exact while ``|Σ| < 2^53·s_x·s_w``) and what integer hardware computes before the next cast; ONNX
Runtime's float Conv would sum the same products in its own order, and past ``2^24·s_x·s_w`` that
order shows in the last bit. The rewrite needs:

* the weight: ``DequantizeLinear`` of an int8/uint8 tensor (per tensor or per output channel), or a
  ``Transpose`` of one;
* the input: ``DequantizeLinear`` of an int8/uint8 tensor with a scalar scale, possibly behind ops
  that keep values (``MaxPool``, ``Reshape``, ``Flatten``, ``Transpose``, ``Squeeze``,
  ``Unsqueeze``, ``Identity``): the integers are read again with ``QuantizeLinear`` at that scale,
  which is exact for values on the grid;
* zero points of 0 (normfx's casts), and for MatMul a bias ``Add`` of a 1-D tensor, folded in.

A layer that does not match keeps its float kernel and is listed with the reason.

A cast of a cast (a BatchNorm's output cast, then the residual add's input cast) rounds twice;
ONNX Runtime's ``DoubleQDQPairsRemover`` (on at its default and ``BASIC`` levels) merges
``Q → DQ → Q → DQ`` into one ``Q → DQ`` with a scale of its own, which rounds once, at another
step. Each such inner ``DequantizeLinear`` is written as ``Cast → Mul`` (the same value:
``q · s``), which the optimizer leaves alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["ExactSumsResult", "exact_integer_sums"]

_KEEP_VALUES = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
_INT8 = (TensorProto.INT8, TensorProto.UINT8)
# int32 accumulation: |Σ| ≤ fan_in · 255 · 128 must stay below 2^31.
_MAX_FAN_IN = (2 ** 31 - 1) // (255 * 128)


@dataclass
class ExactSumsResult:
    """What ``exact_integer_sums`` did: the layers (node names) it rewrote, and those it left, why."""

    rewritten: list[str] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)
    requantizations: int = 0
    """Casts of casts whose inner DequantizeLinear became ``Cast → Mul``."""

    def summary(self) -> str:
        total = len(self.rewritten) + len(self.left)
        text = f"exact integer sums: {len(self.rewritten)} of {total} conv/linear layers"
        if self.requantizations:
            text += f", {self.requantizations} casts of casts kept as two roundings"
        if self.left:
            text += "; float sums in " + "; ".join(f"{n} ({why})" for n, why in self.left[:3])
            text += f" and {len(self.left) - 3} more" if len(self.left) > 3 else ""
        return text


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in self.graph.initializer}
        inferred = onnx.shape_inference.infer_shapes(model)
        self.types = {v.name: v.type.tensor_type.elem_type
                      for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
        self.shapes: dict[str, list[int | None]] = {
            v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
            if v.type.tensor_type.HasField("shape")}
        for i in self.graph.initializer:
            self.types[i.name] = i.data_type
            self.shapes[i.name] = list(i.dims)
        self.ranks = {k: len(v) for k, v in self.shapes.items()}
        self.count = 0

    def dtype(self, name: str) -> int:
        n = self.producer.get(name)
        if name not in self.types and n is not None and n.op_type == "Constant":
            self.types[name] = n.attribute[0].t.data_type
        return self.types.get(name, TensorProto.UNDEFINED)

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant" and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"_normfx_exact_{stem}_{self.count}"


@dataclass
class _Dequant:
    """An int8/uint8 tensor ``q`` and its scale: the float tensor is ``q · scale``."""

    q: str
    scale: str
    axis: int
    per_channel: bool


def _dequant(g: _Graph, name: str) -> tuple[_Dequant | None, str]:
    n = g.producer.get(name)
    if n is None or n.op_type != "DequantizeLinear":
        return None, "not a fixed-point tensor"
    if g.dtype(n.input[0]) not in _INT8:
        return None, "wider than 8 bits (no 8-bit integer kernel)"
    if len(n.input) > 2 and n.input[2]:
        zp = g.constant(n.input[2])
        zp_node = g.producer.get(n.input[2])
        if zp is None and (zp_node is None or zp_node.op_type != "Cast"):   # normfx writes Cast(scale·0)
            return None, "zero point unknown"
        if zp is not None and np.any(zp != 0):
            return None, "non-zero zero point"
    axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
    scale_rank = g.ranks.get(n.input[1], 0)
    return _Dequant(n.input[0], n.input[1], axis, scale_rank == 1), ""


def _input(g: _Graph, name: str) -> tuple[_Dequant | None, str, bool]:
    """The fixed-point tensor behind a layer's input (through value-keeping ops), and whether the
    layer's input is that tensor's own dequantization (else its integers are read again)."""
    direct = True
    while True:
        n = g.producer.get(name)
        if n is None:
            return None, "its input is not a fixed-point tensor", False
        if n.op_type == "DequantizeLinear":
            d, why = _dequant(g, name)
            if d is not None and d.per_channel:
                return None, "its input has per-channel scales", False
            return d, why and f"its input is {why}", direct
        if n.op_type not in _KEEP_VALUES:
            return None, f"its input comes from {n.op_type}, not a fixed-point cast", False
        name, direct = n.input[0], False


def _weight(g: _Graph, name: str) -> tuple[_Dequant | None, str, bool]:
    """The weight's fixed-point tensor, and whether it is transposed on its way to the layer."""
    n = g.producer.get(name)
    if n is not None and n.op_type == "Transpose":
        d, why = _dequant(g, n.input[0])
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        if d is not None and perm not in (None, [1, 0]):
            return None, "its weight is permuted", False
        return d, why and f"its weight is {why}", True
    d, why = _dequant(g, name)
    return d, why and f"its weight is {why}", False


def exact_integer_sums(path: str) -> ExactSumsResult:
    """Rewrite the ONNX file at ``path`` in place (see the module docstring) and say what changed."""
    model = onnx.load(path)
    g = _Graph(model)
    result = ExactSumsResult()
    new_nodes: list[onnx.NodeProto] = []
    removed: set[int] = set()
    for node in list(g.graph.node):
        if id(node) in removed:
            continue
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            new_nodes.append(node)
            continue
        label = node.name or node.output[0]
        made, why = _rewrite(g, node, removed)
        if made is None:
            result.left.append((label, why))
            new_nodes.append(node)
        else:
            result.rewritten.append(label)
            new_nodes.extend(made)
    del g.graph.node[:]
    g.graph.node.extend(new_nodes)   # a bias Add folded into its MatMul comes later: it was skipped
    result.requantizations = _keep_double_roundings(g)
    onnx.save(model, path)
    return result


def _rewrite(g: _Graph, node: onnx.NodeProto, removed: set[int]) -> tuple[list[onnx.NodeProto] | None, str]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x, why, direct = _input(g, node.input[0])
    if x is None:
        return None, why
    w, why, transposed = _weight(g, node.input[1])
    if w is None:
        return None, why
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out = node.output[0]
    w_shape = g.shapes.get(w.q)
    w_rank = len(w_shape) if w_shape is not None else 0
    if node.op_type == "Conv":
        if transposed:
            return None, "its weight is transposed"
        if w.per_channel and w.axis != 0:
            return None, "its weight's scales are not per output channel"
        fan_in = _product(w_shape[1:]) if w_shape else None
    else:
        if node.op_type == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                return None, "Gemm with transA, alpha or beta"
            transposed = transposed != bool(attrs.get("transB", 0))
        if w_rank != 2:
            return None, "its weight is not a matrix"
        # the output axis of the weight as the kernel reads it must be the scales' axis
        if w.per_channel and w.axis != (0 if transposed else 1):
            return None, "its weight's scales are not per output feature"
        fan_in = w_shape[1 if transposed else 0] if w_shape else None
        if node.op_type == "MatMul":
            users = g.consumers.get(out, [])
            if len(users) == 1 and users[0].op_type == "Add" and out not in {o.name for o in g.graph.output}:
                add = users[0]
                other = add.input[1] if add.input[0] == out else add.input[0]
                if g.ranks.get(other) == 1:
                    bias, out = other, add.output[0]
                    removed.add(id(add))
    if fan_in is not None and fan_in > _MAX_FAN_IN:
        return None, f"fan-in {fan_in} could overflow int32"
    made: list[onnx.NodeProto] = []
    xq = x.q
    if not direct:
        xq = g.fresh("xq")
        zero = g.fresh("zero")
        made.append(helper.make_node("Constant", [], [zero], value=helper.make_tensor(zero, g.dtype(x.q), [], [0])))
        made.append(helper.make_node("QuantizeLinear", [node.input[0], x.scale, zero], [xq]))
    wq = w.q
    if transposed:
        wq = g.fresh("wT")
        made.append(helper.make_node("Transpose", [w.q], [wq], perm=[1, 0]))
    acc = g.fresh("acc")
    if node.op_type == "Conv":
        keep = {k: v for k, v in attrs.items() if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads",
                                                         "strides")}
        made.append(helper.make_node("ConvInteger", [xq, wq], [acc], **keep))
    else:
        made.append(helper.make_node("MatMulInteger", [xq, wq], [acc]))
    # float64: int32 → double, times s_x·s_w (powers of two), plus the bias: all exact
    names = {k: g.fresh(k) for k in ("acc64", "sx", "sw", "s", "y64")}
    made += [helper.make_node("Cast", [acc], [names["acc64"]], to=TensorProto.DOUBLE),
             helper.make_node("Cast", [x.scale], [names["sx"]], to=TensorProto.DOUBLE),
             helper.make_node("Cast", [w.scale], [names["sw"]], to=TensorProto.DOUBLE),
             helper.make_node("Mul", [names["sx"], names["sw"]], [names["s"]])]
    scale = names["s"]
    spatial = (w_rank - 2) if node.op_type == "Conv" else 0
    if spatial and w.per_channel:
        scale = _per_channel(g, made, scale, spatial)
    made.append(helper.make_node("Mul", [names["acc64"], scale], [names["y64"]]))
    y = names["y64"]
    if bias is not None:
        b64 = g.fresh("b64")
        made.append(helper.make_node("Cast", [bias], [b64], to=TensorProto.DOUBLE))
        if spatial:
            b64 = _per_channel(g, made, b64, spatial)
        y2 = g.fresh("y64b")
        made.append(helper.make_node("Add", [y, b64], [y2]))
        y = y2
    made.append(helper.make_node("Cast", [y], [out], to=TensorProto.FLOAT, name=node.name))
    return made, ""


def _keep_double_roundings(g: _Graph) -> int:
    """Every QuantizeLinear fed by a DequantizeLinear reads ``Cast(q) · s`` instead (see the module
    docstring); a DequantizeLinear left without users is dropped."""
    producer = {o: n for n in g.graph.node for o in n.output}
    nodes: list[onnx.NodeProto] = []
    count = 0
    for n in g.graph.node:
        src = producer.get(n.input[0]) if n.op_type == "QuantizeLinear" else None
        if src is not None and src.op_type == "DequantizeLinear" and not _per_axis(g, src):
            f, v = g.fresh("int"), g.fresh("deq")
            nodes += [helper.make_node("Cast", [src.input[0]], [f], to=TensorProto.FLOAT),
                      helper.make_node("Mul", [f, src.input[1]], [v])]
            n.input[0] = v
            count += 1
        nodes.append(n)
    used = {i for n in nodes for i in n.input} | {o.name for o in g.graph.output}
    nodes = [n for n in nodes if n.op_type != "DequantizeLinear" or any(o in used for o in n.output)]
    del g.graph.node[:]
    g.graph.node.extend(nodes)
    return count


def _per_axis(g: _Graph, dq: onnx.NodeProto) -> bool:
    """Scales per channel (``Cast → Mul`` would need them reshaped along the axis: left as it is)."""
    return g.ranks.get(dq.input[1], 0) == 1


def _product(dims: list[int | None]) -> int | None:
    total = 1
    for d in dims:
        if d is None:
            return None
        total *= d
    return total


def _per_channel(g: _Graph, made: list[onnx.NodeProto], name: str, spatial: int) -> str:
    """``name`` ([C]) reshaped to [C, 1, ...] so it broadcasts over a conv output's channels."""
    shape, out = g.fresh("shape"), g.fresh("bc")
    dims = helper.make_tensor(shape, TensorProto.INT64, [spatial + 1], [-1] + [1] * spatial)
    made.append(helper.make_node("Constant", [], [shape], value=dims))
    made.append(helper.make_node("Reshape", [name, shape], [out]))
    return out
