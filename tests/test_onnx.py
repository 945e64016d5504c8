"""normfx.deploy and normfx.export: round trips through ONNX Runtime, and every way export fails."""
from __future__ import annotations

import onnx
import onnxruntime as ort
import logging

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import normfx
from normfx.nn import TuneBN, TuneConv
from normfx.passes import DEPLOY_STEPS
from tests.conftest import DEPLOY_RTOL, randomize_bn, rel_err


def _ort(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])


def _tv(name, size=64, **kw):
    import torchvision

    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(**kw)
    return randomize_bn(m, torch.randn(8, 3, size, size)).eval()


# --- deploy ----------------------------------------------------------------------------------------

def test_deploy_folds_tune_blocks_and_is_exact():
    m = _tv("resnet18")
    tuned = normfx.convbn(m, mode="tune").eval()
    d = normfx.deploy(tuned)
    assert not any(isinstance(x, (TuneConv, TuneBN, nn.BatchNorm2d)) for x in d.modules())
    assert type(d) is type(m) and type(d.conv1) is nn.Conv2d   # the model's own classes again
    x = torch.randn(2, 3, 64, 64)
    assert rel_err(d(x), m(x)) < DEPLOY_RTOL
    assert [p.name for p in normfx.last_report(d).passes] == [step.name for step in DEPLOY_STEPS]


def test_deploy_reverts_an_unfoldable_tune_block():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    tuned = normfx.convbn(m, mode="tune")
    tuned.get_submodule("1").running_var[0] = -1.0  # sqrt of a negative: the fold is not finite
    d = normfx.deploy(tuned)
    assert [type(x) for x in d] == [nn.Conv2d, nn.BatchNorm2d]   # conv -> BN, no Tune block left
    (change,) = normfx.last_report(d).changes
    assert change.action == "revert" and "non-finite" in change.detail


def test_deploy_refuses_training_mode():
    with pytest.raises(normfx.TrainingModeError, match="call model.eval"):
        normfx.deploy(_tv("resnet18").train())


# --- export round trips -----------------------------------------------------------------------------

def test_export_resnet_round_trip(tmp_path):
    m = _tv("resnet18")
    path = tmp_path / "r18.onnx"
    report = normfx.export(m, torch.randn(2, 3, 64, 64), path)
    assert path.exists() and report.path == str(path)
    assert report.op_counts.get("BatchNormalization", 0) == 0
    assert report.op_counts["Conv"] == 20
    assert report.verified and report.outputs[0].batch_sizes == (2, 3)
    assert report.outputs[0].max_rel < 1e-4
    assert list(report.inputs[0][1]) == ["batch", 3, 64, 64]    # the batch dimension is dynamic, named
    assert report.exporter in ("dynamo", "torchscript") and report.opset > 0
    # every deploy step reports; only the BatchNorm fold finds sites in a plain ResNet
    assert {p.name: len(p.changes) for p in report.passes.passes} == {
        **{step.name: 0 for step in DEPLOY_STEPS}, "fold_convbn": 20}
    onnx.checker.check_model(str(path), full_check=True)
    x = torch.randn(5, 3, 64, 64)  # a batch size export itself never ran
    assert rel_err(_ort(path, x), m(x)) < 1e-4
    assert "max rel err" in report.summary()


def test_export_batch_one_example_still_dynamic(tmp_path):
    m = _tv("mobilenet_v3_small")
    report = normfx.export(m, torch.randn(1, 3, 64, 64), tmp_path / "mnv3.onnx")
    assert report.outputs[0].batch_sizes == (1, 2)
    assert report.op_counts.get("BatchNormalization", 0) == 0
    x = torch.randn(3, 3, 64, 64)
    assert rel_err(_ort(tmp_path / "mnv3.onnx", x), m(x)) < 1e-4


def test_export_timm_depthwise_norm_act(tmp_path):
    import timm

    torch.manual_seed(0)
    m = randomize_bn(timm.create_model("efficientnet_b0"), torch.randn(8, 3, 64, 64)).eval()
    report = normfx.export(m, torch.randn(2, 3, 64, 64), tmp_path / "eff.onnx")
    assert report.op_counts.get("BatchNormalization", 0) == 0


class UpBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 16 * 16, 8), nn.BatchNorm1d(8), nn.ReLU())

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.up(x))))


def test_export_conv_transpose_and_linear_bn1d(tmp_path):
    m = randomize_bn(UpBlock(), torch.randn(8, 4, 8, 8)).eval()
    report = normfx.export(m, torch.randn(2, 4, 8, 8), tmp_path / "up.onnx")
    assert report.op_counts.get("BatchNormalization", 0) == 0
    assert len(report.passes.changes) == 2


def test_export_without_deploy_runs_no_pass(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    report = normfx.export(m, torch.randn(2, 3, 8, 8), tmp_path / "raw.onnx", deploy=False)
    assert report.passes.passes == ()
    assert report.op_counts.get("BatchNormalization", 0) == 1 and report.verified


def test_export_torchscript_exporter_on_request(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    report = normfx.export(m, torch.randn(2, 3, 8, 8), tmp_path / "ts.onnx", exporter="torchscript")
    assert report.exporter == "torchscript"
    assert report.op_counts.get("BatchNormalization", 0) == 0


def test_export_multiple_outputs(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return {"mean": y.mean((2, 3)), "max": y.amax((2, 3))}

    report = normfx.export(Two().eval(), torch.randn(2, 3, 4, 4), tmp_path / "two.onnx")
    assert [o.name for o in report.outputs] == ["output_0", "output_1"]


# --- failures leave nothing behind --------------------------------------------------------------------

class Noisy(nn.Module):
    """ONNX Runtime's random numbers are not PyTorch's: verification must fail."""

    def forward(self, x):
        return x + torch.rand_like(x)


def test_verification_failure_leaves_nothing(tmp_path):
    path = tmp_path / "noisy.onnx"
    with pytest.raises(normfx.ExportError, match=r"output 'output' differs from PyTorch by .* at batch 2"):
        normfx.export(Noisy().eval(), torch.randn(2, 3), path)
    assert list(tmp_path.iterdir()) == []


def test_verification_failure_keeps_an_existing_file(tmp_path):
    path = tmp_path / "noisy.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(normfx.ExportError):
        normfx.export(Noisy().eval(), torch.randn(2, 3), path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["noisy.onnx"]


def test_no_verify_writes_the_file(tmp_path):
    report = normfx.export(Noisy().eval(), torch.randn(2, 3), tmp_path / "n.onnx", verify=False)
    assert not report.verified and (tmp_path / "n.onnx").exists()


def test_inputs_that_do_not_run(tmp_path):
    with pytest.raises(normfx.ExportError, match=r"example inputs \(\[2, 5, 8, 8\]\) do not run through"):
        normfx.export(_tv("resnet18"), torch.randn(2, 5, 8, 8), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_training_mode_is_refused(tmp_path):
    with pytest.raises(normfx.ExportError, match="is in training mode; call model.eval"):
        normfx.export(_tv("resnet18").train(), torch.randn(2, 3, 8, 8), tmp_path / "x.onnx")


def test_unwritable_paths(tmp_path):
    x = torch.randn(2, 3)
    with pytest.raises(normfx.ExportError, match="does not exist"):
        normfx.export(nn.Linear(3, 2).eval(), x, tmp_path / "missing" / "m.onnx")
    with pytest.raises(normfx.ExportError, match="is a folder"):
        normfx.export(nn.Linear(3, 2).eval(), x, tmp_path)


@torch.library.custom_op("normfx_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_opaque.register_fake
def _(x):
    return torch.empty_like(x)


class Opaque(nn.Module):
    def forward(self, x):
        return _opaque(x)


class WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.weird = Opaque()

    def forward(self, x):
        return self.weird(self.conv(x))


def test_unsupported_op_names_the_module(tmp_path):
    with pytest.raises(normfx.ExportError, match=r"op 'opaque', produced by module 'weird'"):
        normfx.export(WithOpaque().eval(), torch.randn(2, 3, 4, 4), tmp_path / "o.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_leaves_the_model_alone(tmp_path):
    m = _tv("resnet18")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    normfx.export(m, torch.randn(2, 3, 64, 64), tmp_path / "r.onnx")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not isinstance(m, fx.GraphModule)


class _Cancelling(nn.Module):
    """Two nearly equal 4096-wide products subtracted: float32 rounding is 6e-4 of the output, and
    ONNX Runtime's Gemm sums in another order than PyTorch's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4096, 8), nn.Linear(4096, 8)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight + 1e-5 * torch.randn_like(self.a.weight))
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        return self.a(x) - self.b(x)


def test_a_difference_within_the_models_own_float32_rounding_passes(tmp_path, caplog):
    torch.manual_seed(0)
    m, x = _Cancelling().eval(), torch.randn(2, 4096) * 100
    with caplog.at_level(logging.INFO, logger="normfx"):
        report = normfx.export(m, x, tmp_path / "c.onnx")
    (out,) = report.outputs
    assert out.max_rel > 1e-4          # over the plain tolerance ...
    assert "is float32 rounding" in caplog.text   # ... and no farther from float64 than PyTorch's float32
