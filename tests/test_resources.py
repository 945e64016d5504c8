"""Issue 25.4: the resource estimate (multiplies, BOPs, EBOPs, shift-and-add terms) of hand-computed
layers, read from the QONNX file, and in the export report."""
from __future__ import annotations

import torch
import torch.nn as nn

import normfx
from normfx.functional import k_hot_terms
from normfx.onnx.resources import _odd_width

import numpy as np
import pytest

pytest.importorskip("qonnx", reason="needs qonnx (pip install normfx[fpga])")

# ap_fixed<4, 1>: step 1/8; as integers 4, -6, 0 | 1, 3, 7
WEIGHT = [[0.5, -0.75, 0.0], [0.125, 0.375, 0.875]]


def _linear() -> nn.Module:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(WEIGHT))
        model.bias.zero_()
    return model


def test_widths_and_terms_of_integers():
    n = np.array([0, 1, -1, 2, 3, 6, 7, -6, 12, 255])
    assert _odd_width(n).tolist() == [0, 1, 1, 1, 2, 2, 3, 2, 2, 8]
    # 7 = 8 - 1, 6 = 8 - 2, 255 = 256 - 1, 3 = 4 - 1: canonical signed digits
    assert k_hot_terms(torch.from_numpy(n), 1.0, "csd").tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 2, 2]


def test_hand_computed_linear_layer(tmp_path):
    q = normfx.fixed_point(_linear(), bits=4, int_bits=1).eval()
    x = torch.rand(4, 3) - 0.5
    report = normfx.export(q, x, tmp_path / "linear.onnx", format="qonnx")
    (layer,) = report.resources.layers
    assert (layer.op, layer.input_bits, layer.weight_bits) == ("Gemm", 4, 4)
    assert layer.multiplies == 5                       # the zero weight is no multiply
    assert layer.bops == 5 * 4 * 4
    # effective widths (signed tensor: +1 sign bit): 4 -> 2, -6 -> 3, 0 -> 0, 1 -> 2, 3 -> 3, 7 -> 4
    assert layer.ebops == 4 * (2 + 3 + 0 + 2 + 3 + 4)
    assert layer.terms == 1 + 2 + 0 + 1 + 2 + 2      # 4 | 8-2 | - | 1 | 4-1 | 8-1
    assert normfx.resource_estimate(tmp_path / "linear.onnx") == report.resources
    assert "resources per sample: 5 multiplies, 56 EBOPs, 8 shift-and-add terms" in report.summary()


def test_hand_computed_convolution_counts_every_output_position(tmp_path):
    conv = nn.Conv2d(1, 2, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([*WEIGHT[0], 0.0, *WEIGHT[1], 0.0]).reshape(2, 1, 2, 2))
    q = normfx.fixed_point(conv, bits=4, int_bits=1).eval()
    x = torch.rand(2, 1, 6, 6) - 0.5
    report = normfx.export(q, x, tmp_path / "conv.onnx", format="qonnx")
    (layer,) = report.resources.layers
    positions = 5 * 5
    assert layer.multiplies == 5 * positions
    assert layer.ebops == 4 * 14 * positions
    assert layer.terms == 8 * positions


def test_k_hot_batchnorm_scale_has_at_most_k_terms(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    bn = model[1]
    with torch.no_grad():
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.uniform_(0.5, 1.5)
    q = normfx.fixed_point(model.eval(), bits=6, k_hot=2).eval()
    x = torch.randn(8, 2, 8, 8)
    normfx.calibrate(q, [x], progress=False)
    est = normfx.export(q, x, tmp_path / "bn.onnx", format="qonnx").resources
    mul = next(c for c in est.layers if c.op == "Mul")
    assert mul.multiplies == 4 * 6 * 6
    assert mul.multiplies <= mul.terms <= 2 * mul.multiplies
    assert est.float_inputs == ()


def test_a_float_operand_is_counted_at_32_bits_and_listed(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    q = normfx.fixed_point(mlp, bits=4, filter_fn=lambda module, name: name == "2").eval()
    x = torch.randn(8, 3)
    normfx.calibrate(q, [x], progress=False)
    est = normfx.export(q, x, tmp_path / "w.onnx", format="qonnx").resources
    first, second = est.layers
    assert first.input_bits == 32 and first.name in est.float_inputs
    assert second.weight_bits == 4
    assert "float inputs (counted at 32 bits)" in est.summary()


def test_an_estimate_that_fails_does_not_lose_the_verified_file(tmp_path, monkeypatch):
    import sys

    export_module = sys.modules["normfx.onnx.export"]   # the module (normfx.onnx.export is the function)

    def broken(path):
        raise RuntimeError("no shapes")

    monkeypatch.setattr(export_module, "resource_estimate", broken)
    q = normfx.fixed_point(_linear(), bits=4, int_bits=1).eval()
    report = normfx.export(q, torch.rand(4, 3) - 0.5, tmp_path / "linear.onnx", format="qonnx")
    assert report.resources is None and (tmp_path / "linear.onnx").exists()
    assert "resource estimate not available: RuntimeError: no shapes" in report.summary()
