"""Mixed precision (issue 11.3): every module normfx inserts behaves under ``torch.autocast`` like
the module it replaced — the same output dtype, gradients within the replaced model's own bf16 noise.

The tolerance is measured, not guessed: Eval mode under bf16 autocast against Eval mode in float32
sets the noise floor, and the normfx model under the same autocast must stay within a small multiple
of it.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import normfx
from normfx.nn.fixed_point import FixedPoint
from normfx.nn.repbn import ProgressiveRepBN
from tests.conftest import amp_grads as _grads
from tests.conftest import randomize_bn, rel_err

BF16 = torch.bfloat16
# CPU bf16 always; CUDA fp16 where a GPU is present (the mixed precision fine-tuning runs under).
AMP = [pytest.param(("cpu", torch.bfloat16), id="cpu-bf16"),
       pytest.param(("cuda", torch.float16), id="cuda-fp16",
                    marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
NOISE_FACTOR = 4.0  # normfx's bf16 error may be this many times Eval mode's own bf16 error
NOISE_FLOOR = 1e-3   # below this, bf16 rounding of single values dominates the comparison


def _within_eval_noise(candidate: nn.Module, reference: nn.Module, x: torch.Tensor,
                       renamed: dict[str, str] | None = None,
                       amp_mode: tuple[str, torch.dtype] = ("cpu", BF16)) -> None:
    """``renamed``: the candidate's name of a reference parameter, where it moved (PRepBN keeps the
    LayerNorm as its ``norm``)."""
    renamed = renamed or {}
    device = amp_mode[0]
    candidate, reference, x = candidate.to(device), reference.to(device), x.to(device)
    with torch.no_grad():
        proj = torch.randn_like(reference(x).float())
    y32, g32 = _grads(reference, x, proj, amp=False, amp_mode=amp_mode)
    y16, g16 = _grads(reference, x, proj, amp=True, amp_mode=amp_mode)
    yc, gc = _grads(candidate, x, proj, amp=True, amp_mode=amp_mode)
    assert yc.dtype == y16.dtype, f"output dtype {yc.dtype}, the replaced model gives {y16.dtype}"
    assert rel_err(yc, y32) <= max(NOISE_FACTOR * rel_err(y16, y32), NOISE_FLOOR)
    for name in g16:
        got = gc[renamed.get(name, name)]
        assert got.dtype == g16[name].dtype, name
        noise = rel_err(g16[name], g32[name])
        assert rel_err(got, g32[name]) <= max(NOISE_FACTOR * noise, NOISE_FLOOR), (name, noise)


CONVS = [
    (nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), (6, 4, 10)),
    (nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), (6, 4, 7, 7)),
    (nn.Conv3d(4, 8, 3, padding=1), nn.BatchNorm3d(8), (4, 4, 5, 5, 5)),
    (nn.ConvTranspose1d(4, 8, 3, stride=2), nn.BatchNorm1d(8), (6, 4, 6)),
    (nn.ConvTranspose2d(4, 8, 3, stride=2, groups=2), nn.BatchNorm2d(8), (6, 4, 5, 5)),
    (nn.ConvTranspose3d(4, 8, 3), nn.BatchNorm3d(8), (4, 4, 4, 4, 4)),
    (nn.Linear(16, 32), nn.BatchNorm1d(32), (12, 16)),
    (nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(8), (6, 4, 7, 7)),
]


@pytest.mark.parametrize("amp_mode", AMP)
@pytest.mark.parametrize("conv,bn,shape", CONVS, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_tune_convbn_under_autocast(conv, bn, shape, amp_mode):
    model = nn.Sequential(conv, bn)
    randomize_bn(model, torch.randn(shape))
    model.eval()
    tuned = normfx.convbn(model, mode="tune")
    assert normfx.last_report(tuned).changes
    _within_eval_noise(tuned, model, torch.randn(shape), amp_mode=amp_mode)


def test_tune_convbn_under_autocast_in_training_mode_is_train_mode():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
    tuned = normfx.convbn(model, mode="tune").train()
    x = torch.randn(10, 8)
    with torch.autocast("cpu", dtype=BF16):
        y, ref = tuned(x), copy.deepcopy(model).train()(x)
    assert y.dtype == ref.dtype
    y.float().sum().backward()


def test_tune_convbn_resnet_under_bf16_autocast():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    randomize_bn(model, torch.randn(4, 3, 64, 64))
    model.eval()
    _within_eval_noise(normfx.convbn(model, mode="tune"), model, x)


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.0])
def test_prepbn_under_bf16_autocast(lam):
    model = _Tokens()
    m = normfx.repbn(model, total_steps=10)
    prep = [p for p in m.modules() if isinstance(p, ProgressiveRepBN)]
    assert len(prep) == 1
    prep[0].lam.fill_(lam)
    x = torch.randn(6, 5, 16)
    m.train()
    with torch.autocast("cpu", dtype=BF16):
        y = m(x)
        ln_dtype = model.norm(model.fc1(x)).dtype
        norm_out = prep[0](model.fc1(x))
    assert norm_out.dtype == ln_dtype  # the replaced LayerNorm's dtype under the same autocast
    y.float().sum().backward()
    assert prep[0].repbn.bn.running_var.dtype == torch.float32
    if lam < 1.0:
        assert prep[0].repbn.eta.grad is not None and torch.isfinite(prep[0].repbn.eta.grad)
    # statistics are computed in float32 even from a bf16 input
    rep = prep[0].repbn.train()
    xb = (torch.randn(64, 16) * 3 + 100).to(BF16)
    rep.bn.reset_running_stats()
    rep.bn.momentum = None
    with torch.autocast("cpu", dtype=BF16):
        rep(xb)
    assert rel_err(rep.bn.running_mean, xb.float().mean(0)) < 1e-6


@pytest.mark.parametrize("amp_mode", AMP)
def test_prepbn_gradients_within_layernorm_autocast_noise(amp_mode):
    model = _Tokens()
    m = normfx.repbn(model, total_steps=10)  # λ = 1: the function is the LayerNorm's
    x = torch.randn(6, 5, 16)
    _within_eval_noise(m.eval(), model.eval(), x, {"norm.weight": "norm.norm.weight", "norm.bias": "norm.norm.bias"},
                       amp_mode=amp_mode)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_fixed_point_cast_exact_in_bf16(bits):
    """A cast of a bf16 tensor gives exactly the float32 cast of the same values while the word
    fits bf16's 8 significant bits (the documented bound)."""
    q = FixedPoint(bits, int_bits=2.0)
    x = (torch.randn(1000) * 3).to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        yb = q(x)
    assert yb.dtype == BF16
    assert torch.equal(yb.float(), q(x.float()))


def test_fixed_point_model_under_bf16_autocast():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=10)
    randomize_bn(model, torch.randn(4, 3, 32, 32))
    q = normfx.fixed_point(model, bits=8)
    normfx.calibrate(q, [torch.randn(4, 3, 32, 32)], progress=False)
    q.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=BF16):
        y = q(x)
        ref = model.train()(x)
    assert y.dtype == ref.dtype
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in q.parameters() if p.grad is not None)
