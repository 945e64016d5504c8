"""normfx.trace: leaves, partial tracing, and the one error it raises."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

import normfx
from normfx.analysis import rewritten
import pytest
from normfx.analysis import analyze
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
    assert {n for n, _ in analyze(out).regions} == {"a", "b"}   # the regions traced
    assert not list(regions(out))          # leaf changes only: no GraphModule put in the model
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


# --- regions keep every call correct (issue 11.7, 11.8) --------------------------------------------------

def _block(c: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())


class Encoder(nn.Module):
    """Branches on a Python argument and keeps its blocks in a ModuleList (Hugging Face's shape)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_block(), _block()])

    def forward(self, x, flag=False):
        outs = () if flag else None
        for blk in self.blocks:
            x = blk(x)
            if flag:
                outs = outs + (x,)
        return x, outs


class HFRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _block()
        self.encoder = Encoder()

    def forward(self, x, return_dict=False):
        h, outs = self.encoder(self.stem(x), flag=return_dict)
        if not return_dict:
            return h
        return {"last": h, "hidden": outs}


def test_partial_tracing_descends_through_branches_and_module_lists():
    m = randomize_bn(HFRoot(), torch.randn(4, 4, 6, 6)).eval()
    d = normfx.convbn(m, mode="deploy")
    report = normfx.last_report(d)
    assert len(report.changes) == 3 and not report.skips   # stem and both blocks, found below the branches
    assert {name for name, _ in report.untraceable} == {"", "encoder", "encoder.blocks"}
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert rel_err(d(x), m(x)) < 1e-5
        out, ref = d(x, return_dict=True), m(x, return_dict=True)   # the other branch still works
        assert rel_err(out["last"], ref["last"]) < 1e-5 and len(out["hidden"]) == 2
    assert type(d) is HFRoot and isinstance(d.encoder.blocks, nn.ModuleList)


class Embeds(nn.Module):
    """BERT's embeddings: a default-None argument decides which branch runs."""

    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, ids=None, embeds=None):
        if embeds is None:
            embeds = self.word(ids)
        return self.norm(embeds)


class EmbedsParent(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = Embeds()

    def forward(self, ids, use_ids=True):
        if use_ids:
            return self.emb(ids=ids)
        return self.emb(embeds=self.emb.word(ids) * 2)


@pytest.mark.parametrize("one_liner", ["repbn", "freeze", "fixed_point", "convbn"])
def test_region_with_default_arguments_is_not_specialized(one_liner):
    """A traced ``Embeds`` would turn ``embeds`` into a proxy and drop the ``is None`` branch."""
    m = EmbedsParent().eval()
    kw = {"total_steps": 10} if one_liner == "repbn" else {}
    out = getattr(normfx, one_liner)(m, **kw).eval()
    ids = torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        y1, y2 = out(ids), out(ids, use_ids=False)
        if one_liner != "fixed_point":
            assert torch.equal(y1, m(ids)) and torch.equal(y2, m(ids, use_ids=False))
    if one_liner == "repbn":
        assert normfx.last_report(out).changes[0].site == "emb.norm"   # swapped in its slot all the same


class Gate(nn.Module):
    """A required argument tested with ``is``: a proxy is never None, so a trace would keep one branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, skip):
        y = self.bn(self.conv(x))
        if skip is not None:
            y = y + skip
        return y


class GateParent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        if x.sum() > 0:                 # untraceable: the gate becomes its own region candidate
            return self.gate(x, None)
        return self.gate(x, x)


def test_identity_tested_argument_blocks_a_region():
    m = randomize_bn(GateParent(), torch.randn(4, 3, 5, 5)).eval()
    d = normfx.convbn(m, mode="deploy")
    reasons = dict(normfx.last_report(d).untraceable)
    assert "is/isinstance" in reasons["gate"]
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(d(x.abs()), m(x.abs())) and torch.equal(d(-x.abs()), m(-x.abs()))


class DefaultsRoot(nn.Module):
    """timm's shape: defaults at the root that only callees read."""

    def __init__(self):
        super().__init__()
        self.body = _block(3)

    def forward(self, x, attn_mask=None, scale=1.0):
        return self.helper(x, attn_mask) * scale

    def helper(self, x, attn_mask):
        return self.body(x) if attn_mask is None else self.body(x) + attn_mask


def test_root_defaults_are_specialized_with_a_guard():
    m = randomize_bn(DefaultsRoot(), torch.randn(4, 3, 5, 5)).eval()
    x = torch.randn(2, 3, 5, 5)
    # A fold is a leaf change: the model keeps its own forward, every argument still works.
    d = normfx.convbn(m, mode="deploy")
    assert type(d) is DefaultsRoot and len(normfx.last_report(d).changes) == 1
    with torch.no_grad():
        assert rel_err(d(x, attn_mask=torch.ones(1), scale=2.0), m(x, attn_mask=torch.ones(1), scale=2.0)) < 1e-5
    # Activation casts change the root's forward: the traced one is fixed at the defaults, guarded.
    q = normfx.fixed_point(m, bits=8)
    assert isinstance(q, DefaultsRoot) and rewritten(q)    # its class kept, its forward the traced one
    with torch.no_grad():
        q(x)
        q(x, None, 1.0)
        with pytest.raises(normfx.SpecializedCallError, match="attn_mask=None"):
            q(x, attn_mask=torch.zeros(1))
        with pytest.raises(normfx.SpecializedCallError, match="scale=1.0"):
            q(x, scale=2.0)
