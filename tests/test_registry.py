"""The registry is the one list of transforms: the one-liners, their configs, deploy's steps, inspect's
columns and the docs table all derive from it, and ``normfx.apply`` composes them."""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

import normfx
from normfx.cli import COLUMNS
from normfx.passes.registry import DEPLOY, DEPLOY_STEPS, TRANSFORMS, by_name, markdown_table, transform_for

ROOT = Path(__file__).resolve().parents[1]


def test_docs_table_is_rendered_from_the_registry():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "docs" / "render.py")
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    text = (ROOT / "docs" / "index.md").read_text()
    assert render.rendered(text) == text, "docs/index.md's table of transforms is stale: run python docs/render.py"
    assert markdown_table() in text
    assert all(f"`{t.name}`" in markdown_table() for t in TRANSFORMS)


@pytest.mark.parametrize("t", TRANSFORMS, ids=lambda t: t.name)
def test_every_transform_has_its_one_liner_and_config(t):
    assert t is normfx.TRANSFORMS[TRANSFORMS.index(t)] and by_name(t.name) is t
    assert t.name in normfx.__all__ and t.config.__name__ in normfx.__all__
    assert transform_for(t.config()) is t if t.name != "repbn" else transform_for(t.example_config()) is t
    assert dataclasses.is_dataclass(t.config) and t.config.__dataclass_params__.frozen   # type: ignore[attr-defined]
    params = inspect.signature(getattr(normfx, t.name)).parameters
    fields = [f.name for f in dataclasses.fields(t.config)]
    apply_level = ("model", "filter_fn", "leaf_modules", "inplace", "example_inputs")   # normfx.apply's own
    assert [p for p in params if p not in apply_level] == fields, \
        f"normfx.{t.name}'s keyword arguments and {t.config.__name__}'s fields differ"
    assert {"filter_fn", "leaf_modules", "inplace"} <= set(params)
    assert (ROOT / "docs" / t.page).exists()


def test_deploy_steps_and_inspect_columns_derive_from_the_registry():
    assert [s.name for s in DEPLOY_STEPS] == [s.name for t in TRANSFORMS for s in t.deploy]
    assert [s.name for s in DEPLOY_STEPS] == ["bake_random_entries", "bake_directpred", "freeze_binary_points",
                                              "fold_repbn", "fold_convbn", "merge_branches", "unsync_bn"]
    assert DEPLOY.steps(normfx.DeployConfig()) == DEPLOY_STEPS
    assert list(COLUMNS) == [c for t in TRANSFORMS for c, _ in t.inspect]


@pytest.mark.parametrize("config, message", [
    (lambda: normfx.ConvBNConfig("fold"), "mode must be one of"),
    (lambda: normfx.RepBNConfig(total_steps=0), "total_steps must be >= 1"),
    (lambda: normfx.EvoNormConfig(groups=True), "groups must be an int"),
    (lambda: normfx.FixedPointConfig(bits=1), r"bits must be in \[2, 24\]"),
    (lambda: normfx.FixedPointConfig(rounding="nearest"), "rounding"),
    (lambda: normfx.FreezeConfig(keep=("weights",)), r"unknown role\(s\) \['weights'\]"),
    (lambda: normfx.LinearAttentionConfig(kernel_size=4), "kernel_size must be a positive odd int"),
    (lambda: normfx.DirectPredConfig(freq=0), "freq must be >= 1"),
])
def test_configs_validate_before_any_model_is_touched(config, message):
    with pytest.raises(ValueError, match=message):
        config()


def test_configs_normalize_what_they_accept():
    assert normfx.FixedPointConfig(rounding="AP_RND_CONV", targets=["weight"]) == normfx.FixedPointConfig(
        rounding="nearest_even", targets=("weight",))
    assert normfx.LinearAttentionConfig(image_size=32, stages=[0]).image_size == (32, 32)
    assert normfx.FreezeConfig(keep="norm").keep == ("norm",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        normfx.ConvBNConfig().mode = "deploy"   # type: ignore[misc]


def test_apply_composes_in_one_copy_and_matches_the_one_liners():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10)
    both = normfx.apply(vit, normfx.RepBNConfig(total_steps=100), normfx.LinearAttentionConfig())
    chained = normfx.linear_attention(normfx.repbn(vit, total_steps=100))
    assert [p.name for p in normfx.last_report(both).passes] == ["swap_layernorm", "linear_attention"]
    assert {n: type(m) for n, m in both.named_modules()} == {n: type(m) for n, m in chained.named_modules()}
    assert isinstance(both, torchvision.models.VisionTransformer)
    assert not ({p.data_ptr() for p in both.parameters()} & {p.data_ptr() for p in vit.parameters()})


def test_apply_refuses_what_it_cannot_run():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ValueError, match="at least one config"):
        normfx.apply(net)
    with pytest.raises(TypeError, match="dict is not the config of a normfx transform; the configs are"):
        normfx.apply(net, {"mode": "deploy"})
    with pytest.raises(TypeError, match="filter_fn must be a callable"):
        normfx.convbn(net, filter_fn="0")   # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"leaf_modules names '2', which Sequential does not have"):
        normfx.convbn(net, leaf_modules=["2"])
    with pytest.raises(TypeError, match="qualified names or nn.Module types"):
        normfx.convbn(net, leaf_modules=[3])   # type: ignore[list-item]


def test_filter_fn_keeps_first_and_last_layers_in_float():
    r18 = torchvision.models.resnet18()
    q = normfx.fixed_point(r18, filter_fn=lambda m, fqn: fqn not in ("conv1", "fc"))
    skipped = {s.site: s.reason for s in normfx.last_report(q).skips}
    assert skipped == dict.fromkeys(["conv1.weight", "conv1 (output)", "fc.weight", "fc.bias", "fc (output)"],
                                    normfx.SkipReason.FILTERED)
    assert type(q.conv1) is nn.Conv2d and type(q.fc) is nn.Linear
    assert isinstance(q.layer1[0].conv1.parametrizations.weight[0], normfx.nn.FixedPoint)


def test_leaf_modules_by_type_and_a_deploy_that_leaves_a_filtered_site():
    r18 = torchvision.models.resnet18().eval()
    d = normfx.convbn(r18, mode="deploy", leaf_modules=[torchvision.models.resnet.BasicBlock])
    report = normfx.last_report(d)
    assert [c.site for c in report.changes] == ["bn1"]      # the stem: every other BN is inside a block
    assert {s.reason for s in report.skips} == {normfx.SkipReason.LEAF}
    tuned = normfx.convbn(r18, mode="tune")
    kept = normfx.deploy(tuned, filter_fn=lambda m, fqn: fqn != "layer1.0.bn1")
    assert type(kept.layer1[0].bn1).__name__ == "TuneBatchNorm2d"     # left as it is, reported
    assert normfx.last_report(kept).get("fold_convbn").skip_counts() == {"excluded by filter_fn": 1}


def test_freeze_leaves_an_excluded_batchnorm_as_it_is():
    net = torchvision.models.resnet18()
    out = normfx.freeze(net, keep=(), freeze_stats=True, filter_fn=lambda m, fqn: fqn != "bn1")
    assert out.bn1.weight.requires_grad and not out.layer1[0].bn1.weight.requires_grad
    assert not out.bn1._forward_pre_hooks and out.layer1[0].bn1._forward_pre_hooks   # stats frozen elsewhere only
    assert normfx.last_report(out).get("freeze").skip_counts() == {"excluded by filter_fn": 1}
