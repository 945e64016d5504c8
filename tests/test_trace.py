"""normfx.trace: leaves, partial tracing, and the one error it raises."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

import normfx
import pytest
from normfx.trace import regions
from tests.conftest import randomize_bn, rel_err


class Branchy(nn.Module):
    """Data-dependent control flow in its own forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if x.mean() > 0:
            return self.bn(self.conv(x))
        return x


class Root(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        self.b = Branchy()

    def forward(self, x):
        return self.b(self.a(x))


class UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        self.b = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        y = self.a(x)
        if y.sum() > 0:
            return self.b(y)
        return y


def test_traces_whole_model():
    gm = normfx.trace(Root().a)
    assert isinstance(gm, fx.GraphModule)
    assert normfx.untraceable_modules(gm) == ()


def test_batchnorm_and_dropout_stay_switchable():
    m = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    gm = normfx.trace(m)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]


def test_untraceable_child_becomes_leaf():
    gm = normfx.trace(Root())
    assert isinstance(gm, fx.GraphModule)
    (name, why), = normfx.untraceable_modules(gm)
    assert name == "b"
    assert "control flow" in why and "test_trace.py" in why
    assert any(n.op == "call_module" and n.target == "b" for n in gm.graph.nodes)


def test_untraceable_root_traces_children():
    m = randomize_bn(UntraceableRoot(), torch.randn(4, 3, 4, 4)).eval()
    x = torch.randn(2, 3, 4, 4).abs()
    out = normfx.convbn(m, mode="deploy")
    assert isinstance(out, UntraceableRoot)
    assert {n for n, _ in regions(out)} == {"a", "b"}
    assert [c.site for c in normfx.last_report(out).changes] == ["a.1", "b.1"]
    assert normfx.last_report(out).untraceable[0][0] == ""
    assert rel_err(out(x), m(x)) < 1e-4
    assert isinstance(m.a, nn.Sequential)  # the caller's model is untouched


def test_nothing_traceable_is_an_error():
    class Hopeless(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(normfx.TraceFailure, match=r"module '<root>' failed with TraceError.*test_trace.py"):
        normfx.trace(Hopeless())


def test_leaf_modules_by_name_and_type():
    gm = normfx.trace(Root(), leaf_modules=["a"])
    assert any(n.op == "call_module" and n.target == "a" for n in gm.graph.nodes)
    gm = normfx.trace(Root(), leaf_modules=[nn.Sequential])
    assert any(n.op == "call_module" and n.target == "a" for n in gm.graph.nodes)


def test_graphmodule_is_returned_as_is():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 3, 1)))
    assert normfx.trace(gm) is gm


def test_last_report_requires_normfx_model():
    with pytest.raises(LookupError, match="carries no normfx report"):
        normfx.last_report(nn.Conv2d(1, 1, 1))
