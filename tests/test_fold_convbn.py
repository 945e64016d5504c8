"""The ConvBN pass: structure, report, run-twice, every skip reason, safety, Tune semantics."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.optimization import fuse

import normfx
from normfx import SkipReason
from normfx.nn import tune_convbn
from tests.conftest import DEPLOY_RTOL, GRAD_RTOL, bn_calls, randomize_bn, rel_err, tune_blocks


def _bn_calls(model: nn.Module) -> int:
    return bn_calls(model)


def _tune_calls(model: nn.Module) -> int:
    return tune_blocks(model)


class Block(nn.Module):
    def __init__(self, c_in=3, c_out=8):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


def _block():
    m = Block()
    return randomize_bn(m, torch.randn(4, 3, 8, 8)).eval()


X = torch.randn(2, 3, 8, 8)


# --- structure, report, run twice -------------------------------------------------------------

def test_deploy_structure_report_and_numerics():
    m = _block()
    d = normfx.convbn(m, mode="deploy")
    assert _bn_calls(d) == 0
    assert not any(isinstance(x, nn.BatchNorm2d) for x in d.modules())
    r = normfx.last_report(d)
    assert [c.site for c in r.changes] == ["bn1", "bn2"]
    assert r.passes[0].sites == 2 and not r.skips
    assert rel_err(d(X), m(X)) < DEPLOY_RTOL


def test_tune_structure_keys_and_report():
    m = _block()
    t = normfx.convbn(m, mode="tune")
    assert _tune_calls(t) == 2 and _bn_calls(t) == 0
    assert list(t.state_dict()) == list(m.state_dict())
    assert len(normfx.last_report(t).changes) == 2


@pytest.mark.parametrize("mode", ["tune", "deploy"])
def test_run_twice_changes_nothing(mode):
    m = _block()
    once = normfx.convbn(m, mode=mode)
    structure = [(n, type(x)) for n, x in once.named_modules()]
    twice = normfx.convbn(once, mode=mode)
    assert not normfx.last_report(twice).modified
    assert [(n, type(x)) for n, x in twice.named_modules()] == structure
    assert list(twice.state_dict()) == list(once.state_dict())
    assert rel_err(twice(X), once(X)) == 0.0


def test_report_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="normfx"):
        normfx.convbn(_block(), mode="deploy")
    assert "fold_convbn: 2 sites, 2 transformed, 0 skipped" in caplog.text


def test_tune_then_deploy_equals_deploy():
    m = _block()
    a = normfx.convbn(normfx.convbn(m, mode="tune").eval(), mode="deploy")
    b = normfx.convbn(m, mode="deploy")
    assert _tune_calls(a) == 0 and _bn_calls(a) == 0
    assert rel_err(a(X), b(X)) < 1e-6


# --- the caller's model --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["tune", "deploy"])
def test_caller_model_untouched(mode):
    m = _block()
    before = copy.deepcopy(m.state_dict())
    normfx.convbn(m, mode=mode)
    after = m.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(m.bn1, nn.BatchNorm2d)


def _storages(m):
    return {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers()) if t.numel()}


@pytest.mark.parametrize("transform", [
    lambda m: normfx.convbn(m, mode="tune"),
    lambda m: normfx.convbn(m, mode="deploy"),
    lambda m: normfx.deploy(m),
    lambda m: normfx.repbn(m, total_steps=10),
], ids=["tune", "deploy", "normfx.deploy", "repbn"])
def test_result_shares_no_storage_with_caller(transform):
    # The copy shares tensors until the pass has replaced what it changes; the rest must be cloned
    # before the result is returned, or training the result would write into the caller's model.
    m = nn.Sequential(_block(), nn.Flatten(), nn.LazyLinear(5)).eval()
    m(X)
    m.add_module("tied", nn.Linear(5, 5, bias=False))
    m.add_module("tied2", nn.Linear(5, 5, bias=False))
    m.tied2.weight = m.tied.weight
    before = copy.deepcopy(m.state_dict())
    out = transform(m)
    assert not (_storages(out) & _storages(m))
    mods = dict(out.named_modules())
    assert mods["tied"].weight is mods["tied2"].weight
    for p in out.parameters():
        p.data.add_(1.0)  # writes through the result only
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_inplace_transforms_callers_modules():
    m = _block()
    ref = copy.deepcopy(m)
    d = normfx.convbn(m, mode="deploy", inplace=True)
    assert d.conv1 is m.conv1
    assert not torch.equal(m.conv1.weight, ref.conv1.weight)
    assert rel_err(d(X), ref(X)) < DEPLOY_RTOL


# --- Tune semantics --------------------------------------------------------------------------

def test_tune_train_mode_is_train_mode_exactly():
    m = _block().train()
    t = normfx.convbn(m, mode="tune").train()
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8)
        assert torch.equal(t(x), m(x))
    for k, v in m.state_dict().items():
        assert torch.equal(v, t.state_dict()[k]), k


def test_tune_eval_gradients_equal_eval_mode():
    m = _block()
    t = normfx.convbn(m, mode="tune").eval()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    (m(x) ** 2).sum().backward()
    (t(x2) ** 2).sum().backward()
    tp = dict(t.named_parameters())
    for name, p in m.named_parameters():
        assert rel_err(tp[name].grad, p.grad) < GRAD_RTOL, name
    assert rel_err(x2.grad, x.grad) < GRAD_RTOL


def test_tune_switches_at_run_time():
    m = _block()
    t = normfx.convbn(m, mode="tune")
    t.train()
    m.train()
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(t(x), m(x))
    t.eval()
    m.eval()
    assert rel_err(t(x), m(x)) < DEPLOY_RTOL


def test_tune_checkpoints_round_trip():
    m = _block()
    t = normfx.convbn(m, mode="tune")
    with torch.no_grad():
        t.conv1.weight.add_(1.0)
    fresh = Block().eval()
    fresh.load_state_dict(t.state_dict())  # Tune checkpoint -> original architecture
    assert torch.equal(fresh.conv1.weight, t.conv1.weight)
    t.load_state_dict(m.state_dict())  # original checkpoint -> Tune model
    assert rel_err(t(X), m(X)) < DEPLOY_RTOL


def test_tune_keeps_neither_bn_input_nor_folded_weight():
    """Saved-for-backward tensors of a Tune block: the conv input and parameters, nothing else."""
    conv, bn = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16).eval()
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    params = {p.data_ptr() for p in [*conv.parameters(), *bn.parameters(), *bn.buffers()]}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tune_convbn(x, conv, bn)
    extra = [t for t in saved if t.data_ptr() not in params and t.data_ptr() != x.data_ptr()]
    assert extra == [], [tuple(t.shape) for t in extra]


# --- deploy preconditions and dtypes ---------------------------------------------------------------

def test_deploy_refuses_training_mode():
    m = _block().train()
    with pytest.raises(normfx.TrainingModeError, match=r"'bn1' is in training mode; call model.eval\(\)"):
        normfx.convbn(m, mode="deploy")


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be"):
        normfx.convbn(_block(), mode="train")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_deploy_keeps_low_precision_dtype(dtype):
    m = _block()
    d = normfx.convbn(m.to(dtype), mode="deploy")
    assert d.conv1.weight.dtype == dtype and d.conv1.bias.dtype == dtype
    # The fold itself (done in float64) costs no more than one rounding of the folded weights.
    ref = normfx.convbn(m.float(), mode="deploy")
    assert rel_err(d.conv1.weight.float(), ref.conv1.weight) < 1e-2


# --- one test per skip reason --------------------------------------------------------------------

def _skips(m, mode="deploy"):
    out = normfx.convbn(m, mode=mode)
    return out, {s.site: s.reason for s in normfx.last_report(out).skips}


class SharedConv(nn.Module):
    """A conv called twice, once without BN: torch.fx.experimental.optimization.fuse corrupts it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


def test_shared_conv_never_mutated():
    m = randomize_bn(SharedConv(), torch.randn(4, 3, 4, 4)).eval()
    x = torch.randn(2, 3, 4, 4)
    assert rel_err(fuse(m)(x), m(x)) > 1e-2  # the anchor's bug this test guards against
    for mode in ("deploy", "tune"):
        out, skips = _skips(m, mode)
        assert skips == {"bn": SkipReason.SHARED_MODULE}
        assert rel_err(out(x), m(x)) < 1e-6


class MultiUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) * y


def test_multi_user_output_left_exact():
    m = randomize_bn(MultiUser(), torch.randn(4, 3, 4, 4)).eval()
    out, skips = _skips(m)
    assert skips == {"bn": SkipReason.MULTI_USER}
    assert rel_err(out(X[:, :, :4, :4]), m(X[:, :, :4, :4])) < 1e-6


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


def test_shared_bn_left_exact():
    m = randomize_bn(SharedBN(), torch.randn(4, 3, 4, 4)).eval()
    out, skips = _skips(m)
    assert set(skips.values()) == {SkipReason.SHARED_MODULE}
    assert len(normfx.last_report(out).skips) == 1  # one module, one site, however often it is called
    assert rel_err(out(X), m(X)) < 1e-6


class Siamese(nn.Module):
    """One backbone run on two views (SimSiam, BYOL): every conv → BN pair is called twice."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x1, x2):
        return self.backbone(x1) - 2 * self.backbone(x2)


def test_shared_pair_called_on_two_views_folds_once():
    m = randomize_bn(Siamese().backbone, torch.randn(4, 3, 4, 4))
    siamese = Siamese().eval()
    siamese.backbone = m.eval()
    x1, x2 = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    deployed = normfx.convbn(siamese, mode="deploy")
    report = normfx.last_report(deployed)
    assert not report.skips and {c.site for c in report.changes} == {"backbone.1", "backbone.4"}
    assert any("called at 2 places: folded once" in c.detail for c in report.changes)
    assert not any(isinstance(q, nn.BatchNorm2d) for q in deployed.modules())
    assert rel_err(deployed(x1, x2), siamese(x1, x2)) < 1e-6
    tuned = normfx.last_report(normfx.convbn(siamese, mode="tune"))   # a Tune link is per call: left as is
    assert {s.reason for s in tuned.skips} == {SkipReason.SHARED_MODULE}


def test_no_running_stats():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    out, skips = _skips(m)
    assert skips == {"1": SkipReason.NO_RUNNING_STATS}
    assert rel_err(out(X), m(X)) < 1e-6


class FunctionalTrainBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, training=True)


def test_training_mode_functional():
    m = FunctionalTrainBN()
    _, skips = _skips(m, "tune")
    assert list(skips.values()) == [SkipReason.TRAINING_MODE]


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.bn(self.conv(x))
        return self.bn(self.conv(-x))


class HasUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        self.odd = Untraceable()

    def forward(self, x):
        return self.odd(self.stem(x))


def test_untraceable_sites_reported_rest_transformed():
    m = randomize_bn(HasUntraceable(), torch.randn(4, 3, 4, 4)).eval()
    out, skips = _skips(m)
    assert skips == {"odd.bn": SkipReason.UNTRACEABLE}
    r = normfx.last_report(out)
    assert [c.site for c in r.changes] == ["stem.1"]
    assert r.untraceable[0][0] == "odd" and "control flow" in r.untraceable[0][1]
    assert rel_err(out(X), m(X)) < DEPLOY_RTOL


class CustomBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_unsupported_bn_subclass():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), CustomBN(4)).eval()
    out, skips = _skips(m)
    assert skips == {"1": SkipReason.UNSUPPORTED}
    assert rel_err(out(X), m(X)) < 1e-6


def test_no_neighbour():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    _, skips = _skips(m)
    assert skips == {"2": SkipReason.NO_NEIGHBOUR}


def test_non_finite_scale():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=0.0)).eval()
    m[1].running_var[1] = 0.0
    _, skips = _skips(m)
    assert skips == {"1": SkipReason.NON_FINITE}


def test_overflowing_scale_in_fp16():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-12)).eval()
    m[1].running_var[0] = 1e-12
    out, skips = _skips(m.half())
    assert skips == {"1": SkipReason.NON_FINITE}
    assert getattr(out, "0").weight.dtype == torch.float16


# --- site kinds ----------------------------------------------------------------------------------

class BNBeforeConv(nn.Module):
    def __init__(self, padding=0, padding_mode="zeros"):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 6, 3, padding=padding, padding_mode=padding_mode, groups=3)

    def forward(self, x):
        return self.conv(self.bn(x))


@pytest.mark.parametrize("padding,mode", [(0, "zeros"), (1, "reflect"), (1, "circular"), (1, "replicate")])
def test_bn_before_conv_folds_where_exact(padding, mode):
    m = randomize_bn(BNBeforeConv(padding, mode), torch.randn(4, 3, 8, 8)).eval()
    out, skips = _skips(m)
    assert not skips and _bn_calls(out) == 0
    assert rel_err(out(X), m(X)) < DEPLOY_RTOL


def test_bn_before_zero_padded_conv_is_skipped():
    m = randomize_bn(BNBeforeConv(1), torch.randn(4, 3, 8, 8)).eval()
    out, skips = _skips(m)
    assert skips == {"bn": SkipReason.UNSUPPORTED}
    assert rel_err(out(X), m(X)) < 1e-6


class FunctionalBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.w = nn.Parameter(torch.rand(4) + 0.5)
        self.b = nn.Parameter(torch.randn(4))
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, self.w, self.b, False, 0.1, 1e-3)


@pytest.mark.parametrize("mode", ["tune", "deploy"])
def test_functional_batch_norm(mode):
    m = FunctionalBN().eval()
    out = normfx.convbn(m, mode=mode)
    assert _bn_calls(out) == 0 and len(normfx.last_report(out).changes) == 1
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert rel_err(out(x), m(x)) < DEPLOY_RTOL
    if mode == "tune":
        (m(x) ** 2).sum().backward()
        ref = {n: p.grad.clone() for n, p in m.named_parameters()}
        (out(x) ** 2).sum().backward()
        for n, p in out.named_parameters():
            assert rel_err(p.grad, ref[n]) < GRAD_RTOL, n


@pytest.mark.parametrize("mode", ["tune", "deploy"])
def test_linear_bn1d(mode):
    m = nn.Sequential(nn.Linear(10, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    m = randomize_bn(m, torch.randn(16, 10)).eval()
    out = normfx.convbn(m, mode=mode)
    assert _bn_calls(out) == 0
    x = torch.randn(5, 10)
    assert rel_err(out(x), m(x)) < DEPLOY_RTOL


def test_sync_and_frozen_bn():
    from torchvision.ops import FrozenBatchNorm2d

    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.Conv2d(4, 4, 3), FrozenBatchNorm2d(4))
    randomize_bn(m[:2], torch.randn(4, 3, 8, 8))
    randomize_bn(m[3])
    m.eval()
    for mode in ("tune", "deploy"):
        out = normfx.convbn(m, mode=mode)
        assert len(normfx.last_report(out).changes) == 2, mode
        assert rel_err(out(X), m(X)) < DEPLOY_RTOL


def test_timm_batchnormact_keeps_activation():
    from timm.layers import BatchNormAct2d

    m = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU))
    m = randomize_bn(m, torch.randn(4, 3, 8, 8)).eval()
    for mode in ("tune", "deploy"):
        out = normfx.convbn(m, mode=mode)
        assert len(normfx.last_report(out).changes) == 1
        y = out(X)
        assert (y >= 0).all() and rel_err(y, m(X)) < DEPLOY_RTOL
    t = normfx.convbn(m, mode="tune").train()
    m.train()
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(t(x), m(x))
    assert torch.equal(t.state_dict()["1.running_mean"], m.state_dict()["1.running_mean"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transposed", [False, True])
def test_fold_functions_never_write_their_inputs(dtype, transposed):
    # float64 weights: `.to(float64)` is a no-op returning the same tensor, so an in-place multiply
    # there would write into the caller's (and, with normfx's shared copy, the original model's) weight.
    from normfx.functional import BNStats, fold_bn_after, fold_bn_before

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(6 if not transposed else 4 * 2, generator=g, dtype=dtype)
    n = 4 * 2 if transposed else 6
    stats = BNStats(torch.randn(n, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype) + 0.5,
                    torch.randn(n, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype), 1e-5)
    snap = [t.clone() for t in (w, b, *stats[:4])]
    fold_bn_after(w, b, stats, transposed=transposed, groups=2 if transposed else 1)
    if not transposed:
        fold_bn_before(w[:, :4], b, BNStats(*(s[:4] for s in stats[:4]), 1e-5))
    assert all(torch.equal(s, t) for s, t in zip(snap, (w, b, *stats[:4])))


def test_frozen_bn_tune_block_folds_in_train_mode_too():
    """Issue 11.6: FrozenBatchNorm2d never trains, so its Tune block folds in model.train() as in
    eval (keeping neither the BN input nor the folded weight), and equals the eval model."""
    from torchvision.ops import FrozenBatchNorm2d

    conv, bn = nn.Conv2d(3, 8, 3, padding=1), FrozenBatchNorm2d(8)
    randomize_bn(bn)
    m = nn.Sequential(conv, bn)
    t = normfx.convbn(m, mode="tune").train()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    params = {p.data_ptr() for p in [*t.parameters(), *t.buffers()]}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = t(x)
    extra = [s for s in saved if s.data_ptr() not in params and s.data_ptr() != x.data_ptr()]
    assert extra == [], [tuple(s.shape) for s in extra]   # bn(conv(x)) would save conv(x)
    assert rel_err(y, m(x)) < DEPLOY_RTOL


def test_fold_reads_other_normalizations_through_eval_affine():
    """fold_convbn knows no EvoNorm or fixed-point class: a module's ``eval_affine()`` says whether it
    is a constant affine to fold (EvoNorm without nonlinearity) or why not (a fixed-point BatchNorm)."""
    conv = nn.Conv2d(3, 4, 3)
    evo = normfx.nn.EvoNorm2dB0(4, apply_act=False)
    with torch.no_grad():
        evo.weight.uniform_(0.5, 1.5)
        evo.bias.normal_()
    net = nn.Sequential(conv, evo).eval()
    x = torch.randn(2, 3, 8, 8)
    folded = normfx.deploy(net)
    assert type(folded[1]) is nn.Identity and torch.allclose(folded(x), net(x), atol=1e-5)
    q = normfx.fixed_point(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), targets=("norm",))
    (skip,) = normfx.last_report(normfx.deploy(q.eval())).get("fold_convbn").skips
    assert skip.reason is normfx.SkipReason.UNSUPPORTED and "fixed-point grid" in skip.detail


class MixedConv(nn.Module):
    """MixNet's mixed-kernel conv: channel groups through 3×3, 5×5 and 7×7 convs, concatenated, one BN."""

    def __init__(self, extra: str = ""):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(2, c, k, padding=k // 2, bias=b)
                                   for c, k, b in ((3, 3, False), (2, 5, True), (4, 7, False)))
        self.bn = nn.BatchNorm2d(9 + (2 if extra == "pool" else 0))
        self.extra = extra

    def forward(self, x):
        pieces = torch.split(x, 2, 1)
        parts = [conv(pieces[i]) for i, conv in enumerate(self.convs)]
        if self.extra == "pool":
            parts.append(torch.nn.functional.avg_pool2d(x[:, :2], 3, 1, 1))
        y = torch.cat(parts, 1)
        out = self.bn(y)
        return out + y.mean() if self.extra == "shared" else out


@pytest.mark.parametrize("extra, reason", [("", None), ("pool", SkipReason.NO_NEIGHBOUR),
                                           ("shared", SkipReason.MULTI_USER)])
def test_batchnorm_after_a_concatenation_of_convs_splits_over_them(extra, reason):
    m = randomize_bn(MixedConv(extra), torch.randn(4, 6, 8, 8)).eval()
    x = torch.randn(2, 6, 8, 8)
    out, skips = _skips(m)
    assert rel_err(out(x), m(x)) < 1e-6
    if reason is None:
        assert not skips and isinstance(out.bn, nn.Identity)
        assert "split over the concatenated convs.0, convs.1, convs.2" in normfx.last_report(out).changes[0].detail
        assert out.convs[1].bias is not None and m.convs[0].bias is None     # the caller's convs untouched
    else:
        assert skips == {"bn": reason}


def test_timm_mixnet_folds_every_batchnorm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = randomize_bn(timm.create_model("mixnet_s"), torch.randn(4, 3, 64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    d = normfx.deploy(m)
    assert not any(isinstance(q, nn.modules.batchnorm._BatchNorm) for q in d.modules())
    with torch.no_grad():
        assert rel_err(d(x), m(x)) < 1e-4


class _LinearNorm(nn.Module):
    """timm LeViT's ``LinearNorm``: the BatchNorm sees the tokens flattened into the batch."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(c_in, c_out, bias=False)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class _TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm1d(6)           # after conv(x).flatten(2): [N, C, HW]
        self.ln = _LinearNorm(6, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = self.bn0(self.conv(x).flatten(2)).transpose(1, 2)
        return self.head(self.ln(t).mean(1))


def _token_net() -> nn.Module:
    return randomize_bn(_TokenNet()).eval()


def test_batchnorm_after_a_reshape_folds_with_example_inputs_exactly():
    base = _token_net().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    calls = []
    base.head.register_forward_hook(lambda *a: calls.append(a))
    d = normfx.deploy(base, example_inputs=x)
    changes = {c.site: c.detail for c in normfx.last_report(d).get("fold_convbn").changes}
    assert changes == {"bn0": "into conv through 1 reshape", "ln.bn": "into ln.linear through 1 reshape"}
    assert not calls   # the shapes came from fake tensors: the model's hooks saw nothing
    assert not any(isinstance(m, nn.BatchNorm1d) for m in d.modules())
    assert rel_err(d(x), base(x)) < 1e-12
    assert isinstance(base.ln.bn, nn.BatchNorm1d)   # the caller's model untouched


def test_batchnorm_after_a_reshape_without_shapes_is_skipped_and_says_how():
    d = normfx.deploy(_token_net())
    skips = {s.site: s for s in normfx.last_report(d).get("fold_convbn").skips}
    assert set(skips) == {"bn0", "ln.bn"}
    assert all(s.reason is SkipReason.NEEDS_SHAPES and "example_inputs=" in s.detail for s in skips.values())


class _WrongAxis(nn.Module):
    """flatten(0, 1) of a 4-D linear output: the BatchNorm1d's channel axis is the third input axis,
    not the linear's outputs, though both have 4 entries."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


def test_batchnorm_after_a_reshape_on_another_axis_is_not_folded():
    m = randomize_bn(_WrongAxis(), torch.randn(2, 5, 4, 3)).eval()
    x = torch.randn(2, 5, 4, 3)
    d = normfx.deploy(m, example_inputs=x)
    (skip,) = normfx.last_report(d).get("fold_convbn").skips
    assert skip.reason is SkipReason.UNSUPPORTED and "not the output channels" in skip.detail
    assert torch.equal(d(x), m(x))


class _ReshapeUsedTwice(_LinearNorm):
    def forward(self, x):
        y = self.linear(x)
        flat = y.flatten(0, 1)
        return self.bn(flat).reshape_as(y) + flat.sum()


def test_batchnorm_after_a_reshape_with_another_user_is_not_folded():
    m = randomize_bn(_ReshapeUsedTwice(3, 4), torch.randn(2, 5, 3)).eval()
    x = torch.randn(2, 5, 3)
    d = normfx.deploy(m, example_inputs=x)
    (skip,) = normfx.last_report(d).get("fold_convbn").skips
    assert skip.reason is SkipReason.MULTI_USER
    assert torch.equal(d(x), m(x))


def test_example_inputs_must_be_tensors():
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        normfx.deploy(_token_net(), example_inputs=[3])


@pytest.mark.slow
def test_timm_levit_folds_every_batchnorm_after_a_linear():
    timm = pytest.importorskip("timm")
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    m = randomize_bn(timm.create_model("levit_128s"), x.float()).eval().double()
    d = normfx.deploy(m, example_inputs=x)
    report = normfx.last_report(d).get("fold_convbn")
    assert len(report.changes) == 50 and {s.site for s in report.skips} == {"head.bn", "head_dist.bn"}
    with torch.no_grad():
        assert rel_err(d(x), m(x)) < 1e-12


def test_densenet_batchnorms_say_why_they_stay():
    """DenseNet: BN after a concatenation whose inputs feed later layers too, then ReLU → conv."""
    import torchvision

    d = normfx.deploy(torchvision.models.densenet121().eval())
    skips = normfx.last_report(d).get("fold_convbn").skips
    assert len(skips) == 62
    assert all("DenseNet-style shared concatenation" in s.detail for s in skips if s.site != "features.norm5")


class _InceptionMixer(nn.Module):
    """timm InceptionNeXt: a concatenation with an identity part (not foldable after it), a
    BatchNorm, then a 1×1 conv (foldable before it); Visformer: the conv's forward reads the shape."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.norm = nn.BatchNorm2d(8)
        self.fc = nn.Conv2d(8, 6, 1)
        self.norm2 = nn.BatchNorm2d(6)
        self.qkv = nn.Conv2d(6, 6, 1, bias=False)

    def forward(self, x):
        ident, part = torch.split(x, [4, 4], dim=1)
        y = self.fc(self.norm(torch.cat([ident, self.dw(part)], 1)))
        z = torch.relu(y) + 1
        t = self.norm2(z)
        b, c, h, w = t.shape
        return self.qkv(t).reshape(b, c, h * w)


def test_a_batchnorm_that_cannot_fold_after_falls_back_to_the_conv_after_it():
    m = randomize_bn(_InceptionMixer(), torch.randn(8, 8, 6, 6)).eval().double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    d = normfx.deploy(m)
    changes = {c.site: c.detail for c in normfx.last_report(d).get("fold_convbn").changes}
    assert changes == {"norm": "forward into fc", "norm2": "forward into qkv"}
    assert rel_err(d(x), m(x)) < 1e-12


class _QKV(nn.Module):
    """timm's LambdaLayer: one qkv conv split into q, k, v; q and v normalized, k used as it is."""

    def __init__(self, chunk: bool = False) -> None:
        super().__init__()
        self.chunk = chunk
        self.qkv = nn.Conv2d(4, 12, 1, bias=False)
        self.norm_q, self.norm_v = nn.BatchNorm2d(4 if chunk else 6), nn.BatchNorm2d(4 if chunk else 2)

    def forward(self, x):
        qkv = self.qkv(x)
        q, k, v = qkv.chunk(3, 1) if self.chunk else torch.split(qkv, [6, 4, 2], dim=1)
        return self.norm_q(q).sum(1) * k.mean(1) + self.norm_v(v).sum(1)


@pytest.mark.parametrize("chunk", [False, True])
def test_batchnorms_after_a_channel_split_fold_into_their_channels(chunk):
    m = randomize_bn(_QKV(chunk), torch.randn(8, 4, 5, 5)).eval().double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    d = normfx.deploy(m)
    changes = {c.site: c.detail for c in normfx.last_report(d).get("fold_convbn").changes}
    assert changes == ({"norm_q": "into channels 0:4 of qkv", "norm_v": "into channels 8:12 of qkv"} if chunk else
                       {"norm_q": "into channels 0:6 of qkv", "norm_v": "into channels 10:12 of qkv"})
    assert rel_err(d(x), m(x)) < 1e-12


class _SplitTwice(_QKV):
    def forward(self, x):
        qkv = self.qkv(x)
        q, k, v = torch.split(qkv, [6, 4, 2], dim=1)
        return self.norm_q(q).sum(1) + q.mean(1) + self.norm_v(v).sum(1) * k.mean(1)


def test_a_split_part_with_another_user_is_not_folded():
    m = randomize_bn(_SplitTwice(), torch.randn(8, 4, 5, 5)).eval().double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    d = normfx.deploy(m)
    report = normfx.last_report(d).get("fold_convbn")
    assert {c.site for c in report.changes} == {"norm_v"}
    assert [s.reason for s in report.skips] == [SkipReason.MULTI_USER]
    assert rel_err(d(x), m(x)) < 1e-12


class _FunctionalAndModule(nn.Module):
    """A functional batch_norm makes deploy rewrite the forward; a folded BN's slot and a model's
    own nn.Identity are then not called by it, an Identity with a hook still is."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.drop, self.hooked = nn.Identity(), nn.Identity()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.register_buffer("rm", torch.randn(4))
        self.register_buffer("rv", torch.rand(4) + 0.5)

    def forward(self, x):
        y = self.hooked(self.drop(self.bn1(self.conv1(x))))
        return F.batch_norm(self.conv2(y), self.rm, self.rv, training=False)


def test_a_rewritten_forward_skips_identity_calls_but_not_hooked_ones():
    m = randomize_bn(_FunctionalAndModule()).eval().double()
    seen = []
    m.hooked.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    d = normfx.deploy(m)
    src = type(d)._normfx_src
    assert "['hooked']" in src and "['drop']" not in src and "['bn1']" not in src
    assert rel_err(d(x), m(x)) < 1e-12
    assert len(seen) == 2      # the hook fired on both models' calls
    assert isinstance(d.drop, nn.Identity) and "drop" in dict(d.named_children())   # the module tree kept
