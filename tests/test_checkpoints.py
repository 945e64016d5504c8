"""Checkpoints of every registered transform's model, parametrized from the registry: a state_dict
saved with ``torch.save`` loads with ``torch.load(weights_only=True)`` strictly into the same
transform of a freshly built model and gives the same outputs; resuming mid-training (model,
optimizer and PRepBN scheduler state) gives the same next step as not stopping — λ, DirectPred's F,
fixed-point binary points, the random control's entries included. A checkpoint of the model before
``normfx.repbn`` loads strictly into the transformed one (its LayerNorm keys map into the PRepBN).
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn

import normfx
from normfx.nn.directpred import step_all
from normfx.nn.repbn import ProgressiveRepBN
from tests.test_contract import _cnn, _vit

MODELS = {"cnn": (_cnn, (4, 3, 8, 8)), "vit": (_vit, (2, 3, 32, 32))}
CASES = [pytest.param(t, m, id=f"{t.name}-{m}") for t in normfx.TRANSFORMS for m in MODELS]


def _build(t, model_name: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    build, shape = MODELS[model_name]
    torch.manual_seed(seed)
    try:
        m = normfx.apply(build(), t.example_config())
    except ValueError as e:
        pytest.skip(f"{t.name} does not apply to the {model_name} model: {e}")
    torch.manual_seed(100)
    x = torch.randn(*shape)
    if any(isinstance(q, normfx.nn.FixedPoint) for q in m.modules()):
        normfx.calibrate(m, [x], progress=False)
    return m, x


def _reloaded(obj, tmp_path, name: str):
    path = tmp_path / name
    torch.save(obj, path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("t, model_name", CASES)
def test_state_dict_round_trip(t, model_name, tmp_path):
    m, x = _build(t, model_name, seed=0)
    fresh, _ = _build(t, model_name, seed=1)        # other random weights: the checkpoint must set them
    result = fresh.load_state_dict(_reloaded(m.state_dict(), tmp_path, "m.pt"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), m.eval()(x))


class _Trainer:
    """One model's training loop: SGD with momentum, PRepBN's scheduler, DirectPred's step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.train()
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        has_prepbn = any(isinstance(m, ProgressiveRepBN) for m in model.modules())
        self.sched = normfx.RepBNScheduler(model) if has_prepbn else None

    def step(self, x: torch.Tensor) -> None:
        self.opt.zero_grad()
        self.model(x).float().pow(2).mean().backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        step_all(self.model)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict() if self.sched else {}}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.opt.load_state_dict(state["opt"])
        if self.sched is not None:
            self.sched.load_state_dict(state["sched"])


@pytest.mark.parametrize("t, model_name", CASES)
def test_resuming_gives_the_next_step_of_not_stopping(t, model_name, tmp_path):
    m, x = _build(t, model_name, seed=0)
    if t.name == "deploy":
        pytest.skip("a deployed model is not trained further by normfx")
    going = _Trainer(copy.deepcopy(m))
    going.step(x)
    checkpoint = _reloaded(going.state(), tmp_path, "ckpt.pt")
    resumed = _Trainer(_build(t, model_name, seed=1)[0])
    resumed.load(checkpoint)
    going.step(x)
    resumed.step(x)
    a, b = going.model.state_dict(), resumed.model.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_checkpoint_of_the_layernorm_model_loads_into_prepbn():
    def deit() -> nn.Module:
        return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=4, depth=2).eval()

    torch.manual_seed(0)
    original = deit()
    prepbn = normfx.repbn(deit(), total_steps=10).eval()      # other random weights
    assert prepbn.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(prepbn(x), original(x))           # λ = 1: the LayerNorms, now the loaded ones
    own = normfx.repbn(deit(), total_steps=10)
    own.load_state_dict(prepbn.state_dict(), strict=True)     # its own keys load as they are
    with torch.no_grad():
        assert torch.equal(own.eval()(x), prepbn(x))


def _resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _folded_keys(model: nn.Module) -> list[str]:
    """``model``'s keys after folding each BatchNorm into the conv before it (ResNet naming): the
    BatchNorm's keys gone, the conv's ``bias`` after its ``weight``."""
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    convs = {n.replace("bn", "conv").removesuffix(".1") + (".0" if n.endswith("downsample.1") else "") for n in bns}
    keys = []
    for k in model.state_dict():
        if any(k.startswith(b + ".") for b in bns):
            continue
        keys.append(k)
        if k.endswith(".weight") and k.removesuffix(".weight") in convs:
            keys.append(k.removesuffix(".weight") + ".bias")
    return keys


def test_deployed_state_dict_holds_what_docs_export_md_says():
    """The table in docs/export.md, construct by construct."""
    plain = _resnet18()
    folded = _folded_keys(plain)
    assert len(plain.state_dict()) == 122 and len(folded) == 42
    for before in (plain, normfx.convbn(plain, mode="tune").eval(), normfx.sync_bn(plain).eval(),
                   normfx.freeze(plain, random="per_channel").eval()):
        assert list(normfx.deploy(before).state_dict()) == folded

    q = normfx.fixed_point(plain).eval()
    deployed = normfx.deploy(q)
    bns = [n for n, m in q.named_modules() if isinstance(m, normfx.nn.FixedPointBatchNorm)]
    added = {f"{n}.{b}" for n in bns for b in ("deployed_scale", "deployed_shift")}
    assert set(deployed.state_dict()) == set(q.state_dict()) | added and len(added) == 40
    assert not any(n.endswith("int_bits") for n, _ in deployed.named_parameters())

    vit = normfx.repbn(_vit(), total_steps=1)
    for m in vit.modules():
        if isinstance(m, ProgressiveRepBN):
            m.lam.fill_(0.0)
    prepbn = [n for n, m in vit.named_modules() if isinstance(m, ProgressiveRepBN)]
    kept = [k for k in vit.state_dict() if not any(k.startswith(p + ".") for p in prepbn)]
    assert list(normfx.deploy(vit.eval()).state_dict()) == kept

    class SimSiam(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.predictor = nn.Linear(8, 8), nn.Linear(8, 8, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.predictor(self.encoder(x))

    dp = normfx.directpred(SimSiam(), predictor="predictor")
    assert {"predictor.corr", "predictor.steps"} <= set(dp.state_dict())
    assert list(normfx.deploy(dp.eval()).state_dict()) == ["encoder.weight", "encoder.bias", "predictor.weight"]
