"""normfx.freeze: BatchNorm-only training, its random control, and the lab's disabled-feature count."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

import normfx
from tests.conftest import DEPLOY_RTOL, randomize_bn, rel_err

X = torch.randn(2, 3, 64, 64)


def _resnet18() -> nn.Module:
    m = torchvision.models.resnet18(num_classes=10)
    return randomize_bn(m, X)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The effective tensors of every layer (parametrized weights as the layer sees them)."""
    out = {}
    for name, m in model.named_modules():
        for t in ("weight", "bias"):
            v = getattr(m, t, None)
            if isinstance(v, torch.Tensor):
                out[f"{name}.{t}"] = v.detach().clone()
    return out


def _step(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    model.train()
    for _ in range(steps):  # two steps: momentum and Adam's moments are non-zero in the second
        opt.zero_grad()
        model(X).square().mean().backward()
        opt.step()


def _trainable_mask(model: nn.Module) -> dict[str, torch.Tensor]:
    """Which entries of each effective tensor may move (True) after freeze."""
    from normfx.nn.freeze import random_entries

    mask = {}
    for name, m in model.named_modules():
        entries = random_entries(m)
        for t in ("weight", "bias"):
            v = getattr(m, t, None)
            if not isinstance(v, torch.Tensor):
                continue
            if t in entries:
                flat = torch.zeros(v.numel(), dtype=torch.bool)
                flat[entries[t].index] = True
                mask[f"{name}.{t}"] = flat.view_as(v)
            else:
                mask[f"{name}.{t}"] = torch.full_like(v, v.requires_grad, dtype=torch.bool)
    return mask


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5),
], ids=["sgd_momentum", "adamw"])
@pytest.mark.parametrize("kwargs", [dict(keep=("norm",)), dict(keep=("norm",), random=500),
                                    dict(keep=(), random=9600), dict(keep=("head", "bias")),
                                    dict(keep=(), random="per_channel")],
                         ids=["bn_only", "bn_plus_random", "random_only", "head_bias", "per_channel"])
def test_frozen_entries_never_move(make_opt, kwargs):
    m = normfx.freeze(_resnet18(), **kwargs)
    before, mask = _snapshot(m), _trainable_mask(m)
    # The optimizer is handed every parameter, as users do: frozen ones must stay put anyway.
    _step(m, make_opt(m.parameters()))
    after = _snapshot(m)
    moved = 0
    for k, b in before.items():
        a, free = after[k], mask[k]
        assert torch.equal(a[~free], b[~free]), f"a frozen entry of {k} moved"
        moved += int((a[free] != b[free]).sum())
    trainable = sum(int(v.sum()) for v in mask.values())
    assert trainable == normfx.trainable_summary(m).trainable
    assert moved >= 0.9 * trainable  # the trainable ones do train


def _norm_count(model: nn.Module) -> int:
    """Independent count: parameters owned by the normalization types a user would list."""
    kinds = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
    names = ("LayerNorm2d", "BatchNormAct2d", "GroupNormAct", "LayerNormAct2d", "RmsNorm")
    return sum(p.numel() for m in model.modules()
               if isinstance(m, kinds) or type(m).__name__ in names
               for p in m.parameters(recurse=False))


ZOO = [
    ("torchvision", "resnet18", "fc"),
    ("torchvision", "mobilenet_v3_small", "classifier.3"),
    ("torchvision", "vit_b_16", "heads.head"),
    ("torchvision", "convnext_tiny", "classifier.2"),
    ("timm", "efficientnet_b0", "classifier"),
    ("timm", "vit_tiny_patch16_224", "head"),
    ("timm", "convnext_atto", "head.fc"),
]


@pytest.mark.parametrize("lib,name,head", ZOO, ids=[f"{a}:{b}" for a, b, _ in ZOO])
def test_counts_per_role_are_exact(lib, name, head):
    if lib == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model(name, pretrained=False)
    else:
        model = getattr(torchvision.models, name)()
    norm = _norm_count(model)
    head_mod = model.get_submodule(head)
    head_count = sum(p.numel() for p in head_mod.parameters())
    s = normfx.trainable_summary(normfx.freeze(model, keep=("norm",)))
    assert s.heads == (head,)
    assert s.by_role["norm"] == s.trainable == norm > 0
    assert s.total == sum(p.numel() for p in model.parameters())
    s = normfx.trainable_summary(normfx.freeze(model, keep=("head",)))
    assert s.trainable == s.by_role["head"] == head_count
    assert s.by_layer[head] == (head_count, head_count)
    s = normfx.trainable_summary(normfx.freeze(model, keep=("bias",)))
    conv_bias = sum(m.bias.numel() for m in model.modules()
                    if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None)
    mha_bias = sum(m.in_proj_bias.numel() for m in model.modules()
                   if isinstance(m, nn.MultiheadAttention) and m.in_proj_bias is not None)
    assert s.trainable == s.by_role["bias"] == conv_bias + mha_bias


def test_random_trains_exactly_n_entries_seeded():
    base = _resnet18()
    a = normfx.freeze(base, keep=(), random=1234, seed=3)
    s = normfx.trainable_summary(a)
    assert s.trainable == s.by_role["random"] == 1234
    values = [p for n, p in a.named_parameters() if n.endswith(".values")]
    assert sum(v.numel() for v in values) == 1234
    idx = {n: b for n, b in a.named_buffers() if n.endswith(".index")}
    assert all(torch.equal(i.unique(), i) for i in idx.values())  # distinct, sorted
    b = normfx.freeze(base, keep=(), random=1234, seed=3)
    c = normfx.freeze(base, keep=(), random=1234, seed=4)
    idx_b = {n: t for n, t in b.named_buffers() if n.endswith(".index")}
    idx_c = {n: t for n, t in c.named_buffers() if n.endswith(".index")}
    assert idx.keys() == idx_b.keys() and all(torch.equal(idx[k], idx_b[k]) for k in idx)
    assert idx_c.keys() != idx.keys() or any(not torch.equal(idx[k], idx_c[k]) for k in idx)
    # random="match": as many entries as keep selects, drawn only from frozen parameters
    m = normfx.freeze(base, keep=("norm",), random="match")
    s = normfx.trainable_summary(m)
    assert s.by_role["random"] == s.by_role["norm"] == _norm_count(base)
    assert not any("bn" in n and n.endswith(".values") for n, _ in m.named_parameters())


def test_per_channel_control_draws_two_entries_in_every_output_channel():
    """Frankle et al.'s control: two trainable entries in each output channel of every frozen conv
    and linear weight (ResNet-18: 2 × (9,600 / 2 BN channels + 10 classes)), none elsewhere; seeded."""
    from normfx.nn.freeze import random_entries
    from normfx.passes.freeze import output_channels

    base = _resnet18()
    m = normfx.freeze(base, keep=(), random="per_channel", seed=5)
    s = normfx.trainable_summary(m)
    assert s.trainable == s.by_role["random"] == _norm_count(base) + 2 * 10
    layers = {n: x for n, x in base.named_modules() if isinstance(x, (nn.Conv2d, nn.Linear))}
    drawn = {n: random_entries(x) for n, x in m.named_modules() if random_entries(x)}
    assert set(drawn) == set(layers)
    for name, entries in drawn.items():
        assert set(entries) == {"weight"}
        channels = output_channels(layers[name], layers[name].weight)[entries["weight"].index]
        assert torch.equal(torch.bincount(channels), torch.full((layers[name].weight.shape[0],), 2))
    again = normfx.freeze(base, keep=(), random="per_channel", seed=5)
    other = normfx.freeze(base, keep=(), random="per_channel", seed=6)
    idx = {n: b for n, b in m.named_buffers() if n.endswith(".index")}
    assert all(torch.equal(idx[n], b) for n, b in again.named_buffers() if n.endswith(".index"))
    assert any(not torch.equal(idx[n], b) for n, b in other.named_buffers() if n.endswith(".index"))
    # with BN kept trainable too, the heads still count (they are frozen); a kept head is not drawn from
    h = normfx.freeze(base, keep=("head",), random="per_channel")
    assert normfx.trainable_summary(h).by_role["random"] == _norm_count(base)
    # on its own output: the control in place is kept, nothing drawn twice
    twice = normfx.freeze(m, keep=(), random="per_channel")
    assert normfx.trainable_summary(twice).trainable == s.trainable


@pytest.mark.parametrize("layer,shape", [(nn.ConvTranspose2d(6, 8, 3, groups=2), (2, 6, 5, 5)),
                                         (nn.Conv1d(4, 6, 3, groups=2), (2, 4, 7)),
                                         (nn.Linear(5, 3), (2, 5)), (nn.Conv2d(3, 4, 1), (2, 3, 4, 4))],
                         ids=["convT_groups", "conv1d_groups", "linear", "conv1x1"])
def test_output_channel_of_every_entry(layer, shape):
    """The output channel an entry feeds, checked by perturbing it and seeing which output moves."""
    from normfx.passes.freeze import output_channels

    x = torch.randn(shape)
    oc = output_channels(layer, layer.weight)
    base = layer(x).detach()
    for i in range(layer.weight.numel()):
        with torch.no_grad():
            layer.weight.view(-1)[i] += 1.0
            moved = (layer(x) - base).abs().transpose(0, 1).reshape(base.shape[1], -1).amax(1)
            layer.weight.view(-1)[i] -= 1.0
        assert (moved > 1e-6).nonzero().reshape(-1).tolist() == [int(oc[i])], i


def test_random_entries_start_at_the_original_values():
    base = _resnet18().eval()
    m = normfx.freeze(base, keep=(), random=5000).eval()
    assert torch.equal(m(X), base(X))


def test_callers_model_untouched():
    base = _resnet18()
    base.layer1[0].conv1.weight.requires_grad_(False)  # a user's own choice must survive too
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    state = copy.deepcopy(base.state_dict())
    m = normfx.freeze(base, keep=("norm",), random=100, freeze_stats=True)
    _step(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    assert base.training and all(b.training for b in base.modules())
    assert not any("parametrizations" in n for n, _ in base.named_parameters())


def test_inplace_sets_the_callers_flags():
    base = _resnet18()
    m = normfx.freeze(base, keep=("head",), inplace=True)
    assert base.fc.weight.requires_grad and not base.conv1.weight.requires_grad
    assert m.fc is base.fc


def test_state_dict_keys_unchanged_and_checkpoints_load_both_ways():
    base = _resnet18().eval()
    keys = list(base.state_dict())
    assert list(normfx.freeze(base).state_dict()) == keys
    m = normfx.freeze(base, keep=("norm",), random=300, seed=1)
    sd = m.state_dict()
    extra = [k for k in sd if k not in keys]
    assert [k for k in sd if k in keys] == keys  # same keys, same order
    assert extra and all(k.endswith((".0.values", ".0.index")) and ".parametrizations." in k for k in extra)
    # train a little, then the checkpoint (extras dropped) loads into the original architecture
    _step(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    m.eval()
    plain = torchvision.models.resnet18(num_classes=10).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k in keys})
    assert torch.equal(plain(X), m(X))
    # and an ordinary checkpoint loads (strictly) into the random-control model
    other = normfx.freeze(_resnet18(), keep=("norm",), random=300, seed=1)
    other.load_state_dict(base.state_dict())
    assert torch.equal(other.eval()(X), base(X))
    # a full round trip keeps the trained random entries
    again = normfx.freeze(_resnet18(), keep=("norm",), random=300, seed=1)
    again.load_state_dict(m.state_dict())
    assert torch.equal(again.eval()(X), m(X))


def test_composes_with_convbn_in_either_order():
    base = _resnet18()
    for kwargs in (dict(keep=("norm",)), dict(keep=("head",), random=200)):
        a = normfx.freeze(normfx.convbn(base, mode="tune"), **kwargs)
        b = normfx.convbn(normfx.freeze(base, **kwargs), mode="tune")
        fa = {n: p.requires_grad for n, p in a.named_parameters()}
        fb = {n: p.requires_grad for n, p in b.named_parameters()}
        assert fa == fb
        assert normfx.trainable_summary(a) == normfx.trainable_summary(b)
        assert list(a.state_dict()) == list(b.state_dict())
        a.eval(), b.eval()
        assert torch.equal(a(X), b(X))


def test_survives_deploy():
    base = _resnet18().eval()
    m = normfx.freeze(base, keep=("head",), random=400).eval()
    before = m(X)
    d = normfx.deploy(m)
    assert rel_err(d(X), base(X)) < DEPLOY_RTOL
    assert torch.equal(m(X), before)  # deploy worked on a copy: the frozen model still runs as it did
    assert any("parametrizations" in n for n, _ in m.named_parameters())
    assert not any("parametrizations" in n for n, _ in d.named_parameters())
    flags = {n: p.requires_grad for n, p in d.named_parameters()}
    assert flags["fc.weight"] and flags["fc.bias"]
    # a conv that holds random entries stays trainable; a fully frozen conv folded with a frozen BN stays frozen
    random_layers = {n.partition(".parametrizations.")[0] for n, _ in m.named_parameters() if n.endswith(".values")}
    for layer in ("conv1", "layer1.0.conv1", "layer4.1.conv2"):
        assert flags[f"{layer}.weight"] == (layer in random_layers)
    rep = normfx.last_report(d)
    baked = [c for p in rep.passes if p.name == "bake_random_entries" for c in p.changes]
    assert len(baked) == len(random_layers) > 0
    # BN-only: the folded conv weights carry trained γ, so they require grad; still exact
    d2 = normfx.deploy(normfx.freeze(base, keep=("norm",)).eval())
    assert rel_err(d2(X), base(X)) < DEPLOY_RTOL
    assert dict(d2.named_parameters())["conv1.weight"].requires_grad


def test_running_stats_update_unless_freeze_stats():
    base = _resnet18()
    m = normfx.freeze(base, keep=("head",))
    mean = m.bn1.running_mean.clone()
    m.train()(X)
    assert not torch.equal(m.bn1.running_mean, mean)
    f = normfx.freeze(base, keep=("head",), freeze_stats=True)
    mean = f.bn1.running_mean.clone()
    f.train()
    out = f(X)
    assert torch.equal(f.bn1.running_mean, mean)
    assert torch.equal(out, copy.deepcopy(base).eval()(X))  # running statistics are used
    assert "freeze_stats: 20 BatchNorm" in normfx.last_report(f).summary()
    # BatchNorms whose γ/β train are not affected
    g = normfx.freeze(base, keep=("norm",), freeze_stats=True)
    mean = g.bn1.running_mean.clone()
    g.train()(X)
    assert not torch.equal(g.bn1.running_mean, mean)


def test_freeze_twice_is_stable():
    base = _resnet18()
    a = normfx.freeze(base, keep=("norm",))
    b = normfx.freeze(a, keep=("norm",))
    flags = {n: p.requires_grad for n, p in b.named_parameters()}
    assert {n: p.requires_grad for n, p in a.named_parameters()} == flags


class _TwoHeads(nn.Module):
    """Registration order deliberately differs from use order: the head is found from the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Linear(8, 3)
        self.box = nn.Linear(8, 4)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.tail = nn.Linear(8, 8)  # registered last, not an output layer

    def forward(self, x):
        h = self.tail(self.body(x)).relu()
        return {"cls": self.cls(h), "box": torch.sigmoid(self.box(h))}


def test_head_found_from_the_graph_on_every_output():
    m = normfx.freeze(_TwoHeads(), keep=("head",))
    s = normfx.trainable_summary(m)
    assert s.heads == ("box", "cls")
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"cls.weight", "cls.bias", "box.weight",
                                                                       "box.bias"}


def test_report_lists_layers_and_roles(caplog):
    with caplog.at_level(logging.INFO, logger="normfx"):
        m = normfx.freeze(_resnet18(), keep=("norm",))
    rep = normfx.last_report(m)
    (res,) = rep.passes
    layers = {n.rpartition(".")[0] for n, _ in _resnet18().named_parameters()}
    assert {c.site for c in res.changes} == layers
    assert {c.action for c in res.changes} == {"train", "freeze"}
    bn1 = next(c for c in res.changes if c.site == "bn1")
    assert bn1.action == "train" and "128 of 128" in bn1.detail
    assert "trainable: 9,600 of" in rep.summary() and "norm 9,600" in rep.summary()
    assert "trainable: 9,600" in caplog.text


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown role.*'weights'.*\['norm', 'head', 'bias'\]"):
        normfx.freeze(_resnet18(), keep=("weights",))
    with pytest.raises(ValueError, match="more than the .* frozen entries"):
        normfx.freeze(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), random=21)
    with pytest.raises(ValueError, match="random='match' draws as many entries as keep=\\(\\) selects"):
        normfx.freeze(_resnet18(), keep=(), random="match")
    with pytest.raises(ValueError, match="random must be"):
        normfx.freeze(_resnet18(), random=-1)
    with pytest.raises(ValueError, match="random must be a non-negative int, 'match' or 'per_channel'"):
        normfx.freeze(_resnet18(), random="per-channel")
    ln_only = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="random='per_channel' found no frozen conv/linear weight"):
        normfx.freeze(ln_only, keep=(), random="per_channel")
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="Sequential has no normalization layer with parameters"):
        normfx.freeze(mlp, keep=("norm",))
    frozen = torchvision.models.resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d)
    with pytest.raises(ValueError, match="FrozenBatchNorm2d layers have no affine parameters"):
        normfx.freeze(frozen, keep=("norm",))
    normfx.freeze(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), random=20)  # exactly all: fine


# --- lab ---------------------------------------------------------------------------------------

def test_disabled_features_counts_and_plots(tmp_path):
    m = _resnet18()
    with torch.no_grad():
        for bn in (m.bn1, m.layer1[0].bn1):
            bn.weight.fill_(1.0)
        m.bn1.weight[:16] = 0.005
        m.bn1.weight[16:20] = -0.009   # |γ| counts, not γ
        m.bn1.weight[20:24] = 0.01     # the threshold itself is not below it
        m.layer1[0].bn1.weight[:32] = 1e-6
    d = normfx.lab.disabled_features(m, plot=tmp_path / "gamma.png")
    rows = {r["name"]: r for r in d.as_rows()}
    assert rows["bn1"]["disabled"] == 20 and rows["bn1"]["depth"] == 0
    assert rows["layer1.0.bn1"]["disabled"] == 32 and rows["layer1.0.bn1"]["fraction"] == 0.5
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    expected = sum(int((b.weight.abs() < 0.01).sum()) for b in bns)
    assert d.disabled == expected and d.channels == sum(b.num_features for b in bns)
    assert d.fraction == expected / d.channels
    assert (tmp_path / "gamma.png").stat().st_size > 10_000
    assert normfx.lab.disabled_features(m, threshold=0.5).disabled > d.disabled
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        normfx.lab.disabled_features(nn.Linear(2, 2))


class _ReluNet(nn.Module):
    """Functional, method and module ReLUs, one module called twice; channel 0 of ``a`` is dead."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        a = torch.nn.functional.relu(self.bn(self.conv(x)))
        b = self.act(a - 10.0)                 # every channel dead
        c = self.act(a)                        # the same module again: a site of its own
        h = self.fc(c.mean((2, 3))).relu()
        return h + b.mean() + 0 * a.sum()


def test_inactive_units_counts_never_positive_channels():
    m = _ReluNet()
    with torch.no_grad():
        m.bn.bias.copy_(torch.tensor([-100.0, 0.0, 0.0, 5.0]))   # channel 0 never fires, channel 3 always
    batches = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    u = normfx.lab.inactive_units(m, batches)
    sites = {s.name: s for s in u.sites}
    assert len(sites) == 4 and u.samples == 24
    assert sites["relu"].inactive == 1 and sites["relu"].channels == 4
    assert sites["act"].inactive == 4                        # a − 10 ≤ 0 everywhere
    assert sites["act_1"].inactive == 1                      # the second call of the same module
    assert sites["relu_1"].channels == 6
    assert u.inactive == sum(s.inactive for s in u.sites) and u.channels == 18
    assert u.fraction == u.inactive / 18 and "never positive" in u.summary()
    # read only: the caller's model keeps its mode, modules and output
    m.train()
    x = batches[0]
    before = m.eval()(x)
    m.train()
    normfx.lab.inactive_units(m, batches)
    assert m.training and not any("probe" in n for n, _ in m.named_modules())
    assert torch.equal(m.eval()(x), before)
    with pytest.raises(ValueError, match="no traced ReLU"):
        normfx.lab.inactive_units(nn.Sequential(nn.Linear(2, 2)), [torch.randn(1, 2)])
    with pytest.raises(ValueError, match="at least one batch"):
        normfx.lab.inactive_units(m, [])
