"""Fixed-point export: each ``FixedPoint`` cast as QuantizeLinear/DequantizeLinear (int8/uint8 up to 8
bits, int16/uint16 above), the HLS sidecar JSON with every cast's ``ap_fixed<W, I, Q, O>`` type and
the tensor and layer it casts (read from the metadata the pass stored on the cast), and the modes
ONNX cannot express refused with the JSON still written."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch.nn as nn

from normfx.errors import ExportError
from normfx.functional import OVERFLOW, ROUNDING
from normfx.nn.fixed_point import FixedPoint

__all__ = ["fixed_point_casts", "cast_site", "write_fixed_point_json", "fixed_point_export_settings", "qdq_onnx"]

Exporter = Literal["auto", "dynamo", "torchscript"]


def fixed_point_casts(model: nn.Module) -> list[tuple[str, FixedPoint]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FixedPoint)]


def cast_site(name: str, q: FixedPoint) -> tuple[str, str]:
    """``(tensor, layer)`` a cast belongs to, from the site the pass stored on it (``q.site``) and the
    module that holds it now (its parametrized layer, its BatchNorm, or its region)."""
    holder = name.partition(".parametrizations.")[0] if ".parametrizations." in name else name.rpartition(".")[0]
    if q.site is None:   # a cast normfx did not insert: its own name is all there is
        return name, holder
    role, local = q.site
    layer = ".".join(x for x in (holder, local) if x)
    if role in ("output", "inputs"):
        return f"{local} {'output' if role == 'output' else 'inputs'}", layer
    return f"{layer}.{role}", layer


def write_fixed_point_json(fixed: list[tuple[str, FixedPoint]], target: Path) -> Path:
    """The HLS sidecar: every cast's ``ap_fixed<W, I, Q, O>`` type with its tensor and layer."""
    tensors = []
    for name, q in fixed:
        tensor, layer = cast_site(name, q)
        types = q.hls_types()
        tensors.append({
            "tensor": tensor, "layer": layer, "module": name,
            "type": types[0] if len(types) == 1 else types,
            "bits": q.bits, "int_bits": [int(i) for i in q.integer_bits().reshape(-1).tolist()],
            "signed": q.signed, "rounding": ROUNDING[q.rounding], "overflow": OVERFLOW[q.overflow],
            "onnx": q.onnx_expressible,
        })
    path = target.with_name(target.stem + ".fixed_point.json")
    path.write_text(json.dumps({"format": "normfx.fixed_point", "version": 1, "onnx": target.name,
                                "tensors": tensors}, indent=1))
    return path


def fixed_point_export_settings(fixed, exporter: Exporter, opset: int | None, json_path: Path):
    bad = [(n, q) for n, q in fixed if not q.onnx_expressible]
    if bad:
        n, q = bad[0]
        raise ExportError(
            f"FixedPoint '{n}' rounds with {q.rounding} ({ROUNDING[q.rounding]}) and overflows with "
            f"{q.overflow} ({OVERFLOW[q.overflow]}); ONNX QuantizeLinear only rounds half to even and "
            f"saturates, so {len(bad)} cast(s) cannot be written as QuantizeLinear/DequantizeLinear. "
            f"Use rounding='nearest_even' with overflow='saturate' or 'saturate_sym' to export; the HLS "
            f"types were written to {json_path}."
        )
    if exporter == "torchscript":
        raise ExportError("fixed-point models export with the dynamo exporter (exporter='dynamo' or 'auto')")
    if opset is not None and opset < 21:
        raise ExportError(f"fixed-point casts are written with opset 21 (int16 QuantizeLinear for 9-16 bits), "
                          f"got opset={opset}")
    return "dynamo", 21


def qdq_onnx(x, scale, qmin: int, qmax: int, axis: int):
    """ONNX for ``normfx::fixed_point_qdq``: QuantizeLinear (zero point 0) -> DequantizeLinear, with
    int8/uint8 containers up to 8 bits and int16/uint16 above. A range narrower than its container
    is clamped in float first (``clamp(round(x/s)) == round(clamp(x, qmin·s, qmax·s)/s)`` for integer
    bounds; ONNX Runtime has no int16 Clip)."""
    from onnxscript import ir  # only a fixed-point export needs onnxscript (a slow import)
    from onnxscript.onnx_opset import opset21 as op

    if qmin >= -128 and qmax <= 127:
        dt, full = ir.DataType.INT8, (-128, 127)
    elif qmin >= 0 and qmax <= 255:
        dt, full = ir.DataType.UINT8, (0, 255)
    elif qmin >= -32768 and qmax <= 32767:
        dt, full = ir.DataType.INT16, (-32768, 32767)
    else:
        dt, full = ir.DataType.UINT16, (0, 65535)
    if (qmin, qmax) != full:
        lo = op.Mul(scale, op.Constant(value_float=float(qmin)))
        hi = op.Mul(scale, op.Constant(value_float=float(qmax)))
        per_axis = scale.shape is not None and len(scale.shape) == 1
        if per_axis:  # Clip takes scalar bounds only: per-channel bounds broadcast through Max/Min
            rank = len(x.shape)
            shape = op.Constant(value_ints=[-1] + [1] * (rank - 1 - axis))
            x = op.Min(op.Max(x, op.Reshape(lo, shape)), op.Reshape(hi, shape))  # type: ignore[arg-type]
        else:
            x = op.Clip(x, lo, hi)
    zero = op.Cast(op.Mul(scale, op.Constant(value_float=0.0)), to=dt)
    # onnxscript types these ops for scripted functions; the dtypes are right at run time.
    q = op.QuantizeLinear(x, scale, zero, axis=axis)  # type: ignore[type-var]
    return op.DequantizeLinear(q, scale, zero, axis=axis)  # type: ignore[type-var]
