"""Shared test helpers: randomized BatchNorm statistics and relative error."""
from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfx.kinds import is_frozen_bn

# pytest-xdist runs one process per core: each gets its share of the cores, and so do the example
# scripts and ONNX Runtime sessions they start. Oversubscribed OpenMP threads spin against each
# other and made single tests 10-100x slower than alone.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)

# pytest's log capture attaches its handlers to every logger, torch's structured-trace logger
# (``torch.__trace``, meant for ``TORCH_TRACE``/tlparse) included: torch.compile then renders every
# graph it traces for them, which made a compiled ResNet-18 step 4x slower under pytest than alone.
logging.getLogger("torch.__trace").setLevel(logging.WARNING)

# Named tolerances (relative, ||a - b|| / ||b||), as the issues set them.
DEPLOY_RTOL = 1e-4
GRAD_RTOL = 1e-3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def randomize_bn(model: nn.Module, example: torch.Tensor | None = None, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and *non-fresh* statistics.

    Fresh statistics (mean 0, var 1) make folding almost the identity and a test worthless. γ and β
    are drawn first; with an example input, the running statistics are then estimated from a
    train-mode forward (each BN sees what the network really feeds it, so a deep random network
    stays well-conditioned in eval mode), and finally every channel's statistics are perturbed.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) or is_frozen_bn(m)]
    for m in bns:
        n = m.running_mean.numel()
        if m.weight is not None:
            m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=g))
            m.bias.copy_(0.2 * torch.randn(n, generator=g))
    if example is not None:
        was = model.training
        saved = {}
        for m in bns:
            if isinstance(m, _BatchNorm):
                saved[m] = m.momentum
                m.momentum = None
                m.reset_running_stats()
        model.train()
        model(example)
        model.train(was)
        for m, mom in saved.items():
            m.momentum = mom
    for m in bns:
        n = m.running_mean.numel()
        std = m.running_var.clamp_min(1e-6).sqrt()
        m.running_mean.add_(0.1 * std * torch.randn(n, generator=g))
        m.running_var.mul_(torch.empty(n).uniform_(0.8, 1.25, generator=g))
    return model


def amp_grads(model: nn.Module, x: torch.Tensor, proj: torch.Tensor, amp: bool,
              amp_mode: tuple[str, torch.dtype] = ("cpu", torch.bfloat16)) -> tuple[torch.Tensor, dict]:
    """``(output, gradients)`` of ``(model(x)·proj).sum()``, under autocast when ``amp``: the input's
    gradient as ``"x"``, every parameter's by name."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast(amp_mode[0], dtype=amp_mode[1], enabled=amp):
        y = model(x)
    (y.float() * proj).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y, {"x": x.grad.clone(), **grads}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def bn_calls(model: nn.Module) -> int:
    """BatchNorm computations left in ``model``'s forward: calls of BatchNorm modules (not Tune
    blocks' BNs, which pass their conv's folded output through) and functional ``batch_norm``, over
    the graphs of every traced region (read without changing the model)."""
    import torch.nn.functional as F

    from normfx.nn import TuneBN
    from normfx.analysis import analyze

    n = 0
    for _, gm in analyze(model).regions:
        for node in gm.graph.nodes:
            if node.op == "call_module":
                m = gm.get_submodule(node.target)
                n += isinstance(m, _BatchNorm) and not isinstance(m, TuneBN)
            n += node.op == "call_function" and node.target is F.batch_norm
    return n


def tune_blocks(model: nn.Module) -> int:
    """Tune blocks in ``model``: BatchNorms whose conv folds them (and functional Tune nodes)."""
    from normfx.nn import TuneBN, tune_convbn_functional
    from normfx.analysis import analyze

    n = sum(isinstance(m, TuneBN) for m in model.modules())
    for _, gm in analyze(model).regions:
        n += sum(node.target is tune_convbn_functional for node in gm.graph.nodes)
    return n
