"""The model a user gets back is still theirs (issue 12): same class, module tree, state_dict keys
(where the transform keeps them), submodules callable with the same outputs, forward hooks firing."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import normfx
from normfx.analysis import rewritten
from tests.conftest import DEPLOY_RTOL, randomize_bn, rel_err

tv = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(tv.models.resnet18(num_classes=10), torch.randn(4, 3, 32, 32)).eval()


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return tv.models.VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                       num_classes=5).eval()


ONE_LINERS = {
    "convbn_tune": (_resnet, lambda m: normfx.convbn(m, mode="tune"), True, True),
    "convbn_deploy": (_resnet, lambda m: normfx.convbn(m, mode="deploy"), True, False),
    "deploy": (_resnet, normfx.deploy, True, False),
    "freeze": (_resnet, lambda m: normfx.freeze(m, keep=("norm",)), True, True),
    "fixed_point_weights": (_resnet, lambda m: normfx.fixed_point(m, bits=8, targets=("weight", "bias", "norm")),
                            False, False),
    "repbn": (_vit, lambda m: normfx.repbn(m, total_steps=10), True, False),
}
X = torch.randn(2, 3, 32, 32)


class Functional(nn.Module):
    """A functional batch_norm after a conv: folding it needs this forward rewritten."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        return nn.functional.batch_norm(self.conv(x), self.mean, self.var, training=False)


@pytest.mark.parametrize("name", list(ONE_LINERS))
def test_one_liner_keeps_the_callers_tree(name):
    build, transform, exact, same_keys = ONE_LINERS[name]
    model = build()
    out = transform(model).eval()
    assert type(out) is type(model)
    assert not any(isinstance(m, fx.GraphModule) for m in out.modules())   # leaf changes only
    if same_keys:
        assert list(out.state_dict()) == list(model.state_dict())
    elif name.startswith("fixed_point"):
        assert set(model.state_dict()) <= set(out.state_dict())   # the casts' own state is added
    # every submodule that was callable still is, with the same outputs where the transform is exact
    inputs: dict[str, torch.Tensor] = {}
    def keep(n: str):
        def hook(mod, args):
            inputs.setdefault(n, args[0])   # returns None: the call's arguments stay as they are
        return hook

    handles = [m.register_forward_pre_hook(keep(n))
               for n, m in model.named_modules() if n and not isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    with torch.no_grad():
        ref = model(X)
    for h in handles:
        h.remove()
    outs = dict(out.named_modules())
    with torch.no_grad():
        got = out(X)
        if exact:
            assert rel_err(got, ref) < DEPLOY_RTOL
        for n, x in inputs.items():
            if n in outs and isinstance(x, torch.Tensor) and not isinstance(outs[n], nn.MultiheadAttention):
                y, y_ref = outs[n](x), dict(model.named_modules())[n](x)
                # A fold moves the BN into its conv: the pair computes what it did, each of the two
                # alone does not. Every module that holds whole pairs (blocks, stages) is compared.
                whole = any(True for _ in outs[n].children())
                if exact and whole and isinstance(y, torch.Tensor):
                    assert rel_err(y, y_ref) < 1e-4, n


def test_indexing_hooks_and_blocks_on_resnet():
    model = _resnet()
    for out in (normfx.convbn(model, mode="tune"), normfx.convbn(model, mode="deploy")):
        fired = []
        out.layer2.register_forward_hook(lambda mod, args, res: fired.append(res.shape))  # noqa: B023
        out.layer1[0].conv1.register_forward_hook(lambda mod, args, res: fired.append("conv"))  # noqa: B023
        with torch.no_grad():
            out(X)
            assert fired == ["conv", torch.Size([2, 128, 4, 4])]
            h = out.maxpool(out.relu(out.bn1(out.conv1(X))))
            assert rel_err(out.layer1[0](h), model.layer1[0](h)) < DEPLOY_RTOL
        assert isinstance(out.layer1, nn.Sequential) and isinstance(out.layer1[0], tv.models.resnet.BasicBlock)


def test_per_block_learning_rates_survive_tune_mode():
    """Fine-tuning code builds parameter groups per block: the names and objects are the model's."""
    out = normfx.convbn(_resnet(), mode="tune").train()
    groups = [{"params": out.layer4.parameters(), "lr": 1e-2}, {"params": out.fc.parameters(), "lr": 1e-1}]
    opt = torch.optim.SGD(groups, lr=1e-3)
    out(X).sum().backward()
    opt.step()
    assert isinstance(out.layer4[0].conv1, nn.Conv2d) and isinstance(out.layer4[0].bn1, nn.BatchNorm2d)
    assert type(out.layer4[0].conv1).__name__ == "TuneConv2d"


@pytest.mark.slow
def test_segmentation_and_detection_backbones_still_run():
    torch.manual_seed(0)
    seg = tv.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3)
    seg = randomize_bn(seg, torch.randn(2, 3, 64, 64)).eval()
    x = torch.randn(1, 3, 64, 64)
    d = normfx.convbn(seg, mode="deploy")
    assert type(d) is type(seg) and type(d.backbone) is type(seg.backbone)
    with torch.no_grad():
        assert rel_err(d.backbone(x)["out"], seg.backbone(x)["out"]) < 1e-4
        assert rel_err(d(x)["out"], seg(x)["out"]) < 1e-4
    det = tv.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None,
                                                                num_classes=3).eval()
    t = normfx.convbn(det, mode="tune")
    with torch.no_grad():
        feats, ref = t.backbone(x), det.backbone(x)
    assert list(feats) == list(ref) and all(rel_err(feats[k], ref[k]) < 1e-4 for k in ref)
    assert type(t) is type(det)


def test_timm_model_keeps_its_class_and_feature_api():
    torch.manual_seed(0)
    m = randomize_bn(timm.create_model("resnet18", num_classes=5), torch.randn(4, 3, 32, 32)).eval()
    t = normfx.convbn(m, mode="tune")
    assert type(t) is type(m)
    with torch.no_grad():
        assert rel_err(t.forward_features(X), m.forward_features(X)) < DEPLOY_RTOL
        assert rel_err(t.forward_head(t.forward_features(X)), m(X)) < DEPLOY_RTOL


def test_graph_rewrite_lands_in_the_module_that_holds_it():
    """A functional batch_norm needs its forward rewritten: that module gets the graph's code as its
    forward, keeping its object and class (a subclass); the rest of the tree stays the caller's."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Functional()
            self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            y = self.body(x)
            if y.sum() > 0:       # untraceable root: body and head are regions of their own
                y = y * 2
            return self.head(y)

    m = randomize_bn(Branchy(), torch.randn(2, 3, 8, 8)).eval()
    d = normfx.convbn(m, mode="deploy")
    assert type(d) is Branchy and type(d.head) is nn.Sequential
    assert rewritten(d.body) and isinstance(d.body, Functional) and type(d.body).__name__ == "Functional"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(d(x), m(x)) < DEPLOY_RTOL


def test_activation_casts_land_in_the_smallest_modules():
    """Fixed-point activation casts change forwards: each module whose own forward holds a cast site
    gets a rewritten forward, keeping its class, and nothing larger; containers and leaves stay the
    caller's."""
    model = _resnet()
    q = normfx.fixed_point(model, bits=8)
    graphs = {n for n, m in q.named_modules() if rewritten(m)}
    blocks = {f"layer{i}.{j}" for i in range(1, 5) for j in range(2)}
    downsamples = {f"layer{i}.0.downsample" for i in range(2, 5)}
    assert graphs == {""} | blocks | downsamples       # the root's own forward casts conv1/bn1/... outputs
    assert not any(isinstance(m, fx.GraphModule) for m in q.modules())
    assert isinstance(q, tv.models.ResNet) and isinstance(q.layer1[0], tv.models.resnet.BasicBlock)
    assert type(q.layer2) is nn.Sequential
    fired = []
    q.layer2.register_forward_hook(lambda mod, args, res: fired.append(res.shape))
    normfx.calibrate(q, [torch.randn(4, 3, 32, 32)], progress=False)
    fired.clear()
    with torch.no_grad():
        q(X)
    assert fired == [torch.Size([2, 128, 4, 4])]


def test_fixed_point_keeps_the_callers_class_and_its_methods():
    """Issue 21.5: a timm ResNet keeps the methods training scripts call, and a Sequential root stays
    indexable, though their own forwards hold cast sites."""
    import copy

    model = randomize_bn(timm.create_model("resnet18", num_classes=10)).eval()
    q = normfx.fixed_point(model)
    normfx.calibrate(q, [torch.randn(4, 3, 32, 32)], progress=False)
    q.eval()
    assert isinstance(q, timm.models.ResNet) and type(q).__name__ == "ResNet" and rewritten(q)
    assert q.num_classes == 10 and q.pretrained_cfg == model.pretrained_cfg
    assert isinstance(q.get_classifier(), nn.Linear)
    assert q.forward_features(X).shape == model.forward_features(X).shape
    assert q.state_dict().keys() == copy.deepcopy(q).state_dict().keys()
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(q)(X), q(X))
    q.reset_classifier(5)
    assert q(X).shape == (2, 5)
    seq = normfx.fixed_point(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    assert type(seq).__name__ == "Sequential" and isinstance(seq, nn.Sequential) and isinstance(seq[1], nn.ReLU)


def test_rewritten_forward_pickles_without_parametrizations():
    import pickle

    m = Functional().eval()
    d = normfx.convbn(m, mode="deploy")
    again = pickle.loads(pickle.dumps(d))
    assert rewritten(again) and isinstance(again, Functional)
    with torch.no_grad():
        assert rel_err(again(X), m(X)) < DEPLOY_RTOL


def test_tune_blocks_survive_pickling_and_deep_copies():
    import copy
    import pickle

    model = _resnet()
    t = normfx.convbn(model, mode="tune")
    for twin in (pickle.loads(pickle.dumps(t)), copy.deepcopy(t)):
        assert type(twin.layer1[0].conv1) is type(t.layer1[0].conv1)
        assert twin.layer1[0].conv1.__dict__["_normfx_bn"] is twin.layer1[0].bn1   # the twin's own BN
        with torch.no_grad():
            assert rel_err(twin(X), model(X)) < DEPLOY_RTOL


def test_rewritten_forward_calls_submodules_without_getattr(monkeypatch):
    """A rewritten forward finds its submodules through their owners' ``_modules`` dicts, at the
    call as before: a submodule swapped afterwards is the one called, and no call pays for
    ``nn.Module.__getattr__`` (four failed lookups per ``stages[2][5].conv`` path). An owner that
    customizes attribute lookup or shadows a child's name keeps ``getattr``."""

    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.ReLU())

        def __getattr__(self, name):   # a custom lookup: the generated code must go through it
            return super().__getattr__(name)

    class Net(Functional):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()))
            self.lookup = Lookup()

        def forward(self, x):
            y = self.blocks(super().forward(x))
            return self.lookup.inner(y)

    m = randomize_bn(Net(), torch.randn(2, 3, 8, 8)).eval()
    d = normfx.convbn(m, mode="deploy")
    assert rewritten(d)
    src = type(d)._normfx_src
    assert "self._modules['blocks']._modules['0']._modules['0'](" in src
    assert """self._modules['lookup'].inner, "0")(""" in src   # Lookup defines __getattr__
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = m(x)
        assert rel_err(d(x), ref) < DEPLOY_RTOL
    calls = []
    original = nn.Module.__getattr__
    monkeypatch.setattr(nn.Module, "__getattr__", lambda self, name: calls.append(name) or original(self, name))
    with torch.no_grad():
        d(x)
    # (the convs' own forwards read their weight and bias) from Lookup on, through its __getattr__
    assert [c for c in calls if c not in ("weight", "bias")] == ["inner", "0"]
    monkeypatch.undo()
    d.blocks[0][1] = nn.Identity()            # swapped after deploy: the generated code calls it
    with torch.no_grad():
        assert not torch.equal(d(x), ref)
