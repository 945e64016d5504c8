"""Issue 25.2: a fixed-point model's conv/linear sums are exact (float64 in eval mode, integer kernels in
the ONNX file), so PyTorch and ONNX Runtime agree bit for bit on real networks."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normfx
from normfx.nn.exact_sums import eligible, has_exact_sums
from normfx.onnx.exact_sums import exact_integer_sums
from tests.conftest import randomize_bn

tv = pytest.importorskip("torchvision")
ort = pytest.importorskip("onnxruntime")


def _inexact_linear() -> tuple[nn.Module, torch.Tensor]:
    """A 12-bit fixed-point Linear on integers (step 1) whose float32 sums round: products up to
    2^23, sums up to 2^27."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randint(-2047, 2048, (8, 64)).float())
    q = normfx.fixed_point(nn.Sequential(lin), bits=12, targets=("weight",))
    return q, torch.randint(0, 4096, (4, 64)).float()


def test_eval_sums_exactly_and_training_sums_in_float32():
    q, x = _inexact_linear()
    layer = q[0]
    assert has_exact_sums(layer) and isinstance(layer, nn.Linear) and type(layer).__name__ == "ParametrizedLinear"
    assert list(q.state_dict()) == ["0.weight", "0.parametrizations.weight.0.int_bits",
                                    "0.parametrizations.weight.0.observed_max"]
    w = layer.weight.detach()
    assert torch.equal(w, q[0].parametrizations.weight.original.detach())   # integers: the cast keeps them
    exact = F.linear(x.double(), w.double()).float()   # the exact sum, rounded once
    float32 = F.linear(x, w)
    assert (exact != float32).any()                    # the float32 sums round on the way
    with torch.no_grad():
        assert torch.equal(q.eval()(x), exact)
        assert torch.equal(q.train()(x), float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert q.eval()(x).dtype == torch.bfloat16   # autocast computes as it always did


def test_exact_layers_survive_copies_deploy_and_keep_their_class():
    q, x = _inexact_linear()
    q.eval()
    with torch.no_grad():
        exact = q(x)
        again = copy.deepcopy(q)
        assert has_exact_sums(again[0]) and torch.equal(again(x), exact)
        d = normfx.deploy(q)
        assert has_exact_sums(d[0]) and torch.equal(d(x), exact)


def test_layers_with_a_forward_of_their_own_keep_float32_sums():
    timm = pytest.importorskip("timm")
    conv = timm.layers.ScaledStdConv2d(3, 4, 3)
    assert not eligible(conv) and eligible(nn.Conv2d(3, 4, 3)) and eligible(nn.Linear(2, 2))
    q = normfx.fixed_point(nn.Sequential(conv, nn.ReLU()), bits=8)
    assert not has_exact_sums(q[0])


def _resnet(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_bn(getattr(tv.models, name)(num_classes=10), torch.randn(8, 3, 64, 64)).eval()
    q = normfx.fixed_point(model, bits=8)
    normfx.calibrate(q, [torch.randn(8, 3, 64, 64)], progress=False)
    return q.eval(), torch.randn(2, 3, 64, 64)


def _ort_output(path, x: torch.Tensor, level) -> torch.Tensor:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_calibrated_resnet_exports_bit_exact(name, tmp_path):
    """The README's flow (fixed_point, calibrate, export) at the default tolerance, and the file gives
    the same bits at every ONNX Runtime optimization level (its default merges casts of casts)."""
    q, x = _resnet(name)
    path = tmp_path / "q.onnx"
    report = normfx.export(q, x, path, rtol=0.0, atol=0.0)
    assert all(o.max_abs == 0.0 for o in report.outputs)
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in q.modules())
    assert f"exact integer sums: {layers} of {layers} conv/linear layers" in report.summary()
    with torch.no_grad():
        ref = normfx.deploy(q)(x)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        assert torch.equal(_ort_output(path, x, level), ref)


def test_layers_without_8_bit_operands_keep_float_kernels_and_say_why(tmp_path):
    import onnx

    q = normfx.fixed_point(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)),
                           bits=12).eval()
    x = torch.randn(2, 3, 8, 8)
    normfx.calibrate(q, [x], progress=False)
    q.eval()
    normfx.export(q, x, tmp_path / "q.onnx", verify=False)
    # the export rewrote what it could: nothing at 12 bits; a second pass finds the same
    result = exact_integer_sums(str(tmp_path / "q.onnx"))
    assert result.rewritten == []
    assert [why for _, why in result.left] == ["its input is wider than 8 bits (no 8-bit integer kernel)"] * 2
    assert "exact integer sums: 0 of 2 conv/linear layers; float sums in" in result.summary()
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "Conv" in ops and "ConvInteger" not in ops
