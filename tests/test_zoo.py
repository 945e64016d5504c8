"""Every ConvBN guarantee on real architectures nobody here wrote (random weights, randomized BN).

For each model: Deploy output within ``DEPLOY_RTOL`` of the eval-mode original; Tune gradients within
``GRAD_RTOL`` of the eval-mode original's, per parameter tensor; Tune in train mode equal to the
original in train mode, running statistics included; state_dict keys unchanged in Tune mode.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import normfx
from normfx.kinds import is_frozen_bn
from tests.conftest import DEPLOY_RTOL, GRAD_RTOL, bn_calls, randomize_bn, rel_err, tune_blocks

SIZE = 64
slow = pytest.mark.slow

TORCHVISION = [
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "shufflenet_v2_x0_5",
    "mnasnet0_5",
    "regnet_y_400mf",
    "vgg11_bn",
    "googlenet",
    "frozen_resnet18",  # detection-style backbone: torchvision.ops.FrozenBatchNorm2d
    pytest.param("efficientnet_b0", marks=slow),
    pytest.param("resnet50", marks=slow),
    pytest.param("densenet121", marks=slow),
    pytest.param("mobilenet_v3_large", marks=slow),
    pytest.param("resnext50_32x4d", marks=slow),
]

TIMM = [
    "resnet18",
    "efficientnet_b0",  # BatchNormAct2d
    "mobilenetv3_small_100",
    "tf_mobilenetv3_small_100",  # Conv2dSame cannot be traced: partial tracing
    "regnetx_002",
    "repvgg_a0",
    pytest.param("dla34", marks=slow),
    pytest.param("rexnet_100", marks=slow),
    pytest.param("cspresnet50", marks=slow),
]


def _torchvision(name: str) -> nn.Module:
    import torchvision

    if name == "frozen_resnet18":
        return torchvision.models.resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(**kwargs)


def _timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False)


def _model(src: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    m = _torchvision(name) if src == "torchvision" else _timm(name)
    return randomize_bn(m, torch.randn(8, 3, SIZE, SIZE)).eval()


def _graph_counts(model: nn.Module) -> tuple[int, int]:
    """(BatchNorm calls, Tune blocks) of ``model``."""
    return bn_calls(model), tune_blocks(model)


def _check(m: nn.Module) -> None:
    x = torch.randn(2, 3, SIZE, SIZE)

    # Deploy: exact in eval mode, no BN left where sites were transformed.
    d = normfx.convbn(m, mode="deploy")
    report = normfx.last_report(d)
    fold = report.get("fold_convbn")
    assert fold.sites == len(fold.changes) + len(fold.skips)
    assert len(fold.changes) > 0
    # What fold_convbn left in the graph, less the identity BatchNorms merge_branches merged.
    merged = " ".join(c.detail for c in report.get("merge_branches").changes)
    in_graph = [s for s in fold.skips if s.reason is not normfx.SkipReason.UNTRACEABLE
                and f"{s.site} " not in merged + " "]
    assert _graph_counts(d)[0] == len(in_graph)  # the report's counts are the graph's
    with torch.no_grad():
        assert rel_err(d(x), m(x)) < DEPLOY_RTOL

    # Tune: same keys; eval-mode gradients equal Eval mode's. Compared in float64: in float32,
    # near-ties in max-pooling route Eval mode's own gradients differently from the exact ones
    # (GoogLeNet: 1.7e-2 relative vs float64, while Tune is 9e-6 from float64), which would test
    # float32 rounding rather than Tune's math.
    t = normfx.convbn(m, mode="tune")
    assert list(t.state_dict()) == list(m.state_dict())
    assert _graph_counts(t)[1] == len(normfx.last_report(t).changes)
    m64, t64 = copy.deepcopy(m).double(), copy.deepcopy(t).double()
    x64 = x.double()
    proj = torch.randn_like(m64(x64))
    (m64(x64) * proj).sum().backward()
    (t64(x64) * proj).sum().backward()
    tp = dict(t64.named_parameters())
    for name, p in m64.named_parameters():
        if p.grad is not None and p.grad.norm() > 0:
            assert rel_err(tp[name].grad, p.grad) < GRAD_RTOL, name

    # Tune in train mode is Train mode, running statistics included. FrozenBatchNorm has no train
    # mode: its blocks fold in both modes (equal up to rounding, not bit for bit).
    m2, t2 = copy.deepcopy(m).train(), copy.deepcopy(t).train()
    xb = torch.randn(4, 3, SIZE, SIZE)
    torch.manual_seed(1)
    ym = m2(xb)
    torch.manual_seed(1)
    yt = t2(xb)
    if any(is_frozen_bn(mod) for mod in m.modules()):
        assert rel_err(yt, ym) < DEPLOY_RTOL
    else:
        assert torch.equal(ym, yt)
    sm, st = m2.state_dict(), t2.state_dict()
    for k in sm:
        assert torch.equal(sm[k], st[k]), k


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision(name):
    _check(_model("torchvision", name))


@pytest.mark.parametrize("name", TIMM)
def test_timm(name):
    _check(_model("timm", name))


def test_partial_tracing_reports_untraceable():
    m = _model("timm", "tf_mobilenetv3_small_100")
    d = normfx.convbn(m, mode="deploy")
    report = normfx.last_report(d)
    names = [n for n, _ in report.untraceable]
    assert "conv_stem" in names
    assert all("control flow" in why for _, why in report.untraceable)
    assert not report.skips  # the BNs after untraceable convs are still folded
