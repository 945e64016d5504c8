"""The example scripts run end to end (tiny settings; the defaults are what docs/ reports)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _stand_in(tmp_path: Path) -> str:
    """Random images in Fashion-MNIST's idx format (the data is not needed to test the structure)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from _data import write_stand_in
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return str(write_stand_in(tmp_path / "fashion-mnist", train=96, test=48))


def _run(script: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NORMFX_CACHE=str(cwd / "cache"))
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_bn_only_example(tmp_path):
    out = _run("bn_only.py", "--data", _stand_in(tmp_path), "--depths", "8", "--epochs", "1", "--configs", "bn_only",
               "random_channel", "random_uniform", "head_only", "--seeds", "0", "--out", str(tmp_path),
               "--results", str(tmp_path), cwd=tmp_path)
    (stored,) = json.loads((tmp_path / "bn_only_resnet8_1ep_ones.json").read_text())["runs"]
    assert stored["seed"] == 0
    # the paper's control trains two entries per output channel: BN's γ/β count plus 2 × 10 in the head
    assert stored["random_channel"]["trainable"] == stored["bn_only"]["trainable"] + 20
    assert stored["random_uniform"]["trainable"] == stored["random_channel"]["trainable"]
    assert all(0.0 <= stored[k]["inactive"] <= 1.0 and 0.0 <= stored[k]["disabled"] <= 1.0 for k in stored
               if k != "seed")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and
            line.split()[0] in ("bn_only", "random_channel", "random_uniform", "head_only")}
    assert set(rows) == {"bn_only", "random_channel", "random_uniform", "head_only"}
    assert rows["head_only"][1] == "650"            # 64 features x 10 classes + 10
    for name in ("bn_only_gamma_bn_only.png", "bn_only_gamma_random_channel.png"):
        assert (tmp_path / name).stat().st_size > 5_000


@pytest.mark.slow
def test_prepbn_vit_example(tmp_path):
    out = _run("prepbn_vit.py", "--epochs", "1", "--seeds", "0", "--out", str(tmp_path), "--results", str(tmp_path),
               cwd=tmp_path)
    assert "test accuracy over seeds" in out and (tmp_path / "prepbn_vit.png").exists()
    (run,) = json.loads((tmp_path / "prepbn_vit.json").read_text())["runs"]
    variants = ("PRepBN", "PRepBN_ramp50", "PRepBN_warm", "RepBN")
    assert {"LayerNorm", "deployed", *variants, *(f"{v}_recalibrated" for v in variants)} <= set(run)
    assert run["normalization_left"] == 0 and run["deploy_rel_err"] < 1e-4


@pytest.mark.slow
def test_fixed_point_example(tmp_path):
    out = _run("fixed_point.py", "--data", _stand_in(tmp_path), "--bits", "8", "--weight-bits", "4",
               "--binary-code", "--epochs", "1", "--qat-epochs", "1", "--seeds", "0", "1", "--out", str(tmp_path),
               "--results", str(tmp_path), cwd=tmp_path)
    assert "PTQ" in out and "QAT" in out and "QFX" in out and "max abs difference ONNX Runtime vs PyTorch 0.0" in out
    assert (tmp_path / "fixed_point_8bit.onnx").exists() and (tmp_path / "fixed_point_8bit.fixed_point.json").exists()
    stored = json.loads((tmp_path / "fixed_point.json").read_text())
    assert [r["seed"] for r in stored["runs"]] == [0, 1]
    assert set(stored["runs"][0]) == {"seed", "float", "PTQ", "QAT", "QFX", "LSQ", "QFX_moved", "casts",
                                      "terms_csd", "PTQ_few", "QAT_few", "QFX_few", "QFX_few_moved", "QFX_shift",
                                      "PTQ_binary", "QFX_binary", "terms_binary"}
    assert set(stored["runs"][0]["LSQ"]) == {"8", "w4a8"}
    assert stored["config"]["binary_point_lr"] == 0.01 and stored["config"]["few"] == 16
    assert all(1.0 <= stored["runs"][0][f"terms_{c}"]["8"] <= 2.0 for c in ("csd", "binary"))   # 2-hot scales
    assert stored["command"].startswith("python examples/fixed_point.py") and stored["versions"]["torch"]


@pytest.mark.slow
def test_fpga_example(tmp_path):
    pytest.importorskip("hls4ml", reason="needs hls4ml (pip install normfx[fpga])")
    out = _run("fpga.py", "--bits", "6", "--epochs", "1", "--qat-epochs", "1", "--seeds", "0", "--out", str(tmp_path),
               "--results", str(tmp_path), cwd=tmp_path)
    assert "mlp W=6: " in out and "cnn W=6: " in out and out.count("bit-exact: 360/360") == 2
    stored = json.loads((tmp_path / "fpga.json").read_text())
    cnn = stored["runs"][0]["cnn"]["6"]
    assert cnn["bit_exact"] == cnn["images"] == 360
    assert [c["op"] for c in cnn["layers"]].count("Mul") == 3     # the three BatchNorm scales
    assert cnn["ebops"] == sum(c["ebops"] for c in cnn["layers"]) > 0


def test_examples_say_how_to_get_missing_data(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), NORMFX_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "evonorm.py"), "--data", str(tmp_path / "none")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith(f"Fashion-MNIST not found in {tmp_path / 'none'}: install it "
                                                          "with `apt-get install dataset-fashion-mnist`")


def test_trying_an_example_does_not_rewrite_the_stored_results():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import _results
    finally:
        sys.path.remove(str(ROOT / "examples"))
    import argparse

    for argv, where in (([], _results.SCRATCH), (["--store"], _results.RESULTS)):
        old = sys.argv
        sys.argv = ["x.py", *argv]
        try:
            assert _results.parse(argparse.ArgumentParser(), out=False).results == where
        finally:
            sys.argv = old
    assert _results.SCRATCH != _results.RESULTS and "out" in _results.SCRATCH.parts


@pytest.mark.slow
def test_evonorm_example(tmp_path):
    out = _run("evonorm.py", "--data", _stand_in(tmp_path), "--batches", "64", "--epochs", "1", "--seeds", "0",
               "--results", str(tmp_path),
               cwd=tmp_path)
    (run,) = json.loads((tmp_path / "evonorm.json").read_text())["runs"]
    assert set(run["64"]) == {"BN-ReLU", "EvoNorm-B0", "EvoNorm-S0"}
    assert all(0.0 <= v["accuracy"] <= 1.0 and v["step_ms"] > 0 for v in run["64"].values())
    assert "EvoNorm-S0" in out


@pytest.mark.slow
def test_directpred_example(tmp_path):
    _run("directpred.py", "--epochs", "1", "--seeds", "0", "--out", str(tmp_path), "--results", str(tmp_path),
         cwd=tmp_path)
    (run,) = json.loads((tmp_path / "directpred.json").read_text())["runs"]
    assert {"init", "two_layer_bn", "linear", "directpred", "directcopy"} <= set(run)
    assert len(run["spectrum"]) == 1 and max(run["spectrum"][0]) == 1.0
    assert (tmp_path / "directpred_spectrum.png").stat().st_size > 5_000


@pytest.mark.slow
def test_grokking_example(tmp_path):
    _run("grokking.py", "--p", "23", "--steps", "200", "--width", "64", "--seeds", "0", "--out", str(tmp_path),
         "--results", str(tmp_path), cwd=tmp_path)
    (run,) = json.loads((tmp_path / "grokking.json").read_text())["runs"]
    assert {"none", "wd", "bn"} <= set(run) and len(run["bn"]["abs_gamma"]) == 64
    assert run["bn"]["prune"]["lowest"][0]["fraction"] == 0.0
    for name in ("grokking_curves.png", "grokking_ipr.png"):
        assert (tmp_path / name).stat().st_size > 5_000
    _run("grokking.py", "--p", "11", "--width", "16", "--batch-sweep", "256", "128", "--seeds", "0", "--out",
         str(tmp_path), "--results", str(tmp_path), cwd=tmp_path)
    (sweep,) = json.loads((tmp_path / "grokking_batch.json").read_text())["runs"]
    assert set(sweep["256"]) == {"none", "bn"} and set(sweep["128"]["bn"]) == {"corrupted", "clean", "test"}
    _run("grokking.py", "--p", "11", "--width", "16", "--steps", "20", "--phase", "--seeds", "0", "1", "--out",
         str(tmp_path), "--results", str(tmp_path), cwd=tmp_path)
    phase = json.loads((tmp_path / "grokking_phase.json").read_text())
    assert [r["seed"] for r in phase["runs"]] == [0, 1]
    for r in phase["runs"]:
        assert r["seconds"] > 0
        for name in ("wd", "bn"):
            assert len(r[name]) == 5 and all(len(row) == 5 for row in r[name])
            assert all(row[0]["corrupted"] != row[0]["corrupted"] for row in r[name])    # ξ = 0: nothing corrupted
            assert all(0 <= cell["test"] <= 1 for row in r[name] for cell in row)


@pytest.mark.slow
def test_slab_vit_example(tmp_path):
    _run("slab_vit.py", "--epochs", "1", "--seeds", "0", "--results", str(tmp_path), cwd=tmp_path)
    (run,) = json.loads((tmp_path / "slab_vit.json").read_text())["runs"]
    for k in ("slab", "slab_distill"):
        assert run[k]["normalization_left"] == 0 and run[k]["softmax_left"] == 0
    assert all(run[k]["latency_ms"] > 0 and 0 <= run[k]["accuracy"] <= 1
               for k in ("softmax_ln", "sla_ln", "slab", "slab_distill"))
    _run("slab_vit.py", "--model", "swin", "--epochs", "1", "--seeds", "0", "--results", str(tmp_path), cwd=tmp_path)
    (swin,) = json.loads((tmp_path / "slab_swin.json").read_text())["runs"]
    # stage 0 linear (SLAB's LLSS half), stage 1 keeps its two softmax window attentions
    assert swin["slab"]["normalization_left"] == 0 and (swin["slab"]["softmax_left"], swin["slab"]["softmax_before"]) \
        == (2, 4)
