"""Contracts every one-liner keeps (issue 22 lists them; the registry will derive this list): the
caller's model is untouched, and the result shares no storage with it, tied weights staying tied.

Until the registry exists this list is kept by hand; it covers every public one-liner.
"""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import normfx
from tests.conftest import randomize_bn

timm = pytest.importorskip("timm")


class CNN(nn.Module):
    """Conv/BN/ReLU blocks, a BYOL-style predictor and two tied Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.predictor = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))
        self.tied, self.tied2 = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.tied2.weight = self.tied.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        z = self.fc(y.mean((2, 3)))
        return self.tied2(self.tied(self.predictor(z)))


def _cnn() -> nn.Module:
    return randomize_bn(CNN(), torch.randn(4, 3, 8, 8)).eval()


def _vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=4, depth=2).eval()


ONE_LINERS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], nn.Module]]] = {
    "convbn_tune": (_cnn, lambda m: normfx.convbn(m, mode="tune")),
    "convbn_deploy": (_cnn, lambda m: normfx.convbn(m, mode="deploy")),
    "deploy": (_cnn, normfx.deploy),
    "freeze": (_cnn, normfx.freeze),
    "freeze_random_control": (_cnn, lambda m: normfx.freeze(m, random="per_channel")),
    "fixed_point": (_cnn, normfx.fixed_point),
    "evonorm": (_cnn, normfx.evonorm),
    "directpred": (_cnn, normfx.directpred),
    "repbn": (_vit, lambda m: normfx.repbn(m, total_steps=10)),
    "linear_attention": (_vit, normfx.linear_attention),
}


def _storages(m: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()] if t.numel()}


def _master(m: nn.Module) -> torch.Tensor:
    """The weight's Parameter (a parametrized weight is recomputed on each access: its original)."""
    if parametrize.is_parametrized(m, "weight"):
        return m.parametrizations.weight.original
    return m.weight


@pytest.mark.parametrize("name", list(ONE_LINERS))
def test_caller_untouched_and_no_storage_shared(name: str) -> None:
    build, one_liner = ONE_LINERS[name]
    model = build()
    before = copy.deepcopy(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out = one_liner(model)
    assert normfx.last_report(out).modified, "the one-liner changed nothing: the contract is not exercised"
    # The caller's model: same modules, same tensors, same flags.
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    # The result: no storage of the caller's; training it writes into it alone.
    assert not (_storages(out) & _storages(model))
    if name not in ("repbn", "linear_attention"):
        mods = dict(out.named_modules())
        assert _master(mods["tied"]) is _master(mods["tied2"])
    with torch.no_grad():
        for p in out.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
