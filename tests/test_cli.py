"""The normfx command: SPEC parsing, inspect, export, exit codes and help."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import normfx

from normfx.cli import SpecError, load_spec, main, parse_transform


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


def broken_factory():
    raise RuntimeError("checkpoint 'weights.bin' not found\nsecond line of detail")


def make_untraceable() -> nn.Module:
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    return Branchy()


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
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("layer1.0.bn1 ")}
    assert rows["layer1.0.bn1"][1:] == ["BatchNorm2d", "64", "train", "fixed-point", "multiply-add", "—", "evonorm",
                                        "tune", "fold"]
    # Columns in registry order; a total counts the rows, and the whole run's sites where that is more.
    assert ("20 normalization sites; freeze: 20 transformed (41 sites in all); fixed point: 20 transformed (118 "
            "sites in all); repbn: 0 transformed; evonorm: 20 transformed; convbn tune: 20 transformed; convbn "
            "deploy: 20 transformed") in out


def test_inspect_shows_every_pass(capsys):
    """A transformer's LayerNorms: what repbn and freeze would do, and that convbn finds nothing."""
    assert main(["inspect", "torchvision:vit_b_16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["site"]: r for r in data["sites"]}
    assert data["totals"] == {"sites": 25, "attention_sites": 12, "convbn_tune": "0 transformed",
                              "convbn_deploy": "0 transformed", "repbn": "25 transformed",
                              "freeze": "25 transformed (77 sites in all)",
                              "fixed_point": "0 transformed (154 sites in all)", "evonorm": "0 transformed",
                              "linear_attention": "12 transformed"}
    assert rows["encoder.ln"]["repbn"] == "prepbn" and rows["encoder.ln"]["freeze"] == "train"
    attn = rows["encoder.layers.encoder_layer_0.self_attention"]
    assert (attn["kind"], attn["shape"], attn["linear_attention"], attn["repbn"]) == (
        "MultiheadAttention", "12 heads", "linear attention", "—")


def test_inspect_shows_swin_stages(capsys):
    """torchvision's Swin-T probed at 224: SLAB's LLSS default swaps stages 0-1 and skips 2-3."""
    assert main(["inspect", "torchvision:swin_t"]) == 0
    out = capsys.readouterr().out
    assert "29 normalization sites, 12 attention sites;" in out and "linear attention: 4 transformed" in out
    row = next(line for line in out.splitlines() if line.startswith("features.5.0.attn "))
    assert "ShiftedWindowAttention" in row and "skip: unsupported" in row


def test_inspect_json_reports_skips(capsys):
    assert main(["inspect", "torchvision:densenet121", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["sites"] == 121
    rows = {r["site"]: r for r in data["sites"]}
    assert rows["features.denseblock1.denselayer1.norm1"]["convbn_deploy"] == "skip: no adjacent conv/linear"
    assert "features.conv0" not in rows  # convs are not normalization sites
    assert rows["features.norm0"]["convbn_deploy"] == "fold"
    # DenseNet's norm0 feeds relu0 alone; a dense layer's norm1 follows the concatenation and feeds relu1
    assert rows["features.norm0"]["evonorm"] == "evonorm"


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


# --- bad input: one line on stderr, never a traceback (issue 11.9) ------------------------------------

def _one_line_error(capsys, argv, code, *needles):
    assert main(argv) == code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("normfx: "), err
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


GOOD = "tests.test_cli:make_model"
SHAPE = ["--input-shape", "2,3,8,8"]


def test_export_into_unwritable_folder(capsys):
    _one_line_error(capsys, ["export", GOOD, "-o", "/proc/x.onnx", *SHAPE], 1, "cannot write '/proc/x.onnx'",
                    "not writable")


def test_export_into_missing_folder(tmp_path, capsys):
    _one_line_error(capsys, ["export", GOOD, "-o", str(tmp_path / "nope" / "m.onnx"), *SHAPE], 1, "does not exist")


def test_export_below_a_file(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    _one_line_error(capsys, ["export", GOOD, "-o", str(f / "m.onnx"), *SHAPE], 1, "is a file, not a folder")


def test_export_onto_a_folder(tmp_path, capsys):
    _one_line_error(capsys, ["export", GOOD, "-o", str(tmp_path), *SHAPE], 1, "is a folder")


def test_export_shape_the_model_cannot_take(tmp_path, capsys):
    _one_line_error(capsys, ["export", GOOD, "-o", str(tmp_path / "m.onnx"), "--input-shape", "2,5,8,8"], 1,
                    "do not run through", "[2, 5, 8, 8]")
    assert not (tmp_path / "m.onnx").exists()


def test_factory_that_raises(capsys):
    _one_line_error(capsys, ["inspect", "tests.test_cli:broken_factory"], 2,
                    "raised RuntimeError: checkpoint 'weights.bin' not found")


def test_corrupt_model_file(tmp_path, capsys):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a torch file at all")
    _one_line_error(capsys, ["inspect", str(path)], 2, "cannot read", "torch.save")
    _one_line_error(capsys, ["inspect", str(path), "--trust-pickle"], 2, "cannot read", "torch.save")


def test_inspect_model_that_does_not_trace(capsys):
    assert main(["inspect", "tests.test_cli:make_untraceable"]) == 0
    assert "0 normalization sites" in capsys.readouterr().out


@pytest.mark.parametrize("option,value,needle", [
    ("--rtol", "-1", "finite number >= 0"),
    ("--atol", "nan", "finite number >= 0"),
    ("--rtol", "abc", "wants a number"),
    ("--opset", "3", "between 7 and 30"),
    ("--opset", "x", "wants an integer"),
    ("--input-shape", "2,-3", "positive sizes"),
    ("--convbn", "tune", "invalid choice"),
])
def test_bad_options(option, value, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", GOOD, "-o", "m.onnx", option, value])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_export_warms_batchnorm_statistics_first(tmp_path, capsys):
    """--warm-bn N: the fold is checked on statistics estimated from data, not fresh ones (where
    folding is nearly the identity and the ORT check proves little)."""
    out = tmp_path / "m.onnx"
    assert main(["export", GOOD, "-o", str(out), *SHAPE, "--warm-bn", "2"]) == 0
    text = capsys.readouterr().out
    assert "BatchNorm statistics: estimated from 2 random batches of shape [8, 3, 8, 8]" in text
    assert "fold_convbn: 1 sites, 1 transformed" in text and "bake_random_entries" not in text


# --- any registered transform from the command line ---------------------------------------------------------

def test_parse_transform_reads_options_and_refuses_unknown_ones():

    assert parse_transform("fixed_point:bits=6,targets=weight+norm") == normfx.FixedPointConfig(
        bits=6, targets=("weight", "norm"))
    assert parse_transform("linear_attention:stages=0") == normfx.LinearAttentionConfig(stages=(0,))
    assert parse_transform("convbn") == normfx.ConvBNConfig()
    with pytest.raises(ValueError, match="fixed_point takes bits=.*got 'bitz=4'"):
        parse_transform("fixed_point:bitz=4")
    with pytest.raises(ValueError, match="no transform named 'fixpoint'"):
        parse_transform("fixpoint")
    with pytest.raises(ValueError, match="bits must be in"):
        parse_transform("fixed_point:bits=40")


def test_inspect_with_transforms_and_a_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps([{"transform": "fixed_point", "bits": 4, "targets": ["weight", "norm"]}]))
    assert main(["inspect", "torchvision:resnet18", "--recipe", str(recipe), "--transform", "convbn:mode=deploy",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["columns"] == ["fixed_point", "convbn"]
    # 21 weights (20 convs and fc; no "bias" target) and the 20 BatchNorms; no activation casts
    assert data["totals"]["fixed_point"] == "20 transformed (41 sites in all)"
    assert data["totals"]["convbn"] == "20 transformed"
    assert main(["inspect", "torchvision:resnet18", "--transform", "fixed_point:bitz=4"]) == 2
    assert "fixed_point takes bits=" in capsys.readouterr().err


def test_export_runs_any_transform_then_calibrates(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["export", "tests.test_cli:make_model", "-o", str(out), "--input-shape", "2,3,8,8",
                 "--transform", "fixed_point:bits=8", "--calibrate", "2"]) == 0
    text = capsys.readouterr().out
    assert "fixed_point: " in text and "binary points calibrated on 2 random batches" in text
    assert "QuantizeLinear" in text and "max abs err 0.00e+00" in text
    assert main(["export", "tests.test_cli:make_model", "-o", str(out), "--calibrate", "2"]) == 1
    assert "add --transform fixed_point first" in capsys.readouterr().err
