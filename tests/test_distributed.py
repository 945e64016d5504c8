"""``normfx.sync_bn`` and ``DistributedDataParallel`` on CPU (gloo, two processes): training steps of
a synchronized model under DDP equal one process's steps on the global batch — losses, parameters,
running statistics, PRepBN's λ, the random control's entries — for a plain CNN, Tune mode, BN-only
training with the random control and a PRepBN ViT with its scheduler. And what ``sync_bn`` keeps
that ``nn.SyncBatchNorm.convert_sync_batchnorm`` drops (a BatchNorm subclass's activation, a Tune
block)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import normfx
from normfx.nn.repbn import ProgressiveRepBN
from normfx.nn.sync_bn import SyncBN, synced_moments

STEPS, GLOBAL_BATCH = 2, 8


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _vit() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(8, 4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                                                num_classes=4)


def _prepared(variant: str) -> nn.Module:
    if variant == "prepbn":       # mid-schedule: λ moves every step, both branches count
        net = normfx.repbn(_vit().train(), total_steps=4)
        normfx.RepBNScheduler(net, warmup_steps=0).step()
        return normfx.sync_bn(net)
    net = _net().train()
    if variant == "tune":
        net = normfx.convbn(net, mode="tune")
    if variant == "bn_only":      # the paper's control: random entries train in every frozen conv
        net = normfx.freeze(net, random="per_channel")
    return normfx.sync_bn(net)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 3, 8, 8, generator=g)
    return x, torch.randint(0, 4, (STEPS, GLOBAL_BATCH), generator=g)


def _train(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> list[float]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    sched = normfx.RepBNScheduler(inner) if any(isinstance(m, ProgressiveRepBN) for m in inner.modules()) else None
    if sched is not None:
        sched.last_step = 1
    losses = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss))
    return losses


def _worker(rank: int, world: int, port: int, variant: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_prepared(variant))
        xs, ys = _data()
        per = GLOBAL_BATCH // world
        losses = _train(model, xs[:, rank * per:(rank + 1) * per], ys[:, rank * per:(rank + 1) * per])
        mean_loss = torch.tensor(losses)
        dist.all_reduce(mean_loss)
        torch.save({"losses": (mean_loss / world).tolist(), "state": model.module.state_dict()}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "tune", "bn_only", "prepbn"])
def test_ddp_step_equals_one_process_on_the_global_batch(variant, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), variant, str(tmp_path)), nprocs=2, join=True)
    single = _prepared(variant)
    xs, ys = _data()
    losses = _train(single, xs, ys)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["losses"] == pytest.approx(losses, rel=1e-5)
    reference = single.state_dict()
    for r in ranks:
        assert list(r["state"]) == list(reference)
        for key, value in reference.items():
            assert torch.allclose(r["state"][key].double(), value.double(), rtol=1e-4, atol=1e-6), key


def test_sync_bn_keeps_what_subclasses_add():
    timm = pytest.importorskip("timm")
    norm_act = timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU)
    synced = normfx.sync_bn(nn.Sequential(nn.Conv2d(3, 4, 3), norm_act))
    assert isinstance(synced[1], timm.layers.BatchNormAct2d) and isinstance(synced[1].act, nn.ReLU)
    assert isinstance(synced[1], SyncBN)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), norm_act))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():   # torch's conversion keeps the act as a child but never runs it
        assert (converted.eval()(x) < 0).any() and (synced.eval()(x) >= 0).all()
    tuned = normfx.sync_bn(normfx.convbn(_net(), mode="tune"))
    assert type(tuned[1]).__name__ == "SyncTuneBatchNorm2d"
    with torch.no_grad():       # one process: exactly the module it was
        assert torch.equal(tuned.eval()(x), normfx.convbn(_net(), mode="tune").eval()(x))
    again = normfx.last_report(normfx.sync_bn(tuned))
    assert not again.changes and {s.reason for s in again.skips} == {normfx.SkipReason.ALREADY_DONE}


def test_synced_moments_without_a_process_group_are_the_local_ones():
    x = torch.randn(6, 3, 5, 5, requires_grad=True)
    mean, var, n = synced_moments(x)
    assert torch.allclose(mean, x.mean((0, 2, 3))) and torch.allclose(var, x.var((0, 2, 3), unbiased=False))
    assert float(n) == 150
