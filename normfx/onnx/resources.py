"""What a fixed-point model costs in hardware, read from its QONNX file: per layer, the multiplies,
the bit operations (EBOPs as HGQ defines them: over every multiply, the product of its operands'
bit widths) and the shift-and-add terms that replace the multipliers by constants.

A layer here is a ``Conv``, ``MatMul``/``Gemm`` with a constant (weight) operand, or an element-wise
``Mul`` by a constant (a fixed-point BatchNorm's scale, baked by ``deploy``). Its variable operand's
width is the ``Quant`` node that produced it (through layout ops, ``Relu`` and pooling, which keep
the values on the cast's grid); a float operand (no cast upstream) is counted at 32 bits and
listed. Per multiply, per sample:

* ``bops``: variable width × the constant's declared width (its ``Quant``'s bit width; for a baked
  constant, the widest value's effective width);
* ``ebops``: variable width × the constant's *effective* width: the bits from its highest to its
  lowest set bit on its grid, plus a sign bit when the tensor has negative values. A zero is no
  multiply (0), a power of two is a shift (1 bit, or 2 with the sign), which is what a synthesized
  constant multiply costs and what the word-length choice changes;
* ``terms``: the signed powers of two the constant needs (non-zero digits of its canonical signed
  digit form): a multiplier-free layer computes each product as that many shifted copies of the
  variable, added (``terms − 1`` adders per multiply). With K-hot weights or BatchNorm scales each
  constant has at most K.

Sums, bias adds and activations are not counted (the accumulators' widths are in hls4ml's config).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from normfx.functional import k_hot_terms

__all__ = ["LayerCost", "ResourceEstimate", "resource_estimate"]

# ops that pass a cast's values on unchanged (its grid and width)
_KEEPS_GRID = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Relu", "MaxPool", "Identity",
               "GlobalMaxPool", "Pad", "Concat", "Split", "Slice")
FLOAT_BITS = 32


@dataclass(frozen=True)
class LayerCost:
    """One layer's multiplies and bit operations, per sample."""

    name: str
    """The ONNX node."""
    op: str
    multiplies: int
    """Multiplies by a non-zero constant, per sample."""
    input_bits: int
    """The variable operand's width (32 when it is float: no cast upstream)."""
    weight_bits: int
    """The constant's declared width."""
    bops: int
    ebops: int
    terms: int
    """Signed powers of two over all multiplies (shift-and-add terms)."""


@dataclass(frozen=True)
class ResourceEstimate:
    """Per-layer costs of a QONNX file and their totals (``normfx.resource_estimate``)."""

    layers: tuple[LayerCost, ...]
    float_inputs: tuple[str, ...] = ()
    """Layers whose variable operand has no cast upstream (counted at 32 bits)."""

    @property
    def ebops(self) -> int:
        return sum(c.ebops for c in self.layers)

    @property
    def bops(self) -> int:
        return sum(c.bops for c in self.layers)

    @property
    def multiplies(self) -> int:
        return sum(c.multiplies for c in self.layers)

    @property
    def terms(self) -> int:
        return sum(c.terms for c in self.layers)

    def summary(self) -> str:
        """A table: one row per layer and the total."""
        head = f"{'layer':<24}{'op':<8}{'mults':>10}{'in bits':>8}{'w bits':>7}{'BOPs':>12}{'EBOPs':>12}{'terms':>10}"
        rows = [head] + [
            f"{c.name[:23]:<24}{c.op:<8}{c.multiplies:>10}{c.input_bits:>8}{c.weight_bits:>7}{c.bops:>12}"
            f"{c.ebops:>12}{c.terms:>10}" for c in self.layers]
        rows.append(f"{'total':<24}{'':<8}{self.multiplies:>10}{'':>8}{'':>7}{self.bops:>12}{self.ebops:>12}"
                    f"{self.terms:>10}")
        if self.float_inputs:
            rows.append(f"float inputs (counted at {FLOAT_BITS} bits): {', '.join(self.float_inputs)}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()


def _mantissas(values: np.ndarray, step: float | None) -> np.ndarray:
    """Each value as an integer on its grid: ``values / step``, or (no grid known) the value's
    float mantissa, which has the same odd part."""
    v = values.astype(np.float64)
    if step is not None:
        return np.rint(v / step).astype(np.int64)
    m, _ = np.frexp(v)
    return np.rint(m * 2.0**53).astype(np.int64)


def _odd_width(n: np.ndarray) -> np.ndarray:
    """Bits from the highest to the lowest set bit of ``|n|`` (0 for 0)."""
    a = np.abs(n)
    out = np.zeros(a.shape, dtype=np.int64)
    nz = a != 0
    odd = a[nz]
    odd = odd // (odd & -odd)           # trailing zeros removed: a shift
    out[nz] = np.floor(np.log2(odd.astype(np.float64))).astype(np.int64) + 1
    return out


def _constant(wrapper: Any, name: str) -> tuple[np.ndarray, int | None, float | None] | None:
    """A constant operand's values (quantized when a ``Quant`` node casts it), its declared width
    and grid step; ``None`` when ``name`` is not constant."""
    from qonnx.custom_op.general.quant import quant

    from normfx.onnx.qonnx import quant_attributes

    init = wrapper.get_initializer(name)
    if init is not None:
        return np.asarray(init), None, None
    node = wrapper.find_producer(name)
    if node is None or node.op_type != "Quant":
        return None
    x, scale, zero, bits = (wrapper.get_initializer(i) for i in node.input)
    if x is None or scale is None or zero is None or bits is None:
        return None
    signed, narrow, rounding = quant_attributes(node)
    q = quant(np.asarray(x), np.asarray(scale), np.asarray(zero), np.asarray(bits), signed, narrow, rounding)
    step = float(np.asarray(scale).reshape(-1)[0]) if np.asarray(scale).size == 1 else None
    return np.asarray(q), int(np.asarray(bits)), step


def _variable_bits(wrapper: Any, name: str) -> int | None:
    """The width of the ``Quant`` node upstream of ``name`` through grid-keeping ops."""
    node = wrapper.find_producer(name)
    while node is not None and node.op_type in _KEEPS_GRID:
        node = wrapper.find_producer(node.input[0])
    if node is None or node.op_type != "Quant":
        return None
    bits = wrapper.get_initializer(node.input[3])
    return None if bits is None else int(np.asarray(bits))


def _per_sample(shape: list[int] | None) -> int:
    return int(np.prod(shape[1:])) if shape else 0


def resource_estimate(model: str | os.PathLike | Any) -> ResourceEstimate:
    """Per-layer multiplies, BOPs, EBOPs and shift-and-add terms of a QONNX file (a path or a
    ``qonnx`` ``ModelWrapper``), per sample; see the module docstring for what each counts.

    Example (needs qonnx: ``pip install normfx[fpga]``)::

        report = normfx.export(q, x, "mlp.qonnx.onnx", format="qonnx")
        print(report.resources)                              # the same as:
        print(normfx.resource_estimate("mlp.qonnx.onnx"))
    """
    from normfx.onnx.qonnx import require_qonnx

    require_qonnx()
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_shapes import InferShapes

    wrapper = model if isinstance(model, ModelWrapper) else ModelWrapper(os.fspath(model))
    wrapper = wrapper.transform(InferShapes())
    layers, floats = [], []
    for node in wrapper.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm", "Mul"):
            continue
        const = next(((i, c) for i, c in ((i, _constant(wrapper, n)) for i, n in enumerate(node.input[:2]))
                      if c is not None), None)
        if const is None:
            continue                     # two variable operands: not a layer with weights
        index, (values, declared, step) = const
        if node.op_type != "Mul" and index != 1:
            continue                     # a constant left operand of a matmul: not a weight layer
        var = node.input[1 - index]
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            values = values.T
        # how many times each constant multiplies, per sample (the same for every constant of a layer)
        out = _per_sample(wrapper.get_tensor_shape(node.output[0]))
        if node.op_type == "Conv":       # once per output position of its output channel
            reuse = out // values.shape[0]
        elif node.op_type in ("MatMul", "Gemm"):   # once per row (position) of the input
            reuse = _per_sample(wrapper.get_tensor_shape(var)) // values.shape[0]
        else:                            # element-wise: once per element of its broadcast group
            reuse = out // max(values.size, 1)
        n = _mantissas(values, step)
        width = _odd_width(n) + (1 if (values < 0).any() else 0) * (n != 0)
        bits = _variable_bits(wrapper, var)
        if bits is None:
            floats.append(node.name)
            bits = FLOAT_BITS
        declared = declared if declared is not None else int(width.max(initial=0))
        multiplies = reuse * int((n != 0).sum())
        terms = int(k_hot_terms(torch.from_numpy(n), 1.0, "csd").sum())
        layers.append(LayerCost(node.name, node.op_type, multiplies, bits, declared, multiplies * bits * declared,
                                reuse * int(width.sum()) * bits, reuse * terms))
    return ResourceEstimate(tuple(layers), tuple(floats))
