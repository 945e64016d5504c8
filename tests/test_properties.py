"""Property tests over conv configurations: Deploy and Tune are exact for every one of them."""
from __future__ import annotations

import copy
import itertools

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


def _binary_ones(value: float, lsb_exp: int) -> int:
    """Ones in the binary word of ``|value|`` on the grid of ``2^lsb_exp``."""
    n = round(value / 2.0 ** lsb_exp)
    assert n * 2.0 ** lsb_exp == value, "value is off the grid"
    return bin(abs(n)).count("1")


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 3), lo=st.integers(-4, 2), width=st.integers(1, 6), code=st.sampled_from(["csd", "binary"]))
def test_k_hot_table_is_every_value_with_k_terms(k, lo, width, code):
    """The table holds exactly the grid values whose term count is at most K, and k_hot_terms counts
    them as the reference counters do."""
    from normfx.functional import k_hot_table, k_hot_terms

    table = k_hot_table(k, range(lo, lo + width), code=code)
    step = 2.0 ** lo
    terms = [2.0 ** e for e in range(lo, lo + width)]
    if code == "binary":   # distinct powers of one sign
        sums = {sum(c) for r in range(k + 1) for c in itertools.combinations(terms, r)}
    else:                  # any K signed powers, repeats allowed
        signed = [s * t for t in terms for s in (1, -1)]
        sums = {sum(c) for r in range(k + 1) for c in itertools.combinations_with_replacement(signed, r)}
    expected = sums | {-v for v in sums} if code == "binary" else sums
    assert set(table.tolist()) == {v + 0.0 for v in expected}
    count = (lambda v: _signed_digit_terms(v, lo)) if code == "csd" else (lambda v: _binary_ones(v, lo))
    assert all(count(v) <= k for v in table.tolist())
    assert torch.equal(k_hot_terms(table, step, code), torch.tensor([count(v) for v in table.tolist()]))
    assert not torch.signbit(table[table == 0]).any()


def _signed_digit_terms(value: float, lsb_exp: int) -> int:
    """The fewest signed powers of two summing to ``value`` (its non-adjacent form's weight)."""
    n = round(value / 2.0 ** lsb_exp)
    assert n * 2.0 ** lsb_exp == value, "value is off the grid"
    terms = 0
    while n:
        if n % 2:
            n -= 2 - (n % 4)  # digit ±1 chosen so the next digit is 0
            terms += 1
        n //= 2
    return terms


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(per_channel=st.booleans(), k=st.integers(1, 3), bits=st.integers(3, 8),
       rounding=st.sampled_from(["nearest_even", "half_up", "floor", "trunc", "half_away"]),
       overflow=st.sampled_from(["saturate", "saturate_sym", "wrap", "saturate_zero"]),
       int_bits=st.lists(st.integers(-2, 3), min_size=4, max_size=4), seed=st.integers(0, 2**16),
       code=st.sampled_from(["csd", "binary"]))
def test_k_hot_weights_deploy_bit_for_bit(per_channel, k, bits, rounding, overflow, int_bits, seed, code):
    """Issue 11.2: deploy bakes exactly the K-hot weights the trained model computed with, each a
    sum of at most K signed powers of two (``csd``) or with at most K ones in its magnitude's word
    (``binary``) on its own channel's grid."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(4, 6, generator=g) * 0.7)
    q = normfx.fixed_point(model, bits=bits, per_channel=per_channel, k_hot=k, k_hot_weights=True,
                           rounding=rounding, overflow=overflow, targets=("weight",), k_hot_code=code)
    cast = q.get_submodule("0").parametrizations.weight[0]
    with torch.no_grad():  # binary points as training may leave them, different per channel
        cast.int_bits.copy_(torch.tensor(int_bits[: cast.int_bits.numel()], dtype=torch.float32))
    q.eval()
    x = torch.randn(3, 6, generator=g)
    trained_w = q.get_submodule("0").weight.detach().clone()
    d = normfx.deploy(q)
    deployed_w = d.get_submodule("0").weight.detach()
    assert torch.equal(deployed_w, trained_w)
    assert torch.equal(d(x), q(x))
    ib = cast.integer_bits().reshape(-1)
    for row, w_row in enumerate(deployed_w):
        lsb = int(ib[row if ib.numel() > 1 else 0]) - bits
        for v in w_row.tolist():
            terms = _signed_digit_terms(v, lsb) if code == "csd" else _binary_ones(v, lsb)
            assert terms <= k, (v, lsb, code)
