"""Every one-liner applied to its own output (issue 11.4): it changes nothing more and says so in
its report, or it refuses with a clear error. (TVM's habit: run every transform twice.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import normfx
from tests.conftest import randomize_bn

tv = pytest.importorskip("torchvision")


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    m = tv.models.resnet18(num_classes=10)
    randomize_bn(m, torch.randn(4, 3, 32, 32))
    return m.eval()


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return tv.models.VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                       num_classes=5).eval()


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


X = torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("mode", ["tune", "deploy"])
def test_convbn_twice(mode):
    once = normfx.convbn(_resnet(), mode=mode)
    twice = normfx.convbn(once, mode=mode)
    report = normfx.last_report(twice)
    assert not report.changes
    if mode == "tune":  # the Tune blocks are found again and reported as already done
        assert len(report.skips) == len(normfx.last_report(once).changes)
        assert {s.reason for s in report.skips} == {normfx.SkipReason.ALREADY_DONE}
    _same(once, twice, X)


def test_deploy_twice():
    once = normfx.deploy(normfx.convbn(_resnet(), mode="tune"))
    twice = normfx.deploy(once)
    assert not normfx.last_report(twice).changes
    _same(once, twice, X)


def test_repbn_twice():
    once = normfx.repbn(_vit(), total_steps=10)
    twice = normfx.repbn(once, total_steps=10)
    report = normfx.last_report(twice)
    assert not report.changes
    assert len(report.skips) == len(normfx.last_report(once).changes)
    assert {s.reason for s in report.skips} == {normfx.SkipReason.ALREADY_DONE}
    _same(once.eval(), twice.eval(), X)


@pytest.mark.parametrize("random", [0, 50])
def test_freeze_twice(random):
    once = normfx.freeze(_resnet(), keep=("norm",), random=random)
    twice = normfx.freeze(once, keep=("norm",), random=random)
    assert normfx.trainable_summary(twice).trainable == normfx.trainable_summary(once).trainable
    assert [n for n, p in twice.named_parameters() if p.requires_grad] == \
        [n for n, p in once.named_parameters() if p.requires_grad]
    _same(once, twice, X)


def test_fixed_point_twice_refuses():
    once = normfx.fixed_point(_resnet(), bits=8)
    normfx.calibrate(once, [torch.randn(4, 3, 32, 32)], progress=False)
    with pytest.raises(normfx.AlreadyTransformedError, match="already has fixed-point casts"):
        normfx.fixed_point(once, bits=8)


def test_calibrate_twice_is_stable():
    q = normfx.fixed_point(_resnet(), bits=8)
    batches = [torch.randn(4, 3, 32, 32)]
    normfx.calibrate(q, batches, progress=False)
    first = {k: v.clone() for k, v in q.state_dict().items()}
    normfx.calibrate(q, batches, progress=False)
    for k, v in q.state_dict().items():
        assert torch.equal(v, first[k]), k
