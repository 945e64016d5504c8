"""PRepBN: LayerNorm -> progressive RepBN, its scheduler, recalibration, and the deploy fold."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normfx
from normfx.nn import ChannelAffine, ProgressiveRepBN, RepBN
from tests.conftest import DEPLOY_RTOL, rel_err

slow = pytest.mark.slow


def _finish(model: nn.Module, seed: int = 0) -> nn.Module:
    """λ = 0 everywhere, randomized BN statistics and η, eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, ProgressiveRepBN):
            m.lam.zero_()
            bn = m.repbn.bn
            n = bn.num_features
            bn.running_mean.copy_(0.3 * torch.randn(n, generator=g))
            bn.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=g))
            with torch.no_grad():
                bn.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=g))
                bn.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.repbn.eta.fill_(float(torch.empty(1).uniform_(0.3, 1.2, generator=g)))
    return model.eval()


def _count(model: nn.Module, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def _deit(**kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=32, **kw)


# --- the swap -----------------------------------------------------------------------------------------

def test_lambda_one_equals_original_in_train_mode():
    m = _deit().train()
    p = normfx.repbn(m, total_steps=100).train()
    assert _count(p, ProgressiveRepBN) == 25 and _count(p, nn.LayerNorm) == 25  # LN kept inside
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(p(x), m(x))
    r = normfx.last_report(p)
    assert len(r.changes) == 25 and not r.skips


def test_lambda_zero_is_repbn():
    ln = nn.LayerNorm(6)
    p = ProgressiveRepBN(ln, RepBN(6, eta_init=0.5), total_steps=10)
    p.lam.zero_()
    x = torch.randn(3, 5, 6)
    bn = p.repbn.bn
    expected = F.batch_norm(x.reshape(-1, 6), None, None, bn.weight, bn.bias, True).reshape(x.shape) + 0.5 * x
    assert torch.allclose(p.train()(x), expected, atol=1e-6)
    ln.weight.data.fill_(float("nan"))  # the LayerNorm is not computed at λ = 0
    assert torch.isfinite(p(x)).all()


def test_caller_model_untouched():
    m = _deit()
    normfx.repbn(m, total_steps=10)
    assert _count(m, ProgressiveRepBN) == 0


def test_skips_qk_norm_and_multi_dim_layernorm():
    m = _deit(qk_norm=True)
    r = normfx.last_report(normfx.repbn(m, total_steps=10))
    assert {s.detail for s in r.skips} == {"q/k norm inside attention"}
    assert len(r.skips) == 24 and len(r.changes) == 25

    seq = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm([2, 4]))
    r = normfx.last_report(normfx.repbn(seq, total_steps=10))
    assert r.skips[0].reason is normfx.SkipReason.UNSUPPORTED and "2 dims" in r.skips[0].detail


def test_functional_layer_norm_site():
    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.rand(8) + 0.5)
            self.b = nn.Parameter(torch.randn(8))
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(F.layer_norm(x, (8,), self.w, self.b, 1e-6))

    m = Fn()
    p = normfx.repbn(m, total_steps=10)
    assert _count(p, ProgressiveRepBN) == 1
    x = torch.randn(2, 5, 8)
    assert torch.equal(p.train()(x), m(x))
    d = normfx.deploy(_finish(p))
    assert _count(d, ProgressiveRepBN) == 0
    assert rel_err(d(x), p(x)) < DEPLOY_RTOL


def test_run_twice_changes_nothing():
    p = normfx.repbn(_deit(), total_steps=10)
    assert not normfx.last_report(normfx.repbn(p, total_steps=10)).modified


# --- the scheduler ------------------------------------------------------------------------------------

def test_scheduler_sequence_and_state_dict():
    p = normfx.repbn(_deit(), total_steps=4)
    sched = normfx.RepBNScheduler(p)
    seen = []
    for _ in range(6):
        seen.append(float(next(m for m in p.modules() if isinstance(m, ProgressiveRepBN)).lam))
        sched.step()
    assert seen == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]

    p2 = normfx.repbn(_deit(), total_steps=4)
    s2 = normfx.RepBNScheduler(p2)
    sched = normfx.RepBNScheduler(p)
    sched.step()
    s2.load_state_dict(sched.state_dict())
    assert {float(m.lam) for m in p2.modules() if isinstance(m, ProgressiveRepBN)} == {0.75}


def test_scheduler_warmup_holds_lambda_at_one_then_ramps():
    """SLAB's ``warm``: λ stays 1 for warmup_steps, then falls over total_steps; the warm-up
    survives a state_dict round trip mid-ramp; bad values are refused."""
    p = normfx.repbn(_deit(), total_steps=4)
    sched = normfx.RepBNScheduler(p, warmup_steps=2)
    seen = []
    for _ in range(8):
        seen.append(sched.lam)
        sched.step()
    assert seen == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    sched2 = normfx.RepBNScheduler(p)
    sched = normfx.RepBNScheduler(p, warmup_steps=2)
    for _ in range(4):
        sched.step()
    sched2.load_state_dict(sched.state_dict())
    assert sched2.warmup_steps == 2 and sched2.lam == 0.5
    assert {float(m.lam) for m in p.modules() if isinstance(m, ProgressiveRepBN)} == {0.5}
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="warmup_steps"):
            normfx.RepBNScheduler(p, warmup_steps=bad)


def test_forwards_do_not_move_lambda():
    p = normfx.repbn(_deit(), total_steps=10)
    sched = normfx.RepBNScheduler(p)
    sched.step()
    x = torch.randn(2, 3, 32, 32)
    p.train()(x)
    p.eval()(x)
    normfx.trace(p)
    assert {float(m.lam) for m in p.modules() if isinstance(m, ProgressiveRepBN)} == {torch.tensor(0.9).item()}


def test_lambda_survives_a_checkpoint():
    p = normfx.repbn(_deit(), total_steps=10)
    sched = normfx.RepBNScheduler(p)
    for _ in range(3):
        sched.step()
    q = normfx.repbn(_deit(), total_steps=10)
    q.load_state_dict(p.state_dict())
    assert {round(float(m.lam), 6) for m in q.modules() if isinstance(m, ProgressiveRepBN)} == {0.7}


def test_scheduler_needs_prepbn():
    with pytest.raises(ValueError, match="call normfx.repbn"):
        normfx.RepBNScheduler(nn.Linear(2, 2))


# --- recalibration ---------------------------------------------------------------------------------

def test_recalibrate_bn_is_the_cumulative_average():
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).eval()
    batches = [torch.randn(8, 4) * 2 + 1 for _ in range(3)]
    normfx.recalibrate_bn(m, batches, progress=False)
    with torch.no_grad():
        hs = [m[0](b) for b in batches]
    means = torch.stack([h.mean(0) for h in hs]).mean(0)
    variances = torch.stack([h.var(0, unbiased=True) for h in hs]).mean(0)
    assert torch.allclose(m[1].running_mean, means, atol=1e-6)
    assert torch.allclose(m[1].running_var, variances, rtol=1e-5)
    assert not m.training and m[1].momentum == 0.1


def test_recalibrate_bn_runs_dropout_in_eval_mode():
    """Issue 11.1: on a constant input the eval-mode model feeds the BN variance 0; with Dropout
    active while measuring, running_var would be about 1."""
    m = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(4)).train()
    normfx.recalibrate_bn(m, [torch.ones(64, 4)], progress=False)
    assert torch.allclose(m[1].running_var, torch.zeros(4))
    assert torch.allclose(m[1].running_mean, torch.ones(4))
    assert m.training and m[0].training  # modes restored


class _DropPathBlock(nn.Module):
    """A pre-norm residual block with stochastic depth and dropout before a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)
        self.drop_path = StochasticDepth(0.5, "row")
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = x + self.drop_path(self.drop(self.fc(x)))
        return self.head(self.norm(x))


@pytest.mark.parametrize("lam", [1.0, 0.0])
def test_recalibrate_prepbn_after_stochastic_depth(lam):
    """The statistics a RepBN gets are those of the eval-mode activations it will normalize."""
    model = normfx.repbn(_DropPathBlock(), total_steps=10)
    prep = next(m for m in model.modules() if isinstance(m, ProgressiveRepBN))
    prep.lam.fill_(lam)
    model.train()
    x = torch.randn(16, 10, 8)
    normfx.recalibrate_bn(model, [x], progress=False)
    with torch.no_grad():
        block = model.eval()
        h = (x + block.get_submodule("fc")(x)).reshape(-1, 8)   # eval: dropout and drop-path are identities
    bn = prep.repbn.bn
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, h.var(0, unbiased=True), rtol=1e-4)


def test_recalibrate_needs_batchnorm():
    with pytest.raises(ValueError, match="no BatchNorm"):
        normfx.recalibrate_bn(nn.Linear(2, 2), [torch.randn(2, 2)])


# --- deploy ------------------------------------------------------------------------------------------

def test_deploy_refuses_unfinished_lambda():
    p = normfx.repbn(_deit(), total_steps=1000)
    sched = normfx.RepBNScheduler(p)
    for _ in range(600):
        sched.step()
    with pytest.raises(normfx.RepBNNotFinishedError, match=r"about 400 of 1000 scheduler steps remain"):
        normfx.deploy(p.eval())


def test_deploy_refuses_training_mode():
    p = _finish(normfx.repbn(_deit(), total_steps=10)).train()
    with pytest.raises(normfx.TrainingModeError, match="call model.eval"):
        normfx.deploy(p)


def _check_deploy(p: nn.Module, x: torch.Tensor) -> nn.Module:
    _finish(p)
    d = normfx.deploy(p)
    assert _count(d, ProgressiveRepBN) == 0 and _count(d, nn.LayerNorm) == 0
    assert not any(m.training for m in d.modules())  # nothing deploy adds is in training mode
    with torch.no_grad():
        assert rel_err(d(x), p(x)) < DEPLOY_RTOL
    return d


def test_deploy_deit_folds_every_site():
    p = normfx.repbn(_deit(), total_steps=10)
    d = _check_deploy(p, torch.randn(2, 3, 32, 32))
    r = normfx.last_report(d)
    folds = [c for c in r.get("fold_repbn").changes if c.action == "fold"]
    assert len(folds) == 25 and _count(d, ChannelAffine) == 0


def test_deploy_torchvision_vit_into_multihead_attention():
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                             hidden_dim=32, mlp_dim=64, num_classes=10)
    d = _check_deploy(normfx.repbn(m, total_steps=10), torch.randn(2, 3, 32, 32))
    assert all(c.action == "fold" for c in normfx.last_report(d).get("fold_repbn").changes)


def test_deploy_into_preceding_conv_keeps_eta_times_bias():
    """SLAB's merge_bn drops η·bias when folding into a preceding conv; the fold here must not."""
    from timm.layers import LayerNorm2d

    m = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), LayerNorm2d(8), nn.ReLU())
    with torch.no_grad():
        m[0].bias.uniform_(1.0, 2.0)  # a bias large enough that dropping a·c would show
    p = normfx.repbn(m, total_steps=10)
    d = _check_deploy(p, torch.randn(2, 3, 8, 8))
    (change,) = normfx.last_report(d).get("fold_repbn").changes
    assert change.detail == "into preceding '0'"


@pytest.mark.parametrize("name", [
    "vit_b_16", pytest.param("swin_t", marks=slow), pytest.param("convnext_tiny", marks=slow),
])
def test_deploy_torchvision_zoo(name):
    import torchvision

    torch.manual_seed(0)
    kw = {"image_size": 32} if name == "vit_b_16" else {}
    m = getattr(torchvision.models, name)(**kw)
    size = 32 if name == "vit_b_16" else 64
    _check_deploy(normfx.repbn(m, total_steps=10), torch.randn(2, 3, size, size))


@slow
def test_deploy_timm_swin():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224")
    _check_deploy(normfx.repbn(m, total_steps=10), torch.randn(1, 3, 224, 224))


def test_onnx_has_no_normalization_left(tmp_path):
    p = _finish(normfx.repbn(_deit(), total_steps=10))
    report = normfx.export(p, torch.randn(2, 3, 32, 32), tmp_path / "deit.onnx")
    assert report.op_counts.get("LayerNormalization", 0) == 0
    assert report.op_counts.get("BatchNormalization", 0) == 0
    assert report.verified


@pytest.mark.parametrize("name", ["small_vit", pytest.param("convnext_tiny", marks=slow),
                                  pytest.param("swin_t", marks=slow)])
def test_onnx_torchvision_deployed(name, tmp_path):
    import torchvision

    torch.manual_seed(0)
    if name == "small_vit":
        m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
        x = torch.randn(2, 3, 32, 32)
    else:
        m = getattr(torchvision.models, name)()
        x = torch.randn(2, 3, 64, 64)
    p = _finish(normfx.repbn(m, total_steps=10))
    report = normfx.export(p, x, tmp_path / f"{name}.onnx")
    assert report.op_counts.get("LayerNormalization", 0) == 0
    assert report.op_counts.get("BatchNormalization", 0) == 0
    assert report.verified and report.outputs[0].max_rel < 1e-4
    kept = sum(c.action == "affine" for c in report.passes.get("fold_repbn").changes)
    assert kept == (13 if name == "swin_t" else 0)  # Swin's norm1 before padded windows, see docs/repbn.md


def test_total_steps_is_given_once():
    """The scheduler reads total_steps from the modules normfx.repbn made; messages read the same."""
    p = normfx.repbn(_deit(), total_steps=7)
    sched = normfx.RepBNScheduler(p)
    assert sched.total_steps == 7
    for _ in range(3):
        sched.step()
    with pytest.raises(normfx.RepBNNotFinishedError, match="about 4 of 7 scheduler steps remain"):
        normfx.deploy(p.eval())
    with pytest.raises(TypeError):
        normfx.RepBNScheduler(p, total_steps=7)   # not a second copy to disagree with the first
