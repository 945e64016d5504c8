"""Reports on models with untraceable submodules, nested ones included (issue 11.5): every pass's
sites are the model's candidate sites, each reported once, and transformed + skipped = sites."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import normfx
from tests.conftest import randomize_bn


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.mean() > 0:          # data-dependent: Inner cannot be traced
            y = y.relu()
        return self.fc(self.ln(y.mean((2, 3))))[:, :, None, None] + y


class Middle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.inner = Inner()

    def forward(self, x):
        if x.sum() > 0:           # untraceable too, around an untraceable child
            x = self.inner(x)
        return self.bn2(self.conv2(x))


class Top(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.mid = Middle()
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.norm(self.mid(self.stem(x)).mean((2, 3))))


BNS = {"stem.1", "mid.bn2", "mid.inner.bn"}
LNS = {"norm", "mid.inner.ln"}
LAYERS = {"stem.0", "mid.conv2", "mid.inner.conv", "mid.inner.fc", "head"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Top(), torch.randn(4, 3, 6, 6)).eval()


def _sites(model: nn.Module, name: str) -> list[str]:
    p = normfx.last_report(model).get(name)
    sites = [c.site for c in p.changes] + [s.site for s in p.skips]
    assert len(sites) == len(set(sites)), f"{name} reports a site twice: {sorted(sites)}"
    assert p.sites == len(sites)
    return sites


def test_model_has_nested_untraceable_modules():
    report = normfx.last_report(normfx.convbn(_model(), mode="deploy"))
    assert {"mid", "mid.inner"} <= {q for q, _ in report.untraceable}


@pytest.mark.parametrize("mode", ["tune", "deploy"])
def test_convbn_sites(mode):
    out = normfx.convbn(_model(), mode=mode)
    assert set(_sites(out, "fold_convbn")) == BNS
    skips = {s.site: s for s in normfx.last_report(out).skips}
    assert set(skips) == {"mid.bn2", "mid.inner.bn"}
    assert "y.mean() > 0" in skips["mid.inner.bn"].detail   # the innermost untraceable module's reason
    assert "x.sum() > 0" in skips["mid.bn2"].detail
    assert skips["mid.inner.bn"].reason is normfx.SkipReason.UNTRACEABLE


def test_repbn_sites():
    out = normfx.repbn(_model(), total_steps=4)
    assert set(_sites(out, "swap_layernorm")) == LNS
    assert len(normfx.last_report(out).changes) == 2   # both swapped: a leaf needs no graph


def test_fixed_point_sites():
    out = normfx.fixed_point(_model(), bits=8)
    sites = set(_sites(out, "fixed_point"))
    weights = {f"{layer}.{t}" for layer in LAYERS for t in ("weight", "bias")}
    assert weights <= sites and BNS <= sites
    untraced = {s.site for s in normfx.last_report(out).skips if s.reason is normfx.SkipReason.UNTRACEABLE}
    assert untraced == {"mid", "mid.inner"}   # activations there cannot be found: said once per module


def test_freeze_sites():
    out = normfx.freeze(_model(), keep=("norm",))
    assert set(_sites(out, "freeze")) == LAYERS | BNS | LNS


def test_deploy_sites():
    tuned = normfx.convbn(normfx.repbn(_model(), total_steps=1), mode="tune")
    normfx.RepBNScheduler(tuned).step()
    d = normfx.deploy(tuned.eval())
    assert set(_sites(d, "fold_convbn")) == BNS
    assert set(_sites(d, "fold_repbn")) == LNS
