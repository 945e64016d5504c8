"""The fixed_point pass: sites, keys and training, FixedPointBatchNorm, calibration, deploy, K-hot
weights, folding first, and clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normfx
from normfx.nn import FixedPoint, FixedPointBatchNorm
from tests.conftest import randomize_bn, rel_err


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
    # a float checkpoint loads with strict=False: only the casts' own state is missing, every float
    # tensor lands (into the parametrized weights' masters too); a quantized checkpoint loads strictly
    q2 = normfx.fixed_point(_ResBlockNet(), bits=8)
    result = q2.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.endswith((".int_bits", ".observed_max")) for k in result.missing_keys)
    assert torch.equal(q2.conv1.parametrizations.weight.original, base.conv1.weight)
    assert torch.equal(q2.bn1.running_var, base.bn1.running_var)
    q2.load_state_dict(q.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(q2.state_dict().values(), q.state_dict().values()))


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


def test_weight_bits_narrows_only_the_weights(tmp_path):
    """W4A8: 4-bit conv/linear weights, every other cast (biases, activations, BatchNorm, adds) at 8
    bits; the weights' sums stay exact integer kernels in ONNX Runtime."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(8 * 6 * 6, 4))).eval()
    q = normfx.fixed_point(model, bits=8, weight_bits=4).eval()
    x = torch.randn(16, 3, 8, 8)
    normfx.calibrate(q, [x], progress=False)
    widths: dict[str, set[int]] = {}
    for m in q.modules():
        if isinstance(m, FixedPoint):
            widths.setdefault(m.site[0], set()).add(m.bits)
    assert widths.pop("weight") == {4}
    assert widths and all(w == {8} for w in widths.values())
    weights = torch.cat([q[0].weight.flatten(), q[4].weight.flatten()])
    assert 8 < torch.unique(weights).numel() <= 2 ** 4 * 2    # two layers, each on a 16-value grid
    report = normfx.export(q, x, tmp_path / "w4a8.onnx", rtol=0, atol=0)
    assert "exact integer sums: 2 of 2" in report.summary()
    with pytest.raises(ValueError, match="weight_bits"):
        normfx.fixed_point(model, weight_bits=1)


def test_k_hot_binary_code_counts_ones_of_the_word():
    """k_hot_code="binary": every BN scale has at most K ones in its magnitude's binary word (fewer
    values than CSD's K signed terms: 7·2^-3 is 2-hot in CSD, 3-hot in binary); the code survives
    deploy and shows in the report and repr."""
    q = normfx.fixed_point(_net(), bits=6, k_hot=2, k_hot_code="binary").eval()
    normfx.calibrate(q, [XQ])
    d = normfx.deploy(q)
    assert torch.equal(d(XQ), q(XQ))
    step = 2.0 ** (float(d.bn1.scale_q.integer_bits()) - 6)
    assert all(bin(abs(round(v / step))).count("1") <= 2 for v in d.bn1.deployed_scale.tolist())
    binary = set(q.bn1.scale_q.k_hot_table().tolist())
    csd = normfx.fixed_point(_net(), bits=6, k_hot=2).bn1.scale_q
    with torch.no_grad():
        csd.int_bits.copy_(q.bn1.scale_q.int_bits)
    assert binary < set(csd.k_hot_table().tolist())
    assert "k_hot_code='binary'" in repr(q.bn1.scale_q)
    assert "(binary)" in next(c.detail for c in normfx.last_report(normfx.fixed_point(
        _net(), k_hot=2, k_hot_code="binary")).changes if c.site == "bn1")
    with pytest.raises(ValueError, match="k_hot_code must be one of"):
        normfx.fixed_point(_net(), k_hot=2, k_hot_code="naf")


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


class _OwnForwardLinear(nn.Linear):
    """timm's ``layers.Linear``: a Linear subclass whose forward calls F.linear itself (so it is
    traced, not a leaf)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _StdConv(nn.Conv2d):
    """timm's ``ScaledStdConv2d``: the weight is standardized in the forward before the conv."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, padding=1)


class _SubclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _StdConv(3, 4, 3)
        self.fc = _OwnForwardLinear(4, 5)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


def test_conv_and_linear_subclasses_with_their_own_forward_get_their_weights_cast():
    """Their forward is traced as a region of its own while the caller's region parametrizes their
    weight: the region reads the parametrized weight from the module (it crashed with
    "'Linear' object has no attribute 'weight'" on 10 timm models)."""
    base = _SubclassNet().eval()
    q = normfx.fixed_point(base, bits=8)
    normfx.calibrate(q, [XQ])
    q.eval()
    assert {"conv.weight", "fc.weight", "fc.bias"} <= {c.site for c in normfx.last_report(q).changes}
    for m in (q.conv, q.fc):
        assert isinstance(m, type(base.get_submodule("conv" if m is q.conv else "fc")))
        cast = m.parametrizations.weight[0]
        grid = m.weight * 2.0 ** (cast.bits - cast.int_bits.round())
        assert torch.equal(grid, grid.round())                   # the weight it multiplies by is on the grid
    # The linear multiplies by the cast weight: its output equals F.linear with it, cast.
    feats = {}
    q.fc.register_forward_pre_hook(lambda mod, a: feats.setdefault("x", a[0]))
    out = q(XQ)
    out_cast = [m for m in q.modules() if isinstance(m, FixedPoint) and m.site == ("output", "linear")]
    assert len(out_cast) == 1
    assert torch.equal(out, out_cast[0](F.linear(feats["x"], q.fc.weight, q.fc.bias)))
    assert rel_err(out, base(XQ)) < 0.1
    ref = normfx.fixed_point(base, bits=8)
    ref.load_state_dict(q.state_dict())
    assert torch.equal(ref.eval()(XQ), out)
    assert "parametrizations" not in dict(base.fc.named_children())   # the caller's model untouched
