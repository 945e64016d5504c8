"""The example scripts run end to end (tiny settings; the defaults are what docs/ reports)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_bn_only_example(tmp_path):
    out = _run("bn_only.py", "--depth", "8", "--epochs", "1", "--configs", "bn_only", "random", "head_only",
               "--seeds", "0", "--out", str(tmp_path), "--results", str(tmp_path), cwd=tmp_path)
    (stored,) = json.loads((tmp_path / "bn_only_1ep.json").read_text())["runs"]
    assert stored["seed"] == 0 and stored["bn_only"]["trainable"] == stored["random"]["trainable"]
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and
            line.split()[0] in ("bn_only", "random", "head_only")}
    assert set(rows) == {"bn_only", "random", "head_only"}
    assert rows["bn_only"][1] == rows["random"][1]  # the control trains as many entries as BN-only
    assert rows["head_only"][1] == "650"            # 64 features x 10 classes + 10
    for name in ("bn_only_accuracy.png", "bn_only_gamma_bn_only.png", "bn_only_gamma_random.png"):
        assert (tmp_path / name).stat().st_size > 5_000


@pytest.mark.slow
def test_prepbn_vit_example(tmp_path):
    out = _run("prepbn_vit.py", "--epochs", "1", "--seeds", "0", "--out", str(tmp_path), "--results", str(tmp_path),
               cwd=tmp_path)
    assert "test accuracy:" in out and (tmp_path / "prepbn_vit.png").exists()
    (run,) = json.loads((tmp_path / "prepbn_vit.json").read_text())["runs"]
    assert {"LayerNorm", "PRepBN", "PRepBN_recalibrated", "deployed"} <= set(run)
    assert run["normalization_left"] == 0 and run["deploy_rel_err"] < 1e-4


@pytest.mark.slow
def test_fixed_point_example(tmp_path):
    out = _run("fixed_point.py", "--bits", "4", "8", "--epochs", "1", "--qat-epochs", "1", "--seeds", "0", "1",
               "--out", str(tmp_path), "--results", str(tmp_path), cwd=tmp_path)
    assert "PTQ" in out and "QAT" in out and "QFX" in out and "max abs difference ONNX Runtime vs PyTorch 0.0" in out
    assert (tmp_path / "fixed_point_8bit.onnx").exists() and (tmp_path / "fixed_point_8bit.fixed_point.json").exists()
    stored = json.loads((tmp_path / "fixed_point.json").read_text())
    assert [r["seed"] for r in stored["runs"]] == [0, 1]
    assert set(stored["runs"][0]) == {"seed", "float", "PTQ", "QAT", "QFX", "QFX_moved", "casts"}
    assert stored["command"].startswith("python examples/fixed_point.py") and stored["versions"]["torch"]
