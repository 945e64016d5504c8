"""QONNX export: every fixed-point cast as a ``Quant`` node (domain ``qonnx.custom_op.general``), the
format hls4ml and FINN read, verified by executing the file with ``qonnx`` itself.

A cast ``ap_fixed<W, I, Q, O>`` is ``Quant(x, scale=2^(I−W), zeropt=0, bitwidth=W)`` with ``signed``,
``narrow`` (``AP_SAT_SYM``: the most negative value dropped) and ``rounding_mode``:

========================  =====================
normfx rounding           QONNX ``rounding_mode``
========================  =====================
``nearest_even``          ``ROUND``
``half_away``             ``HALF_UP`` (ties away from zero)
``half_zero``             ``HALF_DOWN`` (ties toward zero)
``floor``                 ``FLOOR``
``trunc``                 ``DOWN`` (toward zero)
========================  =====================

``Quant`` saturates, so ``saturate`` and ``saturate_sym`` export; ``wrap`` and ``saturate_zero``, the
roundings with ties toward ±∞ (``half_up``, ``half_down``: QONNX has none) and K-hot activation
casts (a table lookup) are refused, naming the cast. Weights keep their float master values behind
their ``Quant`` node, so the file carries the trained binary points.
"""
from __future__ import annotations

import os
from typing import Any

import onnx
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from normfx.errors import ExportError
from normfx.functional import ROUNDING
from normfx.nn.fixed_point import FixedPoint

__all__ = ["QONNX_ROUNDING", "qonnx_refusals", "quant_onnx", "verify_qonnx", "require_qonnx", "hls4ml_config",
           "qonnx_for_hls4ml", "quant_attributes"]

DOMAIN = "qonnx.custom_op.general"
QONNX_ROUNDING = {"nearest_even": "ROUND", "half_away": "HALF_UP", "half_zero": "HALF_DOWN", "floor": "FLOOR",
                  "trunc": "DOWN"}


def require_qonnx() -> Any:
    """The ``qonnx`` package, or an ``ExportError`` naming the extra that installs it."""
    try:
        import qonnx.core.onnx_exec  # noqa: F401
    except ImportError as e:
        raise ExportError("format='qonnx' needs the qonnx package: pip install normfx[fpga]") from e
    import qonnx
    return qonnx


def qonnx_refusals(model: nn.Module, fixed: list[tuple[str, FixedPoint]]) -> list[tuple[str, str]]:
    """The casts of ``model`` QONNX's ``Quant`` cannot express, each with the reason. A deployed
    fixed-point BatchNorm's scale and shift casts no longer run (their values are baked constants)."""
    from normfx.nn.fixed_point_bn import FixedPointBatchNorm

    baked = {id(c) for m in model.modules() if isinstance(m, FixedPointBatchNorm) and m.deployed_scale is not None
             for c in (m.scale_q, m.shift_q)}
    bad = []
    for name, q in fixed:
        if id(q) in baked:
            continue
        if q.rounding not in QONNX_ROUNDING:
            bad.append((name, f"rounds with {q.rounding} (ties toward {'+' if q.rounding == 'half_up' else '-'}∞), "
                              f"which QONNX's rounding modes ({', '.join(QONNX_ROUNDING.values())}) do not include"))
        elif q.overflow not in ("saturate", "saturate_sym"):
            bad.append((name, f"overflows with {q.overflow}; QONNX's Quant saturates"))
        elif q.k_hot:
            bad.append((name, f"projects to {q.k_hot}-hot values (a table lookup, no QONNX op)"))
    return bad


def _quant_op() -> Any:
    from onnx.defs import OpSchema
    from onnxscript import values

    fp = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    schema = OpSchema(
        "Quant", DOMAIN, 1,
        inputs=[fp("X", "T"), fp("scale", "T"), fp("zeropt", "T"), fp("bitwidth", "T")],
        outputs=[fp("Y", "T")], type_constraints=[("T", ["tensor(float)"], "float tensors")],
        attributes=[attr("signed", OpSchema.AttrType.INT, "signed integers"),
                    attr("narrow", OpSchema.AttrType.INT, "narrow range"),
                    attr("rounding_mode", OpSchema.AttrType.STRING, "rounding")])
    return values.Op(values.Opset(DOMAIN, 1), "Quant", op_schema=schema)


def quant_onnx(x, scale, qmin: int, qmax: int, rounding: str, axis: int):
    """ONNX for ``normfx::fixed_point_quant``: one QONNX ``Quant``. A per-channel scale is reshaped to
    broadcast along ``axis`` (QONNX broadcasts as NumPy does)."""
    from onnxscript.onnx_opset import opset21 as op

    signed = qmin < 0
    bits = qmax.bit_length() + (1 if signed else 0)
    narrow = int(signed and qmin == -qmax)
    if scale.shape is not None and len(scale.shape) == 1:
        rank = len(x.shape)
        scale = op.Reshape(scale, op.Constant(value_ints=[-1] + [1] * (rank - 1 - axis)))  # type: ignore[arg-type]
    zero = op.Constant(value_float=0.0)
    width = op.Constant(value_float=float(bits))
    return _quant_op()(x, scale, zero, width, signed=int(signed), narrow=narrow,
                       rounding_mode=QONNX_ROUNDING[rounding])


def verify_qonnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: str, batches: tuple[int, ...]) -> list[str]:
    """Execute the file with ``qonnx`` (``execute_onnx``) at each batch size and compare with
    ``model``'s eval-mode outputs bit for bit; raise ``ExportError`` at the first difference.
    Returns one line per batch size checked."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    from normfx.onnx.verify import grow_batch

    proto = onnx.load(path)
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    lines = []
    for b in batches:
        wrapper = ModelWrapper(_with_batch(proto, b))   # qonnx checks inputs against static shapes
        xs = tuple(grow_batch(x, b) for x in inputs)
        with torch.no_grad():
            refs, _ = tree_flatten(model(*xs))
        got = execute_onnx(wrapper, {n: x.detach().cpu().numpy() for n, x in zip(names_in, xs)})
        for name, ref in zip(names_out, refs):
            out = torch.from_numpy(got[name])
            if out.shape != ref.shape or not torch.equal(out, ref.detach().cpu().to(out.dtype)):
                diff = (out.double() - ref.double()).abs().max().item() if out.shape == ref.shape else float("nan")
                raise ExportError(f"QONNX output '{name}' differs from PyTorch at batch {b} (max abs {diff:.3g}, "
                                  f"shapes {list(out.shape)} vs {list(ref.shape)}) when executed with qonnx")
        lines.append(f"batch {b}")
    return lines


def _with_batch(proto: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy whose symbolic leading dimensions are ``batch``."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for v in (*out.graph.input, *out.graph.output, *out.graph.value_info):
        dims = v.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param"):
            dims[0].dim_value = batch
    return out


# QONNX rounding mode -> Vitis HLS name, through normfx's names (``HALF_EVEN`` is ``ROUND``'s alias)
_HLS_ROUNDING = {**{q: ROUNDING[n] for n, q in QONNX_ROUNDING.items()}, "HALF_EVEN": ROUNDING["nearest_even"]}


def quant_attributes(node: onnx.NodeProto) -> tuple[int, int, str]:
    """A QONNX ``Quant`` node's ``(signed, narrow, rounding_mode)``, with QONNX's defaults."""
    attrs = {a.name: (a.s.decode() if a.type == a.STRING else a.i) for a in node.attribute}
    return int(attrs.get("signed", 1)), int(attrs.get("narrow", 0)), str(attrs.get("rounding_mode", "ROUND"))


def qonnx_for_hls4ml(path: str | os.PathLike | Any, *, channels_last: bool | None = None) -> Any:
    """The QONNX file ``normfx.export(..., format="qonnx")`` wrote, as hls4ml's ONNX front end reads
    it: a ``qonnx.core.modelwrapper.ModelWrapper`` after qonnx's cleanup, its channels-last
    conversion (``channels_last``; by default when the graph has a convolution or pooling), its
    ``GemmToMatMul`` and a second cleanup.

    One more step is normfx's own: a BatchNorm's multiply-add exports as ``Mul``/``Add`` with
    per-channel constants of shape ``[1, C, 1, 1]`` (``[1, 1, 1, C]`` once channels-last), and
    hls4ml 1.3 broadcasts such a constant to the layer's shape *without* the batch dimension
    (``merge_const``: ``np.broadcast_to([1, 1, 1, C], [H, W, C])`` raises). Leading unit
    dimensions of element-wise constants are dropped (``[1, 1, C]``: the same broadcast), so
    BatchNorm and bias adds convert. Values are unchanged.

    Example (needs the ``fpga`` extra)::

        wrapper = normfx.qonnx_for_hls4ml("cnn.qonnx.onnx")
        hls = hls4ml.converters.convert_from_onnx_model(wrapper, hls_config=normfx.hls4ml_config(wrapper),
                                                        io_type="io_stream")
    """
    require_qonnx()
    from onnx import numpy_helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    wrapper = cleanup_model(path if isinstance(path, ModelWrapper) else ModelWrapper(os.fspath(path)))
    if channels_last is None:
        channels_last = any(n.op_type in _SPATIAL for n in wrapper.graph.node)
    if channels_last:
        wrapper = wrapper.transform(ConvertToChannelsLastAndClean())
    wrapper = cleanup_model(wrapper.transform(GemmToMatMul()))
    inits = {i.name: i for i in wrapper.graph.initializer}
    for node in wrapper.graph.node:
        if node.op_type not in ("Mul", "Add", "Sub", "Div"):
            continue
        for name in node.input:
            if name in inits:
                a = numpy_helper.to_array(inits[name])
                while a.ndim > 1 and a.shape[0] == 1:
                    a = a.reshape(a.shape[1:])
                inits[name].CopyFrom(numpy_helper.from_array(a, name))
    return wrapper


_SPATIAL = ("Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ConvTranspose")


def hls4ml_config(model: Any, *, backend: str = "Vitis") -> dict[str, Any]:
    """An hls4ml configuration under which hls4ml computes what the fixed-point model computes.

    ``model``: the QONNX file ``normfx.export(..., format="qonnx")`` wrote, as the
    ``qonnx.core.modelwrapper.ModelWrapper`` given to ``hls4ml.converters.convert_from_onnx_model``
    (after qonnx's cleanup and, for convolutions, its channels-last conversion). It is hls4ml's own
    per-layer configuration (``config_from_onnx_model``, ``granularity="name"``): every layer's
    precision ``auto``, which hls4ml infers from the ``Quant`` nodes — each cast's ``ap_fixed<W, I>``
    with its rounding and saturation, and accumulators wide enough for an exact sum (products'
    widths plus ``log2(fan-in)``, plus the bias). One precision is set here: the model's input (and
    a layout op between it and its cast, such as the channels-last transpose), to the input cast's
    type. hls4ml's default input type, ``ap_fixed<16, 6>`` (truncating),
    would cut the float input to 10 fraction bits before the cast rounds it: a second rounding
    the QFX model does not make, and outputs differ.

    Example (needs qonnx and hls4ml: ``pip install normfx[fpga]``)::

        wrapper = qonnx.util.cleanup.cleanup_model(ModelWrapper("mlp.qonnx.onnx"))
        hls = hls4ml.converters.convert_from_onnx_model(wrapper, hls_config=normfx.hls4ml_config(wrapper))
    """
    import hls4ml
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    config: dict[str, Any] = hls4ml.utils.config_from_onnx_model(model, granularity="name", backend=backend)
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for inp in graph.input:
        if inp.name in inits:
            continue
        path, name = [inp.name], inp.name   # the input and any layout op before its cast
        quant = None
        while quant is None:
            users = [n for n in graph.node if n.input and n.input[0] == name]
            if len(users) != 1 or users[0].op_type not in ("Quant", "Transpose", "Reshape", "Flatten"):
                break
            if users[0].op_type == "Quant":
                quant = users[0]
            else:
                path.append(users[0].name)
                name = users[0].output[0]
        if quant is None:
            continue
        signed, narrow, qrounding = quant_attributes(quant)
        scale, bits = inits.get(quant.input[1]), inits.get(quant.input[3])
        if scale is None or bits is None or scale.size != 1:
            continue
        width = int(bits)
        integer = width + int(round(float(np.log2(float(scale)))))
        kind = "ap_fixed" if signed else "ap_ufixed"
        saturation = "AP_SAT_SYM" if narrow and signed else "AP_SAT"
        rounding = _HLS_ROUNDING[qrounding.upper()]
        for layer in path:
            config["LayerName"].setdefault(layer, {}).setdefault("Precision", {})["result"] = (
                f"{kind}<{width},{integer},{rounding},{saturation}>")
    return config
