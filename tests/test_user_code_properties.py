"""Issue 21: a property test for user code. Hypothesis builds small conv nets and decorates them as
user code does — forward hooks returning tensors, pre-hooks, hooks added after the transform, a
forward that writes module state, a parametrization, a shared module, pruning — and checks, for
every exact one-liner, that the result computes what the original computes (outputs; Tune mode's
gradients), that every hook fires on its module and sees the values it saw, that state writes still
happen, and that the report accounts for every site.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normfx
from tests.conftest import DEPLOY_RTOL, GRAD_RTOL, randomize_bn, rel_err


class Block(nn.Module):
    def __init__(self, channels: int, residual: bool, counts: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.residual, self.counts = residual, counts
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.counts:
            self.calls += 1          # a forward with a side effect on module state
        y = torch.relu(self.bn(self.conv(x)))
        return x + y if self.residual else y


class Net(nn.Module):
    def __init__(self, blocks: list[tuple[bool, bool]], share: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.blocks = nn.Sequential(*(Block(4, r, c) for r, c in blocks))
        self.share = share
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(self.stem(x))
        if self.share:
            y = y + self.blocks[0].conv(y)   # a conv called at a second place
        return self.head(y)


HOOKS: dict[str, Callable[[nn.Module, list], object]] = {
    "forward returning a tensor": lambda m, seen: m.register_forward_hook(
        lambda mod, i, o: seen.append(o.detach().clone()) or o * 1.5),
    "observing forward": lambda m, seen: m.register_forward_hook(lambda mod, i, o: seen.append(o.detach().clone())),
    "pre-forward": lambda m, seen: m.register_forward_pre_hook(lambda mod, i: seen.append(i[0].detach().clone())),
}


class Scale(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 0.5


@st.composite
def decorated(draw):
    n = draw(st.integers(1, 3))
    blocks = [(draw(st.booleans()), draw(st.booleans())) for _ in range(n)]
    net = Net(blocks, share=draw(st.booleans()))
    torch.manual_seed(draw(st.integers(0, 1000)))
    randomize_bn(net, torch.randn(8, 3, 6, 6), seed=draw(st.integers(0, 1000)))
    names = [f"blocks.{i}.{part}" for i in range(n) for part in ("conv", "bn")] + ["stem", "head"]
    hooks = draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(list(HOOKS)), st.booleans()),
                          max_size=3))   # (module, kind, registered after the transform)
    convs = [n for n in names if not n.endswith(".bn")]
    parametrized = draw(st.sampled_from([None, *convs]))
    pruned = draw(st.sampled_from([None, *[c for c in convs if c != parametrized]]))  # torch prunes plain tensors
    return net.eval(), hooks, parametrized, pruned


ONE_LINERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "tune": lambda m: normfx.convbn(m, mode="tune"),
    "deploy": lambda m: normfx.convbn(m, mode="deploy"),
    "deploy_all": normfx.deploy,
    "freeze": normfx.freeze,
}


def _hook(model: nn.Module, name: str, kind: str, log: dict[str, list]) -> None:
    HOOKS[kind](model.get_submodule(name), log.setdefault(f"{name}/{kind}/{len(log)}", []))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(decorated(), st.sampled_from(list(ONE_LINERS)))
def test_exact_one_liners_keep_what_user_code_observes(case, one_liner: str) -> None:
    model, hooks, parametrized, pruned = case
    source = copy.deepcopy(model)   # what the transform gets: hooks registered before it only
    for m in (model, source):       # decorated alike (torch cannot deep-copy a pruned model)
        if parametrized:
            parametrize.register_parametrization(m.get_submodule(parametrized), "weight", Scale())
        if pruned:
            prune.l1_unstructured(m.get_submodule(pruned), "weight", 0.3)
    before = [(n, k) for n, k, later in hooks if not later]
    # Hooks registered after a Deploy fold are on the folded modules (documented): there, only on
    # modules no fold touches.
    untouched = one_liner in ("tune", "freeze")
    after = [(n, k) for n, k, later in hooks if later and (untouched or n in ("stem", "head"))]
    ref_log: dict[str, list] = {}
    out_log: dict[str, list] = {}
    for name, kind in before:
        _hook(model, name, kind, ref_log)
        _hook(source, name, kind, out_log)
    result = ONE_LINERS[one_liner](source)
    for name, kind in after:
        _hook(model, name, kind, ref_log)
        _hook(result, name, kind, out_log)

    x = torch.randn(2, 3, 6, 6)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = model(xr), result(xo)
    assert rel_err(got, want) < DEPLOY_RTOL
    # Every hook fired as often as on the original and saw the same values.
    assert [len(v) for v in out_log.values()] == [len(v) for v in ref_log.values()]
    for seen, wanted in zip(out_log.values(), ref_log.values()):
        for a, b in zip(seen, wanted):
            assert rel_err(a, b) < DEPLOY_RTOL
    # State writes happen as in the original.
    for i, block in enumerate(model.blocks):
        assert result.get_submodule(f"blocks.{i}").calls == block.calls
    if one_liner == "tune":
        proj = torch.randn_like(want)
        (want * proj).sum().backward()
        (got * proj).sum().backward()
        assert rel_err(xo.grad, xr.grad) < GRAD_RTOL
        for (name, p), q in zip(result.named_parameters(), model.parameters()):
            if q.grad is not None:
                assert rel_err(p.grad, q.grad) < GRAD_RTOL, name
    report = normfx.last_report(result)
    for res in report.passes:
        sites = [c.site for c in res.changes] + [s.site for s in res.skips]
        assert len(sites) == len(set(sites)) == res.sites   # each site once
    if one_liner in ("deploy", "deploy_all"):
        bn_sites = {f"blocks.{i}.bn" for i in range(len(model.blocks))}
        result_pass = report.get("fold_convbn")
        folded = {c.site for c in result_pass.changes}
        assert bn_sites == folded | {s.site for s in result_pass.skips}
        for name, kind in before:
            if name.endswith(".bn") or (name.endswith(".conv") and kind != "pre-forward"):
                assert f"{name.rsplit('.', 1)[0]}.bn" not in folded   # a fold its hook would see: skipped
