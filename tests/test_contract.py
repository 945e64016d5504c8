"""Contracts every registered transform keeps, parametrized from the registry (``normfx.TRANSFORMS``):
a transform added there gets these tests without writing them. Each runs its ``example_config()`` on
a small CNN, a small ViT and a model with an untraceable submodule:

* the caller's model untouched, and no storage shared with the result (tied weights stay tied);
* applied twice: nothing more, or ``AlreadyTransformedError``;
* sites reported once per pass, and the dry run (``plan``) reports what the run does;
* ``filter_fn`` excludes exactly the sites it rejects; ``leaf_modules`` keeps the named module as it is;
* the module tree and the caller's hooks kept; ``deploy`` finalizes what the transform inserted.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import normfx
from normfx.nn.convbn import TuneBN, TuneConv
from normfx.nn.directpred import DirectPred
from normfx.nn.fixed_point import FixedPoint
from normfx.nn.freeze import random_entries
from normfx.nn.repbn import ProgressiveRepBN
from normfx.nn.sync_bn import SyncBN
from normfx.passes.registry import DEPLOY
from normfx.runner import plan
from normfx.scope import make_scope
from tests.conftest import randomize_bn

timm = pytest.importorskip("timm")


class CNN(nn.Module):
    """Conv/BN/ReLU blocks (one nested), a BYOL-style predictor and two tied Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 4)
        self.predictor = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))
        self.tied, self.tied2 = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.tied2.weight = self.tied.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(torch.relu(self.bn1(self.conv1(x))))
        z = self.fc(y.mean((2, 3)))
        return self.tied2(self.tied(self.predictor(z)))


class Gate(nn.Module):
    """Data-dependent control flow: the tracer cannot follow it, so this module stays opaque."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return x


class Untraceable(CNN):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.gate(torch.relu(self.bn1(self.conv1(x)))).mean(1, keepdim=True).expand_as(x))


def _cnn() -> nn.Module:
    return randomize_bn(CNN(), torch.randn(4, 3, 8, 8)).eval()


def _untraceable() -> nn.Module:
    return randomize_bn(Untraceable(), torch.randn(4, 3, 8, 8)).eval()


def _vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=4, depth=2).eval()


MODELS = {"cnn": (_cnn, (2, 3, 8, 8), "block"), "vit": (_vit, (2, 3, 32, 32), "blocks.1"),
          "untraceable": (_untraceable, (2, 3, 8, 8), "block")}
"""name: (build, input shape, a submodule to keep as a leaf)."""
CASES = [pytest.param(t, m, id=f"{t.name}-{m}") for t in normfx.TRANSFORMS for m in MODELS]


def _run(t, model: nn.Module, **kwargs) -> nn.Module:
    return normfx.apply(model, t.example_config(), **kwargs)


def _applied(t, model_name: str) -> tuple[nn.Module, nn.Module]:
    """The caller's model and the transform's result, or a skip where the transform does not apply
    to that model (and says so with a ValueError naming the model)."""
    model = MODELS[model_name][0]()
    try:
        return model, _run(t, model)
    except ValueError as e:
        assert type(model).__name__ in str(e)
        pytest.skip(f"{t.name} does not apply to the {model_name} model: {e}")


def _storages(m: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()] if t.numel()}


def _master(m: nn.Module) -> torch.Tensor:
    """The weight's Parameter (a parametrized weight is recomputed on each access: its original)."""
    return m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight


def _state(m: nn.Module) -> dict:
    return {"types": {n: type(x).__name__ for n, x in m.named_modules()},
            "flags": {n: p.requires_grad for n, p in m.named_parameters()},
            "tensors": {k: v.clone() for k, v in m.state_dict().items()}}


def _same_state(a: dict, b: dict) -> bool:
    return (a["types"] == b["types"] and a["flags"] == b["flags"] and list(a["tensors"]) == list(b["tensors"])
            and all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"]))


def _owner(site: str, modules: dict[str, nn.Module]) -> str | None:
    """The module a site is reported by: the site itself (a layer swapped or folded), the layer of a
    tensor (``conv.weight``), or the module whose output is cast (``bn1 (output)``)."""
    layer, _, tensor = site.rpartition(".")
    for name in (site, site.split(" (output")[0], layer if tensor in ("weight", "bias") else None):
        if name and name in modules:
            return name
    return None


def _belongs(site: str, names: set[str]) -> bool:
    """A site belongs to a module when it is the module or something of it (``conv.weight``,
    ``bn1 (output)``, ``blocks.1.attn``)."""
    return any(site == n or site.startswith(n + ".") or site.startswith(n + " ") for n in names)


def _sites(report: normfx.Report) -> dict[str, tuple[str, str]]:
    return {**{c.site: ("change", c.action) for c in report.changes},
            **{s.site: ("skip", s.reason.value) for s in report.skips}}


@pytest.mark.parametrize("t, model_name", CASES)
def test_caller_untouched_and_no_storage_shared(t, model_name):
    model = MODELS[model_name][0]()
    before = _state(model)
    try:
        out = _run(t, model)
    except ValueError:
        assert _same_state(before, _state(model)), "a refused transform changed the caller's model"
        return
    assert _same_state(before, _state(model))
    assert not (_storages(out) & _storages(model))
    if model_name != "vit" and t.name != "directpred":
        mods = dict(out.named_modules())
        assert _master(mods["tied"]) is _master(mods["tied2"])
    with torch.no_grad():
        for p in out.parameters():
            p.add_(1.0)
    assert _same_state(before, _state(model))


@pytest.mark.parametrize("t, model_name", CASES)
def test_twice_changes_nothing_more_or_refuses(t, model_name):
    _, once = _applied(t, model_name)
    if t is DEPLOY or any(isinstance(m, ProgressiveRepBN) for m in once.modules()):
        once = once.eval()
    before = _state(once)
    try:
        twice = _run(t, once)
    except normfx.AlreadyTransformedError:
        return
    report = normfx.last_report(twice)
    # Nothing more: no new change of structure or values (freeze sets the same flags again).
    assert _same_state(before, _state(twice)) or not report.modified, report.summary()


@pytest.mark.parametrize("t, model_name", CASES)
def test_sites_reported_once_and_the_dry_run_plans_the_run(t, model_name):
    model, out = _applied(t, model_name)
    report = normfx.last_report(out)
    for p in report.passes:
        names = [c.site for c in p.changes] + [s.site for s in p.skips]
        assert len(names) == len(set(names)), f"{p.name} reports a site twice"
    before = _state(model)
    planned = plan(model, t.steps(t.example_config()), make_scope(model, None, None, plan=True))
    assert _same_state(before, _state(model)), "the dry run changed the model"
    if t is DEPLOY:
        return   # deploy folds in a chain (a later step sees what an earlier one did); inspect does not run it
    assert _sites(planned) == _sites(report)


@pytest.mark.parametrize("t, model_name", CASES)
def test_filter_fn_excludes_exactly_the_sites_it_rejects(t, model_name):
    model, out = _applied(t, model_name)
    report = normfx.last_report(out)
    modules = dict(model.named_modules())
    owners = sorted({o for c in report.changes if (o := _owner(c.site, modules)) is not None})
    if not owners:
        pytest.skip(f"{t.name} changes no module site of the {model_name} model")
    rejected = set(owners[::2])
    filtered_out = _run(t, model, filter_fn=lambda m, fqn: fqn not in rejected)
    filtered = normfx.last_report(filtered_out)
    got = _sites(filtered)
    assert len(got) == len(_sites(report)), "the filter changed the number of sites"
    for c in report.changes:
        if _owner(c.site, modules) in rejected:
            assert got[c.site] == ("skip", "excluded by filter_fn"), c.site
        else:
            assert got[c.site] == ("change", c.action), c.site
    kept = dict(filtered_out.named_modules())
    for name in rejected:   # a rejected module is the caller's, as it was
        assert type(kept[name]) is type(modules[name]), name
        ref = modules[name].state_dict()
        assert all(torch.equal(ref[k], v) for k, v in kept[name].state_dict().items() if k in ref), name


@pytest.mark.parametrize("t, model_name", CASES)
def test_leaf_modules_keep_the_named_module_as_it_is(t, model_name):
    build, _, leaf = MODELS[model_name]
    model = build()
    try:
        out = _run(t, model, leaf_modules=[leaf])
    except ValueError:
        pytest.skip(f"{t.name} does not apply to the {model_name} model")
    inside = {n: m for n, m in model.named_modules() if n == leaf or n.startswith(leaf + ".")}
    result = dict(out.named_modules())
    for name, m in inside.items():
        assert type(result[name]) is type(m), name
        assert all(torch.equal(m.state_dict()[k], v) for k, v in result[name].state_dict().items()), name
        assert {p.requires_grad for p in result[name].parameters()} <= {p.requires_grad for p in m.parameters()}
    report = normfx.last_report(out)
    assert not any(_belongs(c.site, {leaf}) for c in report.changes)
    assert all(s.reason is normfx.SkipReason.LEAF for s in report.skips if _belongs(s.site, {leaf}))


@pytest.mark.parametrize("t, model_name", CASES)
def test_module_tree_hooks_and_deploy(t, model_name):
    build, shape, _ = MODELS[model_name]
    model = build()
    calls = []
    model.register_forward_hook(lambda *_: calls.append("root"))
    first = dict(model.named_children())
    leaf_name = next(n for n, m in model.named_modules() if n and not list(m.children())
                     and not isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.Conv2d, nn.Linear)))
    dict(model.named_modules())[leaf_name].register_forward_hook(lambda *_: calls.append("leaf"))
    try:
        out = _run(t, model)
    except ValueError:
        pytest.skip(f"{t.name} does not apply to the {model_name} model")
    assert isinstance(out, type(model))
    assert not [n for n, m in out.named_modules() if m.training], "a module came back in training mode"
    names = {n for n, _ in out.named_modules()}
    assert set(first) <= names
    x = torch.randn(*shape)
    with torch.no_grad():
        out.eval()(x)
    assert "root" in calls, "the caller's hook on the model stopped firing"
    same_leaf = leaf_name in names and type(dict(out.named_modules())[leaf_name]) is type(
        dict(model.named_modules())[leaf_name])
    if same_leaf:
        assert "leaf" in calls, f"the caller's hook on '{leaf_name}' stopped firing"
    for m in out.modules():   # PRepBN at the end of its schedule, as deploy requires
        if isinstance(m, ProgressiveRepBN):
            m.lam.fill_(0.0)
    deployed = normfx.deploy(out.eval())
    with torch.no_grad():
        assert torch.isfinite(deployed(x)).all()
    for name, m in deployed.named_modules():
        assert not isinstance(m, (TuneBN, TuneConv, ProgressiveRepBN, DirectPred, SyncBN)), name
        assert not (isinstance(m, FixedPoint) and m.trainable), name
        assert not random_entries(m), name
    assert copy.deepcopy(deployed) is not None
