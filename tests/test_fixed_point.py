"""Fixed point (QFX): every ap_fixed rounding and overflow mode against an integer reference, the
straight-through gradients of the binary point, calibration, and K-hot (CSD) projection."""
from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normfx.functional import (OVERFLOW, ROUNDING, csd_terms, fixed_point_cast, integer_range, k_hot_project,
                               k_hot_table)
from normfx.nn.fixed_point import FixedPoint


def ref_cast(x: float, bits: int, int_bits: int, signed: bool, rounding: str, overflow: str) -> float:
    """ap_fixed<bits, int_bits, Q, O>(x) in exact rational/integer arithmetic."""
    f = bits - int_bits
    v = Fraction(x) * Fraction(2) ** f
    fl = math.floor(v)
    d = v - fl
    if rounding == "floor":
        m = fl
    elif rounding == "trunc":
        m = math.trunc(v)
    elif d != Fraction(1, 2):
        m = fl + (1 if d > Fraction(1, 2) else 0)
    else:
        m = fl + {"nearest_even": fl % 2, "half_up": 1, "half_down": 0, "half_zero": int(v < 0),
                  "half_away": int(v > 0)}[rounding]
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    if overflow == "saturate":
        m = min(max(m, lo), hi)
    elif overflow == "saturate_sym":
        m = min(max(m, -hi if signed else 0), hi)
    elif overflow == "saturate_zero":
        m = 0 if (m < lo or m > hi) else m
    else:
        m = (m - lo) % (2 ** bits) + lo
    return float(Fraction(m) / Fraction(2) ** f)


def _crafted(bits: int, int_bits: int, signed: bool) -> list[float]:
    """Ties (k + 1/2 LSB) of both parities and signs, exact values, and every overflow boundary."""
    lsb = 2.0 ** -(bits - int_bits)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    ks = [0, 1, 2, 3, -1, -2, -3, lo, hi, lo - 1, hi + 1, lo + 1, hi - 1, 2 * hi + 5, 2 * lo - 5]
    vals = []
    for k in ks:
        for frac in (0.0, 0.5, 0.25, 0.75, -0.5, 0.5 - 2 ** -12, 0.5 + 2 ** -12):
            vals.append((k + frac) * lsb)
    return vals


MODES = [(r, o) for r in ROUNDING for o in OVERFLOW]


@pytest.mark.parametrize("rounding,overflow", MODES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits,int_bits", [(8, 3), (4, 1), (6, -2), (5, 7), (16, 8)])
def test_every_mode_matches_the_integer_reference(rounding, overflow, signed, bits, int_bits):
    xs = _crafted(bits, int_bits, signed)
    got = fixed_point_cast(torch.tensor(xs, dtype=torch.float64), bits, int_bits, signed=signed,
                           rounding=rounding, overflow=overflow)
    want = [ref_cast(x, bits, int_bits, signed, rounding, overflow) for x in xs]
    assert got.tolist() == want
    # float32 gives the same numbers (the scaling is by a power of two)
    got32 = fixed_point_cast(torch.tensor(xs, dtype=torch.float32), bits, int_bits, signed=signed,
                             rounding=rounding, overflow=overflow)
    want32 = [ref_cast(float(torch.tensor(x, dtype=torch.float32)), bits, int_bits, signed, rounding, overflow)
              for x in xs]
    assert got32.tolist() == want32


def test_hls_names_are_accepted_and_ties_differ_by_mode():
    x = torch.tensor([2.5, -2.5, 3.5, -3.5])
    cast = {r: fixed_point_cast(x, 8, 8, rounding=hls).tolist() for r, hls in ROUNDING.items()}
    assert cast["nearest_even"] == [2.0, -2.0, 4.0, -4.0]
    assert cast["half_up"] == [3.0, -2.0, 4.0, -3.0]
    assert cast["half_down"] == [2.0, -3.0, 3.0, -4.0]
    assert cast["half_zero"] == [2.0, -2.0, 3.0, -3.0]
    assert cast["half_away"] == [3.0, -3.0, 4.0, -4.0]
    assert cast["floor"] == [2.0, -3.0, 3.0, -4.0]
    assert cast["trunc"] == [2.0, -2.0, 3.0, -3.0]
    with pytest.raises(ValueError, match="unknown rounding mode 'AP_RND_ODD'"):
        fixed_point_cast(x, 8, 8, rounding="AP_RND_ODD")


@settings(max_examples=300, deadline=None)
@given(x=st.floats(-1e4, 1e4, allow_nan=False, width=32), bits=st.integers(2, 16), int_bits=st.integers(-4, 20),
       signed=st.booleans(), mode=st.sampled_from(MODES))
def test_random_values_match_the_reference(x, bits, int_bits, signed, mode):
    rounding, overflow = mode
    got = fixed_point_cast(torch.tensor([x]), bits, int_bits, signed=signed, rounding=rounding, overflow=overflow)
    assert got.item() == ref_cast(x, bits, int_bits, signed, rounding, overflow)


# --- the FixedPoint module ---------------------------------------------------------------------

@pytest.mark.parametrize("rounding,overflow", MODES)
def test_module_forward_equals_the_cast(rounding, overflow):
    q = FixedPoint(6, None, rounding=rounding, overflow=overflow, init_int_bits=2.4)  # rounds to I = 2
    x = torch.linspace(-5, 5, 1001)
    assert torch.equal(q(x), fixed_point_cast(x, 6, 2, rounding=rounding, overflow=overflow))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [2, 5, 8, 16, 22, 23, 24])
@pytest.mark.parametrize("signed,overflow", [(True, "saturate"), (True, "saturate_sym"), (False, "saturate")])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("scalar_step", [True, False])
def test_module_forward_is_exact_on_ties_and_far_out_of_range(dtype, bits, signed, overflow, grad, scalar_step,
                                                              monkeypatch):
    """The module's forward (including its shortcut for round-to-nearest-even) against the
    reference cast: every tie, the range edges, values far beyond the word (up to ±inf)."""
    if not scalar_step:
        monkeypatch.setattr("normfx.nn.fixed_point._SCALAR_STEP_DEVICES", set())
    i = 3
    s = 2.0 ** (i - bits)
    k = torch.arange(-(2 ** min(bits, 12)) - 3, 2 ** min(bits, 12) + 3, dtype=torch.float64)
    edges = torch.tensor([2.0 ** (bits - 1), 2.0 ** bits, 2.0 ** 22, 2.0 ** 23, 2.0 ** 30, 1e30], dtype=torch.float64)
    v = torch.cat([k, k + 0.5, k + 0.25, k - 0.5, edges, -edges, edges - 0.5, -edges + 0.5, -edges - 0.5])
    x = (v * s).to(dtype)
    q = FixedPoint(bits, None, signed=signed, overflow=overflow, init_int_bits=i)
    got = q(x.clone().requires_grad_(grad)).detach()
    assert torch.equal(got, fixed_point_cast(x, bits, i, signed=signed, overflow=overflow))
    lo, hi = integer_range(bits, signed)
    lo = -hi if overflow == "saturate_sym" and signed else lo
    inf = q(torch.tensor([float("inf"), -float("inf")], dtype=dtype, requires_grad=grad)).detach()
    assert inf.tolist() == [hi * s, lo * s]                         # infinities saturate


def _int_bits_grad(q: FixedPoint, x: torch.Tensor) -> float:
    q.zero_grad()
    ((q(x) - x) ** 2).sum().backward()
    return float(q.int_bits.grad)


def test_binary_point_moves_toward_less_clipping_when_clipping_dominates():
    x = torch.randn(4096) * 8            # |x| up to ~30
    q = FixedPoint(8, None, init_int_bits=2)   # range [-2, 2): heavy clipping
    assert _int_bits_grad(q, x) < 0      # gradient descent raises I
    opt = torch.optim.SGD(q.parameters(), lr=1e-3)
    for _ in range(200):
        opt.zero_grad()
        ((q(x) - x) ** 2).mean().backward()
        opt.step()
    assert int(q.integer_bits()) >= 5


def test_binary_point_moves_toward_more_fraction_bits_when_rounding_dominates():
    x = torch.randn(4096) * 0.01         # tiny values
    q = FixedPoint(8, None, init_int_bits=6)   # LSB 2^-2: everything rounds to 0 or ±0.25
    assert _int_bits_grad(q, x) > 0      # gradient descent lowers I (more fraction bits)


def test_input_gradient_is_straight_through_in_range_and_zero_when_clipped():
    q = FixedPoint(4, 2)  # range [-2, 1.75], fixed binary point
    x = torch.tensor([-3.0, -1.3, 0.2, 1.7, 2.5], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert not q.trainable and "int_bits" in dict(q.named_buffers())


def test_per_channel_and_calibration():
    x = torch.randn(16, 3, 5, 5) * torch.tensor([0.1, 1.0, 30.0]).view(1, 3, 1, 1)
    q = FixedPoint(8, None, channels=3, axis=1)
    q.observing = True
    assert torch.equal(q(x), x)          # observing returns x unchanged
    q.calibrate_from_observed()
    ib = q.integer_bits().tolist()
    assert ib[0] < ib[1] < ib[2]
    y = q(x)
    for c in range(3):                   # nothing clips, and one more fraction bit would clip
        mx = x[:, c].abs().max()
        assert mx < 2 ** (ib[c] - 1) <= 2 * mx
    assert (y - x).abs().amax() <= 2 ** (max(ib) - 8)
    assert q.hls_type(2) == f"ap_fixed<8, {int(ib[2])}, AP_RND_CONV, AP_SAT>"


# --- K-hot ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_hot_projection_is_the_nearest_csd_value(k):
    exps = range(-6, 3)
    table = k_hot_table(k, exps)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(300, generator=g, dtype=torch.float64) * 2
    got = k_hot_project(x, table)
    want = [csd_terms(float(v), k, exps) for v in x]
    assert got.tolist() == want
    # every projected value really has at most k non-zero signed-power-of-two terms
    assert set(got.tolist()) <= set(table.tolist())


# --- the pass -------------------------------------------------------------------------------------


import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import normfx  # noqa: E402
from normfx.passes.fixed_point import FixedPointBatchNorm  # noqa: E402
from tests.conftest import randomize_bn, rel_err  # noqa: E402


class _ResBlockNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


XQ = torch.randn(4, 3, 8, 8)


def _net() -> nn.Module:
    return randomize_bn(_ResBlockNet(), XQ)


def test_pass_sites_keys_and_training():
    base = _net()
    keys = list(base.state_dict())
    q = normfx.fixed_point(base, bits=8)
    res = normfx.last_report(q).get("fixed_point")
    sites = {c.site for c in res.changes}
    assert {"conv1.weight", "conv1.bias", "conv2.weight", "fc.weight", "fc.bias", "bn1", "bn2"} <= sites
    assert sum(c.action == "shared input cast" for c in res.changes) == 1      # the residual add
    assert isinstance(q.bn1, FixedPointBatchNorm) and isinstance(q.bn2, FixedPointBatchNorm)
    sd = q.state_dict()
    assert [k for k in sd if k in keys] == keys                                  # original keys, in order
    assert torch.equal(sd["conv1.weight"], base.conv1.weight)                    # the float master weight
    # train: weights and binary points get gradients
    q.train()
    q(XQ).square().mean().backward()
    assert q.conv1.parametrizations.weight.original.grad is not None
    casts = [m for m in q.modules() if isinstance(m, FixedPoint)]
    assert casts and all(m.int_bits.grad is not None for m in casts if m.trainable)
    # a float checkpoint loads strictly into the quantized model
    q2 = normfx.fixed_point(_ResBlockNet(), bits=8)
    q2.load_state_dict(base.state_dict(), strict=False)
    q2.load_state_dict(q.state_dict())


@pytest.mark.parametrize("shape,momentum", [((6, 5, 4, 4), 0.1), ((7, 5), None), ((3, 5, 6), 0.3)])
def test_batchnorm_training_matches_plain_autograd_and_updates_stats_like_batchnorm(shape, momentum):
    """The training path (fused statistics and multiply-add kernels) against the formula written
    with plain autograd ops: same output up to a fused multiply-add's last bit, same gradients for
    the input, γ, β and both binary points, and running statistics updated as nn.BatchNorm does."""
    torch.manual_seed(0)
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)]
    ref_bn = kind(5, momentum=momentum)
    with torch.no_grad():
        ref_bn.weight.uniform_(0.5, 2.0)
        ref_bn.bias.uniform_(-1.0, 1.0)
    fq = FixedPointBatchNorm.from_bn(copy.deepcopy(ref_bn), scale_q=FixedPoint(8, None, init_int_bits=2.0),
                                     shift_q=FixedPoint(8, None, init_int_bits=3.0), k_hot=None).train()
    twin = copy.deepcopy(fq)
    view = (1, -1) + (1,) * (len(shape) - 2)
    for _ in range(3):
        x = (torch.randn(shape) * 2 + 0.5).requires_grad_()
        w = torch.randn(shape)
        y = fq(x)
        (y * w).sum().backward()
        ref_bn(x.detach())                                   # running statistics as BatchNorm keeps them
        x2 = x.detach().clone().requires_grad_()
        var, mean = torch.var_mean(x2, [d for d in range(x2.dim()) if d != 1], unbiased=False)
        scale = torch.rsqrt(var + twin.eps) * twin.weight
        s, t = twin.quantized_scale_shift(scale, twin.bias - mean * scale)
        y2 = x2 * s.view(view) + t.view(view)
        (y2 * w).sum().backward()
        assert rel_err(y, y2) < 1e-6
        assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
        for a, b in [(fq.weight, twin.weight), (fq.bias, twin.bias), (fq.scale_q.int_bits, twin.scale_q.int_bits),
                     (fq.shift_q.int_bits, twin.shift_q.int_bits)]:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-4)
            a.grad = b.grad = None
        assert torch.allclose(fq.running_mean, ref_bn.running_mean, rtol=1e-6, atol=1e-7)
        assert torch.allclose(fq.running_var, ref_bn.running_var, rtol=1e-6, atol=1e-7)
        assert fq.num_batches_tracked == ref_bn.num_batches_tracked


def test_batchnorm_training_with_an_input_dtype_other_than_its_statistics():
    """float64 activations through a float32 FixedPointBatchNorm: statistics fall back to var_mean,
    the running statistics keep their dtype and move as BatchNorm's would."""
    fq = FixedPointBatchNorm.from_bn(nn.BatchNorm2d(3), scale_q=FixedPoint(8, None, init_int_bits=2.0),
                                     shift_q=FixedPoint(8, None, init_int_bits=2.0), k_hot=None).train()
    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3 + 1).requires_grad_()
    fq(x).sum().backward()
    var, mean = torch.var_mean(x.detach(), [0, 2, 3], unbiased=True)
    assert fq.running_mean.dtype == torch.float32 and x.grad is not None
    assert torch.allclose(fq.running_mean, 0.1 * mean.float(), rtol=1e-5)
    assert torch.allclose(fq.running_var, 0.9 + 0.1 * var.float(), rtol=1e-5)


def test_wide_words_track_the_float_model_and_caller_untouched():
    base = _net().eval()
    state = copy.deepcopy(base.state_dict())
    q = normfx.fixed_point(base, bits=20).eval()
    normfx.calibrate(q, [XQ])
    assert rel_err(q(XQ), base(XQ)) < 1e-3
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    assert isinstance(base.bn1, nn.BatchNorm2d) and not isinstance(base.bn1, FixedPointBatchNorm)


def test_calibration_leaves_no_activation_clipping():
    q = normfx.fixed_point(_net(), bits=8).eval()
    normfx.calibrate(q, [XQ, XQ * 0.5])
    acts = [m for n, m in q.named_modules() if isinstance(m, FixedPoint) and n.startswith("fxq_")]
    assert acts
    for m in acts:
        lim = 2.0 ** (m.integer_bits() - (1 if m.signed else 0))
        assert (m.observed_max < lim).all() and (m.observed_max >= lim / 2).all() | (m.observed_max == 0).all()


def test_deploy_freezes_binary_points_and_keeps_the_numbers():
    q = normfx.fixed_point(_net(), bits=6, k_hot=2).eval()
    normfx.calibrate(q, [XQ])
    before = q(XQ)
    d = normfx.deploy(q)
    assert not any(isinstance(m, FixedPoint) and m.trainable for m in d.modules())
    assert torch.equal(d(XQ), before)
    assert isinstance(d.bn1, FixedPointBatchNorm)          # never folded
    # BN scales are 2-hot: at most two signed powers of two on the scale's grid
    table = set(d.bn1.scale_q.k_hot_table().tolist())
    assert set(d.bn1.deployed_scale.tolist()) <= table
    assert all(len([b for b in _csd(v) if b]) <= 2 for v in d.bn1.deployed_scale.tolist())


def _csd(v: float) -> list[int]:
    """Non-adjacent form (canonical signed digits) of v·2^20: its non-zero digits are the minimum."""
    n, digits = round(v * 2 ** 20), []
    while n:
        d = 0 if n % 2 == 0 else 2 - (n % 4)
        digits.append(d)
        n = (n - d) // 2
    return digits


def test_k_hot_weights():
    q = normfx.fixed_point(_net(), bits=6, k_hot=2, k_hot_weights=True).eval()
    w = q.conv2.weight
    assert all(len([b for b in _csd(v) if b]) <= 2 for v in w.flatten().tolist())
    assert len(set(w.flatten().tolist())) > 4
    with pytest.raises(ValueError, match="k_hot_weights=True needs k_hot"):
        normfx.fixed_point(_net(), k_hot_weights=True)


def test_plain_bn_after_a_fixed_point_conv_is_not_folded():
    q = normfx.fixed_point(_net().eval(), bits=8, targets=("weight", "bias")).eval()
    d = normfx.deploy(q)
    skips = normfx.last_report(d).get("fold_convbn").skips
    assert {s.site for s in skips} >= {"bn1", "bn2"}
    assert all("fixed point" in s.detail for s in skips)


def test_fold_bn_first():
    base = _net().eval()
    q = normfx.fixed_point(base, bits=16, fold_bn=True).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    normfx.calibrate(q, [XQ])
    assert rel_err(q(XQ), base(XQ)) < 2e-2


def test_resnet18_runs_calibrates_and_trains():
    import torchvision

    m = randomize_bn(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32))
    q = normfx.fixed_point(m, bits=8, per_channel=True)
    normfx.calibrate(q, [torch.randn(4, 3, 32, 32)])
    q.train()
    q(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
    assert q.conv1.parametrizations.weight[0].int_bits.shape == (64,)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown target\(s\) \['acts'\]"):
        normfx.fixed_point(_net(), targets=("acts",))
    with pytest.raises(ValueError, match="bits must be in"):
        normfx.fixed_point(_net(), bits=40)
    with pytest.raises(ValueError, match="k_hot must be"):
        normfx.fixed_point(_net(), k_hot=9)
    with pytest.raises(ValueError, match="unknown overflow mode 'clip'"):
        normfx.fixed_point(_net(), overflow="clip")
    with pytest.raises(ValueError, match="no trainable FixedPoint"):
        normfx.calibrate(_net(), [XQ])


# --- export: bit-exact in ONNX Runtime ------------------------------------------------------------

def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("make,x,bits,kw", [
    (_net, XQ, 6, dict(k_hot=2, k_hot_weights=True)),
    (_net, XQ, 12, {}),
    (_mlp, torch.randn(8, 12), 8, dict(per_channel=True)),
], ids=["cnn_bn_add_6bit_2hot", "cnn_bn_add_12bit_int16", "mlp_8bit_per_channel"])
def test_export_is_bit_exact_in_onnx_runtime(make, x, bits, kw, tmp_path):
    import json

    import onnx

    q = normfx.fixed_point(make().eval(), bits=bits, **kw).eval()
    normfx.calibrate(q, [x])
    path = tmp_path / "q.onnx"
    report = normfx.export(q, x, path, rtol=0.0, atol=0.0)      # raises on any difference
    assert report.verified and all(o.max_abs == 0.0 for o in report.outputs)
    counts = report.op_counts
    named = [(n, m) for n, m in normfx.deploy(q).named_modules() if isinstance(m, FixedPoint)]
    casts = [m for _, m in named]
    n_bn = sum(isinstance(m, FixedPointBatchNorm) for m in q.modules())
    n_add = sum(n.endswith("_in") for n, _ in named)  # one cast, called on both inputs of an add
    # every cast is one Q/DQ pair per call; BN scale/shift are baked into constants at deploy
    assert counts["QuantizeLinear"] == counts["DequantizeLinear"] == len(casts) - 2 * n_bn + n_add
    proto = onnx.load(str(path))
    q_types = {n.output[0]: n for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    assert q_types
    side = json.loads((tmp_path / "q.fixed_point.json").read_text())
    assert len(side["tensors"]) == len(casts)
    types = {t["tensor"]: t for t in side["tensors"]}
    first = "0.weight" if make is _mlp else "conv1.weight"
    assert types[first]["layer"] == first.split(".")[0]
    assert all(t["rounding"] == "AP_RND_CONV" and t["overflow"] == "AP_SAT" for t in side["tensors"])
    assert "verified with ONNX Runtime's graph optimizations at BASIC" in report.summary()


def test_modes_onnx_cannot_express_refuse_but_write_the_json(tmp_path):
    q = normfx.fixed_point(_mlp().eval(), bits=8, rounding="floor", overflow="wrap").eval()
    normfx.calibrate(q, [torch.randn(4, 12)])
    with pytest.raises(normfx.ExportError, match=r"rounds with floor \(AP_TRN\) and overflows with wrap \(AP_WRAP\)"):
        normfx.export(q, torch.randn(4, 12), tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()
    side = (tmp_path / "q.fixed_point.json").read_text()
    assert "ap_fixed<8, " in side and "AP_TRN, AP_WRAP>" in side


def _reference_ste(x, int_bits, bits, axis, rounding, overflow, signed=True):
    """The straight-through cast written with plain autograd ops (what the fused Function computes)."""
    from normfx.functional import integer_range, overflow_fixed, round_fixed

    ib = int_bits + (torch.round(int_bits) - int_bits).detach()
    shape = [1] * x.dim()
    shape[axis] = -1
    step = torch.exp2((ib.reshape(shape) if ib.numel() > 1 else ib.reshape(())) - bits)
    v = x / step
    with torch.no_grad():
        m = round_fixed(v, rounding)
        lo, hi = integer_range(bits, signed)
        lo = -hi if overflow == "saturate_sym" and signed else lo
        inside = (m >= lo) & (m <= hi)
        out_m, sat_m = overflow_fixed(m, bits, signed, overflow), m.clamp(lo, hi)
    ste_in = (v + (m - v).detach()) * step
    ste_out = out_m * step.detach() + (sat_m * step - (sat_m * step).detach())
    return torch.where(inside, ste_in, ste_out)


@pytest.mark.parametrize("rounding,overflow", [("nearest_even", "saturate"), ("floor", "wrap"),
                                               ("half_away", "saturate_zero"), ("trunc", "saturate_sym")])
@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("scalar_step", [True, False])
def test_fused_gradients_equal_the_plain_autograd_formulation(rounding, overflow, channels, signed, scalar_step,
                                                              monkeypatch):
    if not scalar_step:   # the path accelerators take: the step stays a tensor
        monkeypatch.setattr("normfx.nn.fixed_point._SCALAR_STEP_DEVICES", set())
    x = (torch.randn(3, 4, 5, 5) * 3).requires_grad_()
    q = FixedPoint(5, None, rounding=rounding, overflow=overflow, channels=channels, axis=1, init_int_bits=1.6,
                   signed=signed)
    w = torch.randn(3, 4, 5, 5)
    (q(x) * w).sum().backward()
    gx, gi = x.grad.clone(), q.int_bits.grad.clone()
    x.grad = None
    ib = q.int_bits.detach().clone().requires_grad_()
    (_reference_ste(x, ib, 5, 1, rounding, overflow, signed) * w).sum().backward()
    assert torch.equal(gx, x.grad)
    assert torch.allclose(gi, ib.grad, rtol=1e-5, atol=1e-5)
