"""Issue 21: the ordinary code around a user's model never gets a silent wrong result.

Hooks (Tune mode decides at run time, Deploy skips a fold a hook would see), tracing that leaves no
state behind, pruned models, bf16 autocast gradients of Tune blocks, one batch convention, and the
errors a second application raises. Every test here failed on the main branch before issue 21.
"""
from __future__ import annotations

import pickle
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
import torchvision
from torch.utils.checkpoint import checkpoint

import normfx
from normfx.cli import inspect_model
from normfx.nn.convbn import tune_path
from normfx.report import SkipReason
from tests.conftest import DEPLOY_RTOL, GRAD_RTOL, amp_grads, randomize_bn, rel_err


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))))


def _block() -> nn.Module:
    return randomize_bn(Block()).eval()


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    (model(x) ** 2).sum().backward()
    return {"x": x.grad, **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


def _same_function(model: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """Same output and the same gradients (Eval mode's) as the reference model."""
    assert rel_err(model(x), ref(x)) < DEPLOY_RTOL
    got, want = _grads(model, x), _grads(ref, x)
    assert got.keys() == want.keys()
    for name in want:
        assert rel_err(got[name], want[name]) < GRAD_RTOL, name


# --- Tune mode: exact whatever sits between conv and BatchNorm -------------------------------------------

HOOKS = {
    "forward hook returning a clone": lambda m: m.conv.register_forward_hook(lambda mod, i, o: o.clone()),
    "forward hook scaling the output": lambda m: m.conv.register_forward_hook(lambda mod, i, o: o * 2),
    "observing forward hook": lambda m: m.conv.register_forward_hook(lambda mod, i, o: None),
    "BN pre-hook replacing its input": lambda m: m.bn.register_forward_pre_hook(lambda mod, i: (i[0] + 1,)),
    "full backward hook on the conv": lambda m: m.conv.register_full_backward_hook(lambda mod, gi, go: None),
    "full backward hook on the BN": lambda m: m.bn.register_full_backward_hook(lambda mod, gi, go: None),
}


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("hook", list(HOOKS))
def test_tune_exact_with_hooks(hook: str, when: str) -> None:
    model, x = _block(), torch.randn(2, 3, 8, 8)
    if when == "before":
        HOOKS[hook](model)
    tuned = normfx.convbn(model, mode="tune").eval()
    if when == "after":
        HOOKS[hook](model)
        HOOKS[hook](tuned)
    _same_function(tuned, model, x)
    assert tune_path(tuned.bn) != "fused"   # decided at run time, and said


def test_tune_hook_sees_the_conv_output() -> None:
    model, x = _block(), torch.randn(2, 3, 8, 8)
    seen: list[torch.Tensor] = []
    tuned = normfx.convbn(model, mode="tune").eval()
    tuned.conv.register_forward_hook(lambda mod, i, o: seen.append(o.detach()))
    tuned(x)
    assert torch.equal(seen[0], model.conv(x))
    assert torch.equal(tuned.conv(x), model.conv(x))   # a direct call returns what the conv returns


def test_tune_fused_without_hooks_saves_no_bn_input() -> None:
    model, x = _block(), torch.randn(2, 3, 8, 8)
    tuned = normfx.convbn(model, mode="tune").eval()
    _same_function(tuned, model, x)
    assert tune_path(tuned.bn) == "fused"
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x_ = x.clone().requires_grad_()
        tuned.head(torch.relu(tuned.bn(tuned.conv(x_))))
    conv_out = model.conv(x)
    assert not any(t.shape == conv_out.shape and torch.equal(t, conv_out) for t in saved)


@pytest.mark.parametrize("reentrant", [True, False])
def test_tune_exact_under_checkpoint_of_the_conv(reentrant: bool) -> None:
    model, x = _block(), torch.randn(2, 3, 8, 8)

    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            i = self.inner
            return i.head(torch.relu(i.bn(checkpoint(i.conv, x, use_reentrant=reentrant))))

    tuned = normfx.convbn(model, mode="tune").eval()
    _same_function(Wrapped(tuned), Wrapped(model), x)


def test_tune_exact_when_user_code_reuses_the_conv_output() -> None:
    """User code outside every traced forward feeds the conv's output to the BN and to a loss."""
    model, x = _block(), torch.randn(2, 3, 8, 8)
    tuned = normfx.convbn(model, mode="tune").eval()

    def loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        u = m.conv(x)
        return (m.bn(u) ** 2).sum() + (u ** 3).sum()

    for m in (tuned, model):
        m.zero_grad(set_to_none=True)
        loss(m, x).backward()
    assert tune_path(tuned.bn) == "fused"
    for (name, p), q in zip(tuned.named_parameters(), model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert rel_err(p.grad, q.grad) < GRAD_RTOL, name


def test_tune_training_steps_leak_nothing() -> None:
    """A link that referenced its autograd node made a cycle the garbage collector cannot see
    through: every step's links (and the memory they held) stayed alive."""
    import gc

    from normfx.nn.convbn_autograd import Link as _Link

    tuned = normfx.convbn(torchvision.models.resnet18(num_classes=10).eval(), mode="tune")
    x = torch.randn(2, 3, 32, 32)

    def links_after_step() -> int:
        (tuned(x) ** 2).sum().backward()
        gc.collect()
        return sum(type(o) is _Link for o in gc.get_objects())

    first = links_after_step()
    assert [links_after_step() for _ in range(2)] == [first, first]   # each step's links are freed


def test_tune_pickles_after_a_forward() -> None:
    tuned = normfx.convbn(_block(), mode="tune").eval()
    tuned.conv(torch.randn(1, 3, 8, 8))    # leaves a link on the BN that the BN never took
    again = pickle.loads(pickle.dumps(tuned))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(again(x), tuned(x))


# --- Deploy: a fold a hook would see is skipped --------------------------------------------------------------

@pytest.mark.parametrize("where, hook, skipped", [
    ("conv", lambda m: m.register_forward_hook(lambda mod, i, o: o * 2), True),
    ("conv", lambda m: m.register_full_backward_hook(lambda mod, gi, go: None), True),
    ("conv", lambda m: m.register_forward_pre_hook(lambda mod, i: None), False),   # sees x: unchanged
    ("bn", lambda m: m.register_forward_hook(lambda mod, i, o: None), True),
    ("bn", lambda m: m.register_forward_pre_hook(lambda mod, i: None), True),
])
def test_deploy_skips_folds_that_hooks_would_see(where: str, hook, skipped: bool) -> None:
    model, x = _block(), torch.randn(2, 3, 8, 8)
    hook(getattr(model, where))
    calls: list[int] = []
    model.bn.register_forward_hook(lambda mod, i, o: calls.append(1)) if where == "bn" else None
    deployed = normfx.convbn(model, mode="deploy")
    report = normfx.last_report(deployed).passes[0]
    assert rel_err(deployed(x), model(x)) < DEPLOY_RTOL
    if skipped:
        assert [s.reason for s in report.skips] == [SkipReason.HOOKED]
        assert isinstance(deployed.bn, nn.BatchNorm2d)
        if where == "bn":
            calls.clear()
            deployed(x)
            assert calls == [1]   # the hook still fires on its module
    else:
        assert not report.skips and isinstance(deployed.bn, nn.Identity)


def test_deploy_of_a_tune_block_with_a_hook_reverts_it() -> None:
    model, x = _block(), torch.randn(2, 3, 8, 8)
    tuned = normfx.convbn(model, mode="tune").eval()
    tuned.conv.register_forward_hook(lambda mod, i, o: o * 2)
    model.conv.register_forward_hook(lambda mod, i, o: o * 2)
    deployed = normfx.deploy(tuned)
    assert rel_err(deployed(x), model(x)) < DEPLOY_RTOL
    assert type(deployed.conv) is nn.Conv2d and type(deployed.bn) is nn.BatchNorm2d


def test_resnet_deploy_with_a_hook_on_one_conv() -> None:
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    model.conv1.register_forward_hook(lambda mod, i, o: o * 2)
    x = torch.randn(2, 3, 32, 32)
    deployed = normfx.convbn(model, mode="deploy")
    assert rel_err(deployed(x), model(x)) < DEPLOY_RTOL
    assert normfx.last_report(deployed).passes[0].skip_counts() == {SkipReason.HOOKED.value: 1}


# --- Tracing leaves nothing behind ---------------------------------------------------------------------------

class Lazy(nn.Module):
    """Sets an attribute on its first call, as torchvision's MultiScaleRoIAlign sets its scales."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.scale: float | torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            self.scale = x.shape[-1] / 8
        return self.bn(self.conv(x)) * self.scale


class Parent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lazy = Lazy()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lazy(x)))


@pytest.mark.parametrize("one_liner", [
    lambda m: normfx.convbn(m, mode="deploy"), lambda m: normfx.convbn(m, mode="tune"), normfx.freeze,
    normfx.fixed_point, normfx.evonorm, normfx.trace,
], ids=["deploy", "tune", "freeze", "fixed_point", "evonorm", "trace"])
def test_tracing_leaves_no_state_and_keeps_side_effects(one_liner) -> None:
    model = randomize_bn(Parent()).eval()
    out = one_liner(model)
    assert model.lazy.scale is None   # the caller's model: untouched
    for m in out.modules():
        for v in vars(m).values():
            assert not isinstance(v, torch.fx.Proxy)
    out.eval()
    y = out(torch.randn(2, 3, 16, 16))
    assert y.shape == (2, 4, 14, 14)
    assert out.get_submodule("lazy").scale == 2.0
    assert type(out.get_submodule("lazy")).__name__ == "Lazy"   # not replaced by a graph


def test_state_writing_forward_is_reported() -> None:
    out = normfx.fixed_point(randomize_bn(Parent()))
    why = dict(normfx.last_report(out).untraceable)
    assert "writes module state" in why["lazy"]


class Cached(nn.Module):
    """Fills a cache on its eval-mode calls, as timm's LeViT attention fills ``attention_bias_cache``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.bias = nn.Parameter(torch.randn(8, 1, 1))
        self.cache: dict[str, torch.Tensor] = {}
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        self.seen.append(1)
        return self.bn(self.conv(x)) + self.cache[key]


def test_a_cache_filled_while_tracing_keeps_no_proxy_and_a_second_pass_works() -> None:
    """Tracing the caller's model itself (``analyze``, ``inspect``, ``plan``) once left a Proxy in
    such a cache, and the next trace of the model failed inside torch.fx ("does not belong to this
    Graph"). The write is undone and reported; the module keeps running its own forward."""
    model = randomize_bn(nn.Sequential(Cached(), nn.ReLU())).eval()
    analysis = normfx.analysis.analyze(model)
    assert model[0].cache == {} and model[0].seen == []
    assert re.search(r"writes module state while it runs \('(seen|cache)' of Cached\)", dict(analysis.untraceable)["0"])
    inspect_model(model)                            # normfx inspect: a dry run on the model itself
    x = torch.randn(2, 3, 8, 8)
    deployed = normfx.deploy(model)                  # traced again: no stale Proxy
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-5)
    assert list(model[0].cache) == ["cpu"] and all(isinstance(v, torch.Tensor) for v in model[0].cache.values())


# --- Pruning -------------------------------------------------------------------------------------------------

def _pruned() -> nn.Module:
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    for m in (model.conv1, model.layer1[0].conv1, model.fc):
        prune.l1_unstructured(m, "weight", 0.5)
    return model


def test_pruned_model_folds_and_pruning_becomes_permanent() -> None:
    model, x = _pruned(), torch.randn(2, 3, 32, 32)
    deployed = normfx.convbn(model, mode="deploy")
    assert rel_err(deployed(x), model(x)) < DEPLOY_RTOL
    assert not hasattr(deployed.conv1, "weight_orig") and prune.is_pruned(model)   # the caller's is kept
    assert hasattr(deployed.fc, "weight_orig")   # no BatchNorm after it: still pruned, as it was
    assert (deployed.conv1.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    details = {c.site: c.detail for c in normfx.last_report(deployed).passes[0].changes}
    assert "pruning of 'conv1.weight' made permanent" in details["bn1"]


def test_pruned_model_tune_keeps_pruned_entries_at_zero() -> None:
    model, x = _pruned(), torch.randn(2, 3, 32, 32)
    tuned = normfx.convbn(model, mode="tune").eval()
    assert prune.is_pruned(tuned)
    _same_function(tuned, model, x)
    opt = torch.optim.SGD(tuned.parameters(), lr=0.1)
    opt.step()
    assert (tuned.conv1.weight[tuned.conv1.weight_mask == 0] == 0).all()
    deployed = normfx.deploy(tuned)
    assert rel_err(deployed(x), tuned(x)) < DEPLOY_RTOL


@pytest.mark.parametrize("one_liner", [normfx.freeze, normfx.evonorm, normfx.deploy])
def test_pruned_model_goes_through_every_one_liner(one_liner) -> None:
    out = one_liner(_pruned())
    assert out(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_fixed_point_refuses_a_pruned_model_with_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"'conv1.weight' is pruned .*prune.remove\(model.conv1, 'weight'\)"):
        normfx.fixed_point(_pruned())


# --- Mixed precision: Tune blocks within 2x Eval mode's own bf16 error, per parameter -----------------------

def _bf16_ratio(model: nn.Module, x: torch.Tensor) -> tuple[float, str]:
    tuned = normfx.convbn(model, mode="tune").eval()
    with torch.no_grad():
        proj = torch.randn_like(model(x))
    (_, g32), (_, g16), (_, gt) = (amp_grads(m, x, proj, amp) for m, amp in ((model, False), (model, True),
                                                                          (tuned, True)))
    params = [n for n, _ in model.named_parameters() if n in g32]   # per parameter, as Eval mode's noise
    return max((rel_err(gt[n], g32[n]) / max(rel_err(g16[n], g32[n]), 1e-3), n) for n in params)


@pytest.mark.parametrize("seed", range(6))
def test_tune_bf16_gradients_within_2x_eval_linear_bn(seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8), nn.BatchNorm1d(8))
    randomize_bn(model, seed=seed).eval()
    ratio, name = _bf16_ratio(model, torch.randn(64, 16))
    assert ratio <= 2.0, name


@pytest.mark.parametrize("arch, seed", [("resnet18", 0), ("resnet18", 1), ("mobilenet_v3_small", 0)])
def test_tune_bf16_gradients_within_2x_eval_zoo(arch: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = randomize_bn(getattr(torchvision.models, arch)(num_classes=10), seed=seed).eval()
    ratio, name = _bf16_ratio(model, torch.randn(4, 3, 32, 32))
    assert ratio <= 2.0, name


# --- One batch convention ------------------------------------------------------------------------------------

class KW(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, input_ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.bn(self.lin(input_ids)) * scale


@pytest.mark.parametrize("batches", [
    [torch.randn(8, 4)], [(torch.randn(8, 4), torch.zeros(8))], [[torch.randn(8, 4)]],
    [{"input_ids": torch.randn(8, 4)}],
], ids=["tensor", "tuple", "list", "dict"])
@pytest.mark.parametrize("fn", ["calibrate", "recalibrate_bn"])
def test_one_batch_convention(batches, fn: str) -> None:
    model = KW()
    if fn == "calibrate":
        q = normfx.fixed_point(model)
        normfx.calibrate(q, batches, progress=False)
    else:
        normfx.recalibrate_bn(model, batches, progress=False)
        assert model.bn.num_batches_tracked.item() == 1


def test_forward_fn_and_a_clear_error() -> None:
    model = KW()
    normfx.recalibrate_bn(model, [{"x": torch.randn(8, 4)}], forward_fn=lambda m, b: m(b["x"]), progress=False)
    with pytest.raises(TypeError, match="forward_fn="):
        normfx.recalibrate_bn(model, [3.0], progress=False)


# --- The API's own contradictions ----------------------------------------------------------------------------

def test_directpred_twice_raises_already_transformed() -> None:
    net = nn.Sequential(nn.Linear(8, 4))
    net.add_module("predictor", nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4)))
    once = normfx.directpred(net)
    with pytest.raises(normfx.AlreadyTransformedError, match="applies once"):
        normfx.directpred(once)


def test_specialized_call_error_says_what_works() -> None:
    class Opt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y if mask is None else y * mask

    out = normfx.fixed_point(nn.Sequential(randomize_bn(Opt())))   # casts: Opt's forward becomes a graph
    with pytest.raises(normfx.SpecializedCallError) as info:
        out.get_submodule("0")(torch.randn(1, 3, 4, 4), torch.ones(1, 4, 4, 4))
    assert "leaf_modules=[...] naming" not in str(info.value) and "call it with the default" in str(info.value)


# --- torch.compile of a fixed-point model ---------------------------------------------------------------------

def _calibrated_fixed_point() -> nn.Module:
    torch.manual_seed(0)
    q = normfx.fixed_point(randomize_bn(torchvision.models.resnet18(num_classes=10)).eval())
    normfx.calibrate(q, [torch.randn(4, 3, 96, 96)], progress=False)
    return q


@pytest.mark.slow
def test_compiled_fixed_point_gives_eager_bits() -> None:
    """Inductor fused the cast's (x + C) − C rounding (98% of ResNet-18's outputs off by up to 9.1 at
    224²), and a graph shared by every cast baked one cast's step (binary-point gradients 2^k off)."""
    q = _calibrated_fixed_point().eval()
    x = torch.randn(2, 3, 96, 96) * 2
    with torch.no_grad():
        assert torch.equal(torch.compile(q)(x), q(x))


@pytest.mark.slow
def test_compiled_fixed_point_training_step_equals_eager() -> None:
    import copy

    # In float64: a binary point's gradient is one sum over its whole tensor, with cancellation, so
    # in float32 the summation order (thread count, Inductor's fusion) moved it by up to 3%.
    q = _calibrated_fixed_point().train().double()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    eager, compiled = copy.deepcopy(q), copy.deepcopy(q)

    def step(call: nn.Module, owner: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = nn.functional.cross_entropy(call(x), y)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in owner.named_parameters() if p.grad is not None}

    le, ge = step(eager, eager)
    lc, gc = step(torch.compile(compiled), compiled)
    assert torch.equal(lc, le)
    assert ge.keys() == gc.keys()
    for name in ge:   # (a binary point's gradient can cancel to 0: an absolute floor)
        assert torch.allclose(gc[name], ge[name], rtol=1e-9, atol=1e-12), name
    for (name, a), b in zip(eager.named_buffers(), compiled.buffers()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
