"""Issue 25.1: binary points move under the documented settings (``normfx.param_groups``), and
``normfx.binary_point_moves`` says how far."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normfx


def _miscalibrated() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 6-bit MLP calibrated on inputs 20× smaller than the data it then trains on: the input cast
    clips almost everything."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    x = 4 * torch.randn(256, 8)
    y = x.sum(1, keepdim=True)
    q = normfx.fixed_point(model, bits=6)
    normfx.calibrate(q, [x / 20], progress=False)
    return q, x, y


def _train(q: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> None:
    q.train()
    for i in range(steps):
        idx = slice(32 * (i % 8), 32 * (i % 8 + 1))
        loss = F.mse_loss(q(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _input_cast(moves: list[normfx.BinaryPointMove]) -> normfx.BinaryPointMove:
    return next(m for m in moves if m.name.startswith("fxq_input"))


def test_binary_points_move_with_their_own_learning_rate():
    q, x, y = _miscalibrated()
    slow = copy.deepcopy(q)
    _train(q, torch.optim.Adam(normfx.param_groups(q, binary_point_lr=0.05), lr=1e-3), x, y)
    _train(slow, torch.optim.Adam(slow.parameters(), lr=1e-3), x, y)   # the weights' learning rate for all
    fast_in, slow_in = _input_cast(normfx.binary_point_moves(q)), _input_cast(normfx.binary_point_moves(slow))
    assert fast_in.shift >= 2 and fast_in.now[0] > fast_in.start[0]   # less clipping: more integer bits
    assert slow_in.shift == 0
    assert sum(m.moved for m in normfx.binary_point_moves(q)) > sum(m.moved for m in normfx.binary_point_moves(slow))


def test_param_groups_split_binary_points_without_weight_decay():
    q, _, _ = _miscalibrated()
    groups = normfx.param_groups(q, binary_point_lr=0.1, lr=3e-4)
    points = [m.int_bits for m in q.modules() if isinstance(m, normfx.nn.FixedPoint)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in points}
    assert groups[1]["lr"] == 0.1 and groups[1]["weight_decay"] == 0.0 and groups[0]["lr"] == 3e-4
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(q.parameters()))
    opt = torch.optim.AdamW(groups, weight_decay=0.05)
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.05


def test_param_groups_refuse_models_without_trainable_points():
    with pytest.raises(ValueError, match="no trainable binary point: call normfx.fixed_point first"):
        normfx.param_groups(nn.Linear(2, 2), binary_point_lr=0.1)
    q, x, _ = _miscalibrated()
    with pytest.raises(ValueError, match="not after normfx.deploy"):
        normfx.param_groups(normfx.deploy(q.eval()), binary_point_lr=0.1)
    with pytest.raises(ValueError, match="binary_point_lr must be positive"):
        normfx.param_groups(q, binary_point_lr=0.0)


def test_moves_start_where_calibration_and_weight_ranges_put_them():
    q, _, _ = _miscalibrated()
    moves = normfx.binary_point_moves(q)
    assert moves and all(m.moved == 0 and m.shift == 0 for m in moves)
    weight = next(m for m in moves if m.name == "0.parametrizations.weight.0")
    top = float(q[0].parametrizations.weight.original.detach().abs().max())
    assert 2.0 ** (weight.start[0] - 2) <= top < 2.0 ** (weight.start[0] - 1)   # the smallest I that holds it
    state = q.state_dict()
    assert not any("start" in k for k in state)   # no new state-dict keys
