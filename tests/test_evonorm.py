"""normfx.evonorm and normfx.nn.EvoNorm2dB0/S0: the formulas of each preset against a direct float64
implementation, the pitfalls users of other ports hit, and the pass on real models."""
from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import normfx
from normfx.nn import EvoNorm2dB0, EvoNorm2dS0
from normfx.nn.evonorm import PRESETS
from tests.conftest import randomize_bn, rel_err


# --- the formulas, in float64, written from the paper -------------------------------------------------

def _b0_ref(x, gamma, beta, v, running_var, eps, momentum, unbiased, training):
    """B0 = x / max(sqrt(s2_batch + eps), v x + sqrt(s2_instance + eps)) * gamma + beta."""
    x = x.double()
    view = (1, -1, 1, 1)
    if training:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3))
        n = x.numel() / x.shape[1]
        new_running = (1 - momentum) * running_var.double() + momentum * var * (n / (n - 1) if unbiased else 1.0)
    else:
        var, new_running = running_var.double(), running_var.double()
    inst_mean = x.mean(dim=(2, 3), keepdim=True)
    inst_var = ((x - inst_mean) ** 2).mean(dim=(2, 3), keepdim=True)
    den = torch.maximum((var + eps).sqrt().view(view), v.double().view(view) * x + (inst_var + eps).sqrt())
    return x / den * gamma.double().view(view) + beta.double().view(view), new_running


def _s0_ref(x, gamma, beta, v, groups, eps):
    """S0 = x * sigmoid(v x) / sqrt(s2_group + eps) * gamma + beta."""
    x = x.double()
    n, c, h, w = x.shape
    g = x.reshape(n, groups, c // groups, h, w)
    var = ((g - g.mean(dim=(2, 3, 4), keepdim=True)) ** 2).mean(dim=(2, 3, 4), keepdim=True)
    std = (var + eps).sqrt().expand_as(g).reshape(n, c, h, w)
    view = (1, -1, 1, 1)
    return x * torch.sigmoid(v.double().view(view) * x) / std * gamma.double().view(view) + beta.double().view(view)


def _randomize(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1.0)
        for name, b in m.named_buffers():
            if name == "running_var":
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return m


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_b0_matches_the_formula(preset, training):
    p = PRESETS[preset]
    m = _randomize(EvoNorm2dB0(6, eps=p.eps_b0, momentum=p.momentum, unbiased_running=p.unbiased_running))
    m.train(training)
    x = torch.randn(5, 6, 4, 3) * 2 + 0.3
    before = m.running_var.clone()
    ref, ref_running = _b0_ref(x, m.weight, m.bias, m.v, before, p.eps_b0, p.momentum, p.unbiased_running, training)
    out = m(x)
    assert rel_err(out.double(), ref) < 1e-6
    assert torch.allclose(m.running_var.double(), ref_running, rtol=1e-6)
    assert training or torch.equal(m.running_var, before)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_s0_matches_the_formula_in_train_and_eval(preset, groups):
    p = PRESETS[preset]
    m = _randomize(EvoNorm2dS0(6, groups=groups, eps=p.eps_s0))
    x = torch.randn(3, 6, 5, 4) * 1.5 - 0.2
    ref = _s0_ref(x, m.weight, m.bias, m.v, groups, p.eps_s0)
    assert rel_err(m.train()(x).double(), ref) < 1e-6
    assert torch.equal(m.eval()(x), m.train()(x))          # no batch statistics: eval = train


@pytest.mark.parametrize("cls", [EvoNorm2dB0, EvoNorm2dS0])
def test_without_nonlinearity_is_the_affine(cls):
    m = _randomize(cls(6, apply_act=False) if cls is EvoNorm2dB0 else cls(6, groups=3, apply_act=False))
    assert m.v is None
    x = torch.randn(2, 6, 3, 3)
    assert torch.allclose(m(x), x * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1), atol=1e-6)


def test_presets_differ_where_documented():
    assert (PRESETS["paper"].eps_b0, PRESETS["timm"].eps_b0) == (1e-5, 1e-3)
    assert not PRESETS["paper"].unbiased_running and PRESETS["timm"].unbiased_running
    assert PRESETS["paper"].momentum == PRESETS["timm"].momentum == 0.1


def test_timm_preset_matches_timm():
    """preset="timm": the same numbers as timm's own EvoNorm2dB0/S0 (train and eval, running var)."""
    from timm.layers import EvoNorm2dB0 as TimmB0
    from timm.layers import EvoNorm2dS0 as TimmS0

    p = PRESETS["timm"]
    x = torch.randn(4, 8, 5, 5)
    ours = _randomize(EvoNorm2dB0(8, eps=p.eps_b0, momentum=p.momentum, unbiased_running=True))
    theirs = TimmB0(8)
    theirs.load_state_dict(ours.state_dict())
    for mode in (True, False):
        assert torch.allclose(ours.train(mode)(x), theirs.train(mode)(x), rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.running_var, theirs.running_var, rtol=1e-6)
    ours_s, theirs_s = _randomize(EvoNorm2dS0(8, groups=4, eps=p.eps_s0)), TimmS0(8, groups=4)
    theirs_s.load_state_dict(ours_s.state_dict())
    assert torch.allclose(ours_s(x), theirs_s(x), rtol=1e-5, atol=1e-6)


# --- what users of other ports hit -------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_b0_on_a_1x1_feature_map_is_finite(training):
    """The instance variance of one element is 0 (biased), not NaN: the 1×1 maps at the end of a
    CIFAR ResNet or a squeeze-excite branch."""
    m = EvoNorm2dB0(4).train(training)
    x = torch.randn(3, 4, 1, 1, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    s = EvoNorm2dS0(4, groups=4)
    assert torch.isfinite(s(torch.randn(3, 4, 1, 1))).all()


@pytest.mark.parametrize("cls", [EvoNorm2dB0, EvoNorm2dS0])
def test_channels_last_input_gives_the_same_statistics(cls):
    m = _randomize(cls(8) if cls is EvoNorm2dB0 else cls(8, groups=2))
    m2 = _randomize(cls(8) if cls is EvoNorm2dB0 else cls(8, groups=2))
    x = torch.randn(4, 8, 5, 6) * 2 + 1
    for mode in (True, False):
        a = m.train(mode)(x)
        b = m2.train(mode)(x.to(memory_format=torch.channels_last))
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
        if cls is EvoNorm2dB0:
            assert torch.allclose(m.running_var, m2.running_var)


@pytest.mark.parametrize("cls", [EvoNorm2dB0, EvoNorm2dS0])
def test_statistics_in_float32_under_bf16_autocast(cls):
    """Under bf16 autocast the variances are taken in float32: the output is the float32 layer's
    rounded to bf16 (not a variance of bf16 values), and the running variance stays float32."""
    m = _randomize(cls(8) if cls is EvoNorm2dB0 else cls(8, groups=4))
    conv = nn.Conv2d(3, 8, 3)
    x = torch.randn(4, 3, 9, 9) * 30
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = m(h)
    assert h.dtype == y.dtype == torch.bfloat16
    ref = cls.forward(_copy(m), h.float())
    assert rel_err(y.float(), ref.to(torch.bfloat16).float()) < 1e-2
    if cls is EvoNorm2dB0:
        assert m.running_var.dtype == torch.float32


def _copy(m):
    import copy

    return copy.deepcopy(m)


def test_s0_groups_must_divide():
    with pytest.raises(ValueError, match="groups=5 must divide num_features=8"):
        EvoNorm2dS0(8, groups=5)
    with pytest.raises(ValueError, match="expects \\[N, 8"):
        EvoNorm2dB0(8)(torch.randn(2, 4, 3, 3))


# --- the pass -----------------------------------------------------------------------------------------

class _Net(nn.Module):
    """Module, function and method activations; a shared ReLU; a BN with no activation; a BN whose
    output also feeds the residual (a multi-user site)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.act0 = nn.SiLU()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.bn4 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.act0(self.bn0(self.stem(x)))
        y = self.relu(self.bn1(self.conv1(x)))      # shared ReLU (used again below)
        y = F.gelu(self.bn2(self.conv2(y)))          # functional activation
        z = self.bn3(self.conv3(y))                  # no activation
        w = self.bn4(z)
        return self.relu(w) + w.relu() + z           # bn4 feeds two activations: multi-user


def test_pass_sites_and_report():
    base = randomize_bn(_Net(), torch.randn(4, 3, 8, 8))
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    m = normfx.evonorm(base, variant="B0")
    r = normfx.last_report(m)
    changes = {c.site: c.detail for c in r.changes}
    assert changes == {"bn0": "B0, replaces SiLU", "bn1": "B0, replaces ReLU", "bn2": "B0, replaces gelu",
                       "bn3": "B0 without nonlinearity (x·γ + β)"}
    (skip,) = r.skips
    assert skip.site == "bn4" and skip.reason is normfx.SkipReason.MULTI_USER
    assert len(r.changes) + len(r.skips) == 5
    assert isinstance(m.act0, nn.Identity)             # used once: its slot is emptied
    assert isinstance(m.relu, nn.ReLU)                  # shared: kept, the graph stops calling it after bn1
    assert m.bn1.weight is not base.bn1.weight and torch.equal(m.bn1.weight, base.bn1.weight)   # a copy's γ
    assert torch.equal(m.bn0.running_var, base.bn0.running_var)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in sd.items())    # the caller's model untouched
    x = torch.randn(4, 3, 8, 8)
    m.train()
    m(x).sum().backward()
    assert m.bn2.v.grad is not None and m.bn1.weight.grad is not None
    # by hand: the same function, written out
    ref = _Net()
    ref.load_state_dict(base.state_dict())
    m.eval()
    with torch.no_grad():
        h = m.bn0(ref.stem(x))
        y = m.bn1(ref.conv1(h))
        y = m.bn2(ref.conv2(y))
        z = m.bn3(ref.conv3(y))
        w = m.bn4(z)
        assert torch.allclose(m(x), F.relu(w) + w.relu() + z, atol=1e-6)


def test_s0_lowers_groups_with_a_warning(caplog):
    net = nn.Sequential(nn.Conv2d(3, 24, 3), nn.BatchNorm2d(24), nn.ReLU())
    with caplog.at_level(logging.WARNING, logger="normfx"):
        m = normfx.evonorm(net, variant="S0", groups=32)
    assert m[1].groups == 24 and "24 channels are not divisible by groups=32; using 24 groups" in caplog.text
    m = normfx.evonorm(nn.Sequential(nn.Conv2d(3, 20, 3), nn.BatchNorm2d(20), nn.ReLU()), variant="S0", groups=8)
    assert m[1].groups == 5


def test_timm_batchnormact_and_eps_override():
    from timm.layers import BatchNormAct2d

    net = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.ReLU), nn.Conv2d(8, 8, 1),
                        BatchNormAct2d(8, apply_act=False))
    m = normfx.evonorm(net, variant="B0", preset="timm", eps=1e-4)
    assert isinstance(m[1], EvoNorm2dB0) and m[1].apply_act and m[1].eps == 1e-4 and m[1].unbiased_running
    assert isinstance(m[3], EvoNorm2dB0) and not m[3].apply_act
    assert normfx.evonorm(net, preset="timm")[1].eps == 1e-3


def test_twice_and_bad_input():
    m = normfx.evonorm(torchvision.models.resnet18())
    again = normfx.last_report(normfx.evonorm(m))
    assert not again.changes and {s.reason for s in again.skips} == {normfx.SkipReason.ALREADY_DONE}
    for kwargs, msg in [(dict(variant="B1"), "variant must be"), (dict(preset="tf"), "preset must be"),
                        (dict(groups=0), "groups must be"), (dict(eps=0.0), "eps must be positive")]:
        with pytest.raises(ValueError, match=msg):
            normfx.evonorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), **kwargs)
    one_d = normfx.last_report(normfx.evonorm(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU())))
    assert [s.reason for s in one_d.skips] == [normfx.SkipReason.UNSUPPORTED]


@pytest.mark.parametrize("variant", ["B0", "S0"])
def test_deploy_folds_evonorm_without_nonlinearity_only(variant):
    """ResNet-18: the 11 BatchNorms without an activation after them (bn2 before the residual add, the
    downsample ones) became x·γ + β and fold into their convs; the 9 EvoNorms with one stay."""
    torch.manual_seed(0)
    m = normfx.evonorm(randomize_bn(torchvision.models.resnet18(), torch.randn(4, 3, 64, 64)), variant=variant)
    evos = (normfx.nn.EvoNorm2dB0, normfx.nn.EvoNorm2dS0)
    with torch.no_grad():                       # trained-looking γ, β and running statistics
        for k in m.modules():
            if isinstance(k, evos):
                k.weight.normal_(1, 0.3)
                k.bias.normal_(0, 0.3)
        m.train()
        for _ in range(3):
            m(torch.randn(8, 3, 64, 64))
    m.eval()
    d = normfx.deploy(m)
    r = normfx.last_report(d).get("fold_convbn")
    assert len(r.changes) == 11 and all(c.action == "fold" and "x·γ + β" in c.detail for c in r.changes)
    assert len(r.skips) == 9 and all("EvoNorm is not folded" in s.detail for s in r.skips)
    assert sum(isinstance(k, evos) for k in d.modules()) == 9 and sum(isinstance(k, evos) for k in m.modules()) == 20
    x = torch.randn(2, 3, 64, 64)
    assert rel_err(d(x), m(x)) < 1e-5


def test_evonorm_without_nonlinearity_skips_with_its_reason():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), normfx.nn.EvoNorm2dB0(4, apply_act=False)).eval()
    seq = nn.Sequential(plain[0], nn.ReLU(), plain[2]).eval()          # fed by a ReLU, not a conv
    skip = normfx.last_report(normfx.deploy(seq)).get("fold_convbn").skips
    assert [s.detail for s in skip] == ["EvoNorm2dB0 without nonlinearity (x·γ + β): not fed by a conv/linear"]
    tuned = normfx.last_report(normfx.convbn(plain, mode="tune")).get("fold_convbn").skips
    assert [s.detail for s in tuned] == ["EvoNorm2dB0 without nonlinearity (x·γ + β): no statistics to tune with; "
                                         "Deploy folds it"]


ZOO = [("torchvision", "resnet18"), ("torchvision", "mobilenet_v3_small"), ("torchvision", "efficientnet_b0"),
       ("timm", "resnet18"), ("timm", "efficientnet_b0"), ("timm", "regnetx_002")]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["B0", "S0"])
@pytest.mark.parametrize("lib,name", ZOO, ids=[f"{a}:{b}" for a, b in ZOO])
def test_zoo_swaps_trains_and_exports(lib, name, variant, tmp_path):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)() if lib == "torchvision" else timm.create_model(name)
    x = torch.randn(2, 3, 64, 64)
    model = randomize_bn(model, torch.randn(4, 3, 64, 64)).eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    m = normfx.evonorm(model, variant=variant, groups=8)
    r = normfx.last_report(m)
    assert len(r.changes) + len(r.skips) == n_bn > 0
    assert len(r.changes) >= n_bn // 2
    assert type(m) is type(model)
    m.train()
    y = m(x)
    assert y.shape == model(x).shape
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in m.named_parameters()
               if n.endswith(".v"))
    with torch.no_grad():   # B0's running variance follows the swapped model's own activations, as training does
        for _ in range(8):
            m(torch.randn(8, 3, 64, 64))
    m.eval()
    report = normfx.export(m, x, tmp_path / "m.onnx")
    assert report.outputs[0].max_rel < 1e-4
