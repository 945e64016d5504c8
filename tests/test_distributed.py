"""``normfx.sync_bn`` and ``DistributedDataParallel`` on CPU (gloo, two processes): training steps of
a synchronized model under DDP equal one process's steps on the global batch — losses, parameters,
running statistics, PRepBN's λ, the random control's entries — for a plain CNN, Tune mode, BN-only
training with the random control and a PRepBN ViT with its scheduler. And what ``sync_bn`` keeps
that ``nn.SyncBatchNorm.convert_sync_batchnorm`` drops (a BatchNorm subclass's activation, a Tune
block)."""
from __future__ import annotations

import contextlib
import copy
import os
import pickle
import socket
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import normfx
from normfx.nn.repbn import ProgressiveRepBN
from normfx.nn.sync_bn import SyncBN, is_synced, sync, synced_moments

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
    if variant == "fixed_point":  # fixed-point BatchNorms; binary points set by calibrate (in _worker)
        net = normfx.fixed_point(net, bits=8)
    if variant == "evonorm":      # EvoNorm-B0's batch variance
        net = normfx.evonorm(net, variant="B0")
    return normfx.sync_bn(net)


def _calibration() -> torch.Tensor:
    """Two ranks' halves whose ranges differ by a power of two: per-rank calibration would differ."""
    x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x[GLOBAL_BATCH // 2:] *= 4
    return x


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


def _graph_breaks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Graph breaks of one compiled training step of ``model`` (compiled here)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    F.cross_entropy(torch.compile(model)(x), y).backward()
    return sum(counters["graph_break"].values())


@contextlib.contextmanager
def _gloo(rank: int, world: int, port: int) -> Iterator[None]:
    """This process as ``rank`` of a gloo group on localhost, for the duration of the block."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
        # Neither rank tears its connections down while the other may still use them: a rank that
        # exited first once aborted the other inside gloo ("terminate called without an active
        # exception", SIGABRT) on a loaded 2-core machine.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _calibrated(model: nn.Module, batch: torch.Tensor) -> None:
    """Binary points and BatchNorm statistics from ``batch`` (this rank's share under a process group)."""
    normfx.calibrate(model, [batch], progress=False)
    normfx.recalibrate_bn(model, [batch], progress=False)


def _worker(rank: int, world: int, port: int, variant: str, out: str, wrap: str = "ddp") -> None:
    """Train ``variant`` on this rank's half of each global batch, wrapped by ``wrap``: ``ddp``,
    ``ddp_compiled`` (``torch.compile`` over DDP) or ``fsdp`` (``fully_shard``)."""
    with _gloo(rank, world, port):
        xs, ys = _data()
        per = GLOBAL_BATCH // world
        mine = slice(rank * per, (rank + 1) * per)
        breaks: tuple[int, int] | None = None
        if wrap == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            from torch.distributed.fsdp import fully_shard

            model = _prepared(variant)
            if variant == "fixed_point":   # before sharding: calibrate sets whole binary points
                _calibrated(model, _calibration()[mine])
            fully_shard(model)
            losses = _train(model, xs[:, mine], ys[:, mine])
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        else:
            model = ddp = nn.parallel.DistributedDataParallel(_prepared(variant))
            if wrap == "ddp_compiled":   # DDP's own graph breaks (its logger, its hooks) beside normfx's model's
                x0, y0 = xs[0, :per], ys[0, :per]
                breaks = (_graph_breaks(nn.parallel.DistributedDataParallel(_net().train()), x0, y0),
                          _graph_breaks(nn.parallel.DistributedDataParallel(_prepared(variant)), x0, y0))
                torch._dynamo.reset()
                model = torch.compile(ddp)
            if variant == "fixed_point":  # after wrapping: DDP's broadcast at construction cannot hide a difference
                _calibrated(model, _calibration()[mine])
            losses = _train(model, xs[:, mine], ys[:, mine])
            state = ddp.module.state_dict()
        mean_loss = torch.tensor(losses)
        dist.all_reduce(mean_loss)
        torch.save({"losses": (mean_loss / world).tolist(), "state": state, "breaks": breaks}, f"{out}/{rank}.pt")


def _recalibrate_worker(rank: int, world: int, port: int, out: str) -> None:
    with _gloo(rank, world, port):     # a model without sync_bn: recalibrate_bn synchronizes for the call only
        model = nn.parallel.DistributedDataParallel(_net())
        per = GLOBAL_BATCH // world
        normfx.recalibrate_bn(model, [_calibration()[rank * per:(rank + 1) * per]] * 2, progress=False)
        assert not any(isinstance(m, SyncBN) for m in model.modules())
        torch.save(model.module.state_dict(), f"{out}/{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VARIANTS = ["plain", "tune", "bn_only", "prepbn", "fixed_point", "evonorm"]


def _one_process(variant: str) -> tuple[list[float], dict]:
    single = _prepared(variant)
    if variant == "fixed_point":
        _calibrated(single, _calibration())
    losses = _train(single, *_data())
    return losses, single.state_dict()


def _check_ranks(tmp_path, losses: list[float], reference: dict) -> list[dict]:
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:
        assert r["losses"] == pytest.approx(losses, rel=1e-5)
        assert list(r["state"]) == list(reference)
        for key, value in reference.items():
            assert torch.allclose(r["state"][key].double(), value.double(), rtol=1e-4, atol=1e-6), key
    _frozen_entries_untouched(ranks)
    return ranks


def _frozen_entries_untouched(ranks: list[dict]) -> None:
    """The random control: every weight entry outside its trainable index is, on every rank, bit for
    bit the entry at initialization."""
    suffix = ".parametrizations.weight.0.index"
    if not any(k.endswith(suffix) for k in ranks[0]["state"]):
        return
    init = _prepared("bn_only").state_dict()
    indices = {k.removesuffix(suffix): v for k, v in init.items() if k.endswith(suffix)}
    for layer, index in indices.items():
        frozen = torch.ones(init[layer + ".weight"].numel(), dtype=torch.bool)
        frozen[index] = False
        for r in ranks:
            assert torch.equal(r["state"][layer + ".weight"].reshape(-1)[frozen],
                               init[layer + ".weight"].reshape(-1)[frozen]), layer


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_ddp_step_equals_one_process_on_the_global_batch(variant, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), variant, str(tmp_path)), nprocs=2, join=True)
    _check_ranks(tmp_path, *_one_process(variant))


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_fsdp_step_equals_one_process_on_the_global_batch(variant, tmp_path):
    """``fully_shard`` over the whole model (parameters sharded across the two ranks): the same steps,
    and a full state dict (``torch.distributed.checkpoint``) with the model's own keys."""
    mp.spawn(_worker, args=(2, _free_port(), variant, str(tmp_path), "fsdp"), nprocs=2, join=True)
    _check_ranks(tmp_path, *_one_process(variant))


@pytest.mark.slow
def test_compiled_ddp_with_parametrizations_equals_one_eager_process(tmp_path):
    """The random control (``torch.nn.utils.parametrize``) under DDP and ``torch.compile`` together
    (pytorch#113415): the same steps as one eager process on the global batch, and no graph break
    beyond those DDP itself makes on a plain model (the synchronized statistics trace through)."""
    mp.spawn(_worker, args=(2, _free_port(), "bn_only", str(tmp_path), "ddp_compiled"), nprocs=2, join=True)
    for result in _check_ranks(tmp_path, *_one_process("bn_only")):
        plain_breaks, normfx_breaks = result["breaks"]
        assert normfx_breaks == plain_breaks


@pytest.mark.slow
def test_recalibrate_bn_under_ddp_gives_every_rank_the_global_statistics(tmp_path):
    mp.spawn(_recalibrate_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = normfx.recalibrate_bn(_net(), [_calibration()] * 2, progress=False).state_dict()
    for r in range(2):
        state = torch.load(tmp_path / f"{r}.pt", weights_only=True)
        for key in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var", "4.num_batches_tracked"):
            assert torch.allclose(state[key].double(), single[key].double(), rtol=1e-5, atol=1e-7), key


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


def test_sync_bn_synchronizes_normfx_layers_that_compute_their_own_statistics():
    """FixedPointBatchNorm and EvoNorm-B0 keep their class and synchronize in their own forward; one
    process computes exactly what it did; deploy takes the synchronization off."""
    x = torch.randn(4, 3, 8, 8)
    for make, kind in ((lambda: normfx.fixed_point(_net(), bits=8), "FixedPointBatchNorm"),
                       (lambda: normfx.evonorm(_net(), variant="B0"), "EvoNorm2dB0")):
        plain, synced = make().train(), normfx.sync_bn(make().train())
        report = normfx.last_report(synced)
        assert [c.site for c in report.changes] == ["1", "4"] and not report.skips
        assert type(synced[1]).__name__ == kind and is_synced(synced[1])
        assert torch.equal(synced(x), plain(x))
        for key, value in plain.state_dict().items():
            assert torch.equal(synced.state_dict()[key], value), key
        deployed = normfx.deploy(synced)
        assert not any(is_synced(m) for m in deployed.modules())
        assert "unsync_bn" in {p.name for p in normfx.last_report(deployed).passes}


def test_a_synchronized_module_copies_with_its_group_and_a_pickle_says_it_lost_it(monkeypatch):
    group = object()   # stands for a torch.distributed process group: neither picklable nor copied
    for module in (nn.BatchNorm2d(4), normfx.nn.EvoNorm2dB0(4)):
        sync(module, group)
        assert copy.deepcopy(module).__dict__["_normfx_group"].group is group
        loaded = pickle.loads(pickle.dumps(module))
        assert is_synced(loaded)
        loaded.eval()(torch.randn(2, 4, 3, 3))          # inference never needs the group
        monkeypatch.setattr("normfx.nn.sync_bn._distributed", lambda: True)
        with pytest.raises(RuntimeError, match=r"normfx.sync_bn\(model, process_group=\.\.\., inplace=True\)"):
            loaded.train()(torch.randn(2, 4, 3, 3))
        monkeypatch.undo()
