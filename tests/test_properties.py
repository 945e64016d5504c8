"""Property tests over conv configurations: Deploy and Tune are exact for every one of them."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normfx
from tests.conftest import DEPLOY_RTOL, GRAD_RTOL, randomize_bn, rel_err

CONV = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
        (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def conv_bn(draw):
    dims = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 4]))
    depthwise = draw(st.booleans())
    c_in = groups * draw(st.integers(1, 2))
    c_out = c_in * 2 if depthwise else groups * draw(st.integers(1, 3))
    if depthwise:
        groups = c_in
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    kw = dict(stride=stride, dilation=dilation, padding=padding, groups=groups, bias=draw(st.booleans()))
    if transposed:
        kw["output_padding"] = draw(st.integers(0, max(0, min(stride, dilation) - 1)))
    conv = CONV[(dims, transposed)](c_in, c_out, kernel, **kw)
    bn = BN[dims](c_out, affine=draw(st.booleans()), eps=draw(st.sampled_from([1e-5, 1e-3])))
    size = draw(st.integers(5, 7)) if dims < 3 else 5
    return nn.Sequential(conv, bn), (2, c_in) + (size,) * dims


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_bn())
def test_convbn_exact_for_any_conv(case):
    model, shape = case
    randomize_bn(model, torch.randn((8,) + shape[1:]))
    model.eval()
    x = torch.randn(shape, dtype=torch.float64)
    model = model.double()

    d = normfx.convbn(model, mode="deploy")
    assert len(normfx.last_report(d).changes) == 1
    assert rel_err(d(x), model(x)) < DEPLOY_RTOL

    t = normfx.convbn(model, mode="tune")
    xr = x.clone().requires_grad_()
    xt = x.clone().requires_grad_()
    ref = copy.deepcopy(model)
    proj = torch.randn_like(ref(x))
    (ref(xr) * proj).sum().backward()
    (t(xt) * proj).sum().backward()
    assert rel_err(xt.grad, xr.grad) < GRAD_RTOL
    tp = dict(t.named_parameters())
    for name, p in ref.named_parameters():
        assert rel_err(tp[name].grad, p.grad) < GRAD_RTOL, name


@st.composite
def bn_conv(draw):
    """BatchNorm directly before a conv: folds forward exactly when the padding allows it."""
    groups = draw(st.sampled_from([1, 3]))
    c_in = 3 * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 3))
    padding = draw(st.integers(0, 1))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    conv = nn.Conv2d(c_in, c_out, draw(st.integers(1, 3)), padding=padding, padding_mode=mode,
                     groups=groups, bias=draw(st.booleans()), stride=draw(st.integers(1, 2)))
    return nn.Sequential(nn.BatchNorm2d(c_in), conv), (2, c_in, 6, 6), padding == 0 or mode != "zeros"


@settings(max_examples=40, deadline=None)
@given(bn_conv())
def test_bn_before_conv_folds_only_where_exact(case):
    model, shape, exact = case
    randomize_bn(model, torch.randn((8,) + shape[1:]))
    model = model.eval().double()
    d = normfx.convbn(model, mode="deploy")
    report = normfx.last_report(d)
    assert len(report.changes) == (1 if exact else 0)
    x = torch.randn(shape, dtype=torch.float64)
    assert rel_err(d(x), model(x)) < DEPLOY_RTOL
