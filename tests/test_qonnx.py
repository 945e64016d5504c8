"""Issue 25.3: ``normfx.export(..., format="qonnx")`` writes every fixed-point cast as a QONNX ``Quant``
node and verifies the file bit for bit by executing it with qonnx; what QONNX cannot express is
refused, naming the cast."""
from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
import torch.nn as nn

import normfx
from normfx.nn import FixedPoint
from normfx.onnx.qonnx import QONNX_ROUNDING
from tests.test_fixed_point import XQ, _net

pytest.importorskip("qonnx", reason="the QONNX export needs qonnx (pip install normfx[fpga])")
onnx = pytest.importorskip("onnx")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


CASES = [
    ("nearest_even", "saturate", {}),
    ("floor", "saturate", dict(per_channel=True)),
    ("half_away", "saturate_sym", {}),
    ("half_zero", "saturate", dict(k_hot=2, k_hot_weights=True)),   # K-hot weights and BN scales: baked
    ("trunc", "saturate_sym", dict(per_channel=True)),
]


@pytest.mark.parametrize("rounding,overflow,kw", CASES, ids=[f"{r}-{o}" for r, o, _ in CASES])
@pytest.mark.parametrize("make,x", [(_net, XQ), (_mlp, torch.randn(8, 12))], ids=["cnn_bn_add", "mlp"])
def test_qonnx_round_trip_is_bit_exact(make, x, rounding, overflow, kw, tmp_path):
    q = normfx.fixed_point(make().eval(), bits=6, rounding=rounding, overflow=overflow, **kw).eval()
    normfx.calibrate(q, [x], progress=False)
    path = tmp_path / "q.onnx"
    report = normfx.export(q, x, path, format="qonnx")       # raises unless qonnx gives PyTorch's bits
    assert "executed with qonnx at batch" in report.summary() and "bit for bit" in report.summary()
    proto = onnx.load(str(path))
    ops = Counter((n.domain, n.op_type) for n in proto.graph.node)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {t for _, t in ops}
    deployed = normfx.deploy(q)
    calls = len([m for m in deployed.modules() if isinstance(m, FixedPoint)])
    bn = sum(isinstance(m, normfx.nn.FixedPointBatchNorm) for m in q.modules())
    adds = sum(n.endswith("_in") for n, m in deployed.named_modules() if isinstance(m, FixedPoint))
    assert ops[("qonnx.custom_op.general", "Quant")] == calls - 2 * bn + adds   # weights' casts included
    quants = [n for n in proto.graph.node if n.op_type == "Quant"]
    expected = QONNX_ROUNDING[rounding]
    assert {a.s.decode() for n in quants for a in n.attribute if a.name == "rounding_mode"} == {expected}
    narrow = {a.i for n in quants for a in n.attribute if a.name == "narrow"}
    signed = {a.i for n in quants for a in n.attribute if a.name == "signed"}
    assert narrow == ({0, 1} if overflow == "saturate_sym" else {0})   # unsigned casts are never narrow
    assert signed == {0, 1}


@pytest.mark.parametrize("rounding,overflow,why", [
    ("nearest_even", "wrap", "overflows with wrap; QONNX's Quant saturates"),
    ("nearest_even", "saturate_zero", "overflows with saturate_zero"),
    ("half_up", "saturate", r"rounds with half_up \(ties toward \+∞\)"),
    ("half_down", "saturate", r"rounds with half_down \(ties toward -∞\)"),
])
def test_inexpressible_casts_are_refused_and_nothing_is_written(rounding, overflow, why, tmp_path):
    q = normfx.fixed_point(_mlp().eval(), bits=6, rounding=rounding, overflow=overflow).eval()
    normfx.calibrate(q, [torch.randn(8, 12)], progress=False)
    with pytest.raises(normfx.ExportError, match=rf"FixedPoint '.+' {why}.*cannot be written as QONNX Quant"):
        normfx.export(q, torch.randn(8, 12), tmp_path / "q.onnx", format="qonnx")
    assert not (tmp_path / "q.onnx").exists() and (tmp_path / "q.fixed_point.json").exists()


def test_k_hot_activation_casts_are_refused(tmp_path):
    q = normfx.fixed_point(_mlp().eval(), bits=6, targets=("activation",)).eval()
    normfx.calibrate(q, [torch.randn(8, 12)], progress=False)
    next(m for m in q.modules() if isinstance(m, FixedPoint)).k_hot = 2
    with pytest.raises(normfx.ExportError, match="projects to 2-hot values"):
        normfx.export(q, torch.randn(8, 12), tmp_path / "q.onnx", format="qonnx")


def test_qonnx_needs_a_fixed_point_model_and_the_package(tmp_path, monkeypatch):
    with pytest.raises(normfx.ExportError, match="has none"):
        normfx.export(_mlp().eval(), torch.randn(2, 12), tmp_path / "f.onnx", format="qonnx")
    monkeypatch.setitem(sys.modules, "qonnx.core.onnx_exec", None)   # as if qonnx were not installed
    q = normfx.fixed_point(_mlp().eval(), bits=6).eval()
    with pytest.raises(normfx.ExportError, match=r"needs the qonnx package: pip install normfx\[fpga\]"):
        normfx.export(q, torch.randn(2, 12), tmp_path / "q.onnx", format="qonnx")
