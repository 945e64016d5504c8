"""Fixed-point export: QuantizeLinear/DequantizeLinear, bit-exact in ONNX Runtime, and the modes ONNX
cannot express."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import normfx
from normfx.nn import FixedPoint, FixedPointBatchNorm
from tests.test_fixed_point import XQ, _net


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("make,x,bits,kw", [
    (_net, XQ, 6, dict(k_hot=2, k_hot_weights=True)),
    (_net, XQ, 12, {}),
    (_mlp, torch.randn(8, 12), 8, dict(per_channel=True)),
], ids=["cnn_bn_add_6bit_2hot", "cnn_bn_add_12bit_int16", "mlp_8bit_per_channel"])
def test_export_is_bit_exact_in_onnx_runtime(make, x, bits, kw, tmp_path):

    import onnx

    q = normfx.fixed_point(make().eval(), bits=bits, **kw).eval()
    normfx.calibrate(q, [x])
    path = tmp_path / "q.onnx"
    report = normfx.export(q, x, path, rtol=0.0, atol=0.0)      # raises on any difference
    assert report.verified and all(o.max_abs == 0.0 for o in report.outputs)
    counts = report.op_counts
    named = [(n, m) for n, m in normfx.deploy(q).named_modules() if isinstance(m, FixedPoint)]
    casts = [m for _, m in named]
    n_bn = sum(isinstance(m, FixedPointBatchNorm) for m in q.modules())
    n_add = sum(n.endswith("_in") for n, _ in named)  # one cast, called on both inputs of an add
    # every cast is one QuantizeLinear per call (besides those that read a layer's input integers
    # again behind a value-keeping op); BN scale/shift are baked into constants at deploy
    proto = onnx.load(str(path))
    rereads = sum(n.op_type == "QuantizeLinear" and n.output[0].startswith("_normfx_exact_xq")
                  for n in proto.graph.node)
    assert counts["QuantizeLinear"] - rereads == len(casts) - 2 * n_bn + n_add
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in q.modules())
    exact = f"exact integer sums: {layers if bits <= 8 else 0} of {layers} conv/linear layers"
    assert exact in report.summary()
    assert counts.get("ConvInteger", 0) + counts.get("MatMulInteger", 0) == (layers if bits <= 8 else 0)
    q_types = {n.output[0]: n for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    assert q_types
    side = json.loads((tmp_path / "q.fixed_point.json").read_text())
    assert len(side["tensors"]) == len(casts)
    types = {t["tensor"]: t for t in side["tensors"]}
    first = "0.weight" if make is _mlp else "conv1.weight"
    assert types[first]["layer"] == first.split(".")[0]
    assert all(t["rounding"] == "AP_RND_CONV" and t["overflow"] == "AP_SAT" for t in side["tensors"])
    assert "verified with ONNX Runtime's graph optimizations at BASIC" in report.summary()


def test_modes_onnx_cannot_express_refuse_but_write_the_json(tmp_path):
    q = normfx.fixed_point(_mlp().eval(), bits=8, rounding="floor", overflow="wrap").eval()
    normfx.calibrate(q, [torch.randn(4, 12)])
    with pytest.raises(normfx.ExportError, match=r"rounds with floor \(AP_TRN\) and overflows with wrap \(AP_WRAP\)"):
        normfx.export(q, torch.randn(4, 12), tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()
    side = (tmp_path / "q.fixed_point.json").read_text()
    assert "ap_fixed<8, " in side and "AP_TRN, AP_WRAP>" in side
