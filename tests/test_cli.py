"""The normfx command: SPEC parsing, inspect, export, exit codes and help."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from normfx.cli import SpecError, load_spec, main


def make_model() -> nn.Module:
    """A factory for the package.module:factory SPEC."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def make_noisy() -> nn.Module:
    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.rand_like(x)

    return Noisy()


def not_a_model():
    return 42


# --- SPEC parsing ----------------------------------------------------------------------------------

def test_specs_that_load(tmp_path):
    assert type(load_spec("torchvision:resnet18")).__name__ == "ResNet"
    assert type(load_spec("timm:resnet18")).__name__ == "ResNet"
    assert isinstance(load_spec("tests.test_cli:make_model"), nn.Sequential)
    path = tmp_path / "m.pt"
    torch.save(make_model(), path)
    assert isinstance(load_spec(str(path), trust_pickle=True), nn.Sequential)


@pytest.mark.parametrize("spec,message", [
    ("torchvision:resnet5O", "did you mean resnet50"),
    ("timm:no_such_net_xyz", "timm has no model"),
    ("tests.test_cli:nothing_here", "has no callable"),
    ("tests.test_cli:not_a_model", "not an nn.Module"),
    ("no_such_package_xyz.mod:f", "cannot import"),
    ("resnet50", "cannot understand model SPEC"),
    ("missing.pt", "no such file"),
])
def test_bad_specs(spec, message):
    with pytest.raises(SpecError, match=message):
        load_spec(spec)


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(make_model(), path)
    with pytest.raises(SpecError, match="loading a pickle runs code from the file.*--trust-pickle"):
        load_spec(str(path))


def test_state_dict_file_explains_what_to_do(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(make_model().state_dict(), path)
    with pytest.raises(SpecError, match="state_dict .*package.module:factory"):
        load_spec(str(path))


# --- commands and exit codes --------------------------------------------------------------------------

def test_inspect_table(capsys):
    assert main(["inspect", "torchvision:resnet18"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.bn1" in out and "BatchNorm2d" in out and "fold" in out and "tune" in out
    assert "20 normalization sites; convbn tune: 20 transformed; convbn deploy: 20 transformed" in out


def test_inspect_json_reports_skips(capsys):
    assert main(["inspect", "torchvision:densenet121", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["sites"] == 121
    rows = {r["site"]: r for r in data["sites"]}
    assert rows["features.denseblock1.denselayer1.norm1"]["convbn_deploy"] == "skip: no adjacent conv/linear"
    assert rows["features.conv0"] if "features.conv0" in rows else True
    assert rows["features.norm0"]["convbn_deploy"] == "fold"


def test_export_ok(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code = main(["export", "tests.test_cli:make_model", "-o", str(out), "--input-shape", "2,3,8,8"])
    assert code == 0 and out.exists()
    text = capsys.readouterr().out
    assert "max rel err" in text and "fold_convbn: 1 sites, 1 transformed" in text


def test_export_verification_failure_exits_1(tmp_path, capsys):
    out = tmp_path / "n.onnx"
    code = main(["export", "tests.test_cli:make_noisy", "-o", str(out), "--input-shape", "2,3"])
    assert code == 1 and not out.exists()
    assert "differs from PyTorch" in capsys.readouterr().err


def test_export_no_verify(tmp_path):
    out = tmp_path / "n.onnx"
    assert main(["export", "tests.test_cli:make_noisy", "-o", str(out), "--input-shape", "2,3", "--no-verify"]) == 0
    assert out.exists()


@pytest.mark.parametrize("argv", [
    ["export", "tests.test_cli:make_model"],                      # no -o
    ["export", "tests.test_cli:make_model", "-o", "x.onnx", "--input-shape", "2,x"],
    ["export", "tests.test_cli:make_model", "-o", "x.onnx", "--input-shape", "0,3"],
    ["frobnicate"],
    [],
])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_bad_spec_exits_2(capsys):
    assert main(["inspect", "torchvision:nope_net"]) == 2
    assert "torchvision has no model 'nope_net'" in capsys.readouterr().err


def test_untrusted_pickle_exits_2(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.save(make_model(), path)
    assert main(["inspect", str(path)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["inspect", str(path), "--trust-pickle"]) == 0


def test_export_bad_folder_exits_1(tmp_path, capsys):
    code = main(["export", "tests.test_cli:make_model", "-o", str(tmp_path / "nope" / "m.onnx"),
                 "--input-shape", "2,3,8,8"])
    assert code == 1 and "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [[], ["inspect"], ["export"]])
def test_help_has_examples(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "torchvision:resnet50" in out and "pretrained weights need a network" in out.lower()


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "normfx.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "inspect" in out.stdout
