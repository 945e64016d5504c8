"""Fuzzing (hypothesis): random small networks built from conv / BatchNorm / activation / residual /
concatenation / summed-branch / shared-module / multi-user blocks, with random kernels, groups,
dilations, padding modes and norm placement. For every one:

* every exact transform (``convbn`` Tune and Deploy, ``sync_bn``, ``deploy``) computes what the model
  computes (float64: the fold's own error, not float32 rounding);
* every pass's report is consistent: ``fold_convbn`` has one site per BatchNorm call in the graph,
  each transformed or skipped, and Deploy leaves exactly the skipped ones;
* the caller's model is untouched (every tensor bit for bit, every module the same object).

``NORMFX_FUZZ_EXAMPLES`` sets the number of networks (default 30, inside the suite's budget; a longer
profile: ``NORMFX_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py``).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normfx
from tests.conftest import bn_calls, randomize_bn, rel_err

C = 4
EXAMPLES = int(os.environ.get("NORMFX_FUZZ_EXAMPLES", "30"))

conv_spec = st.fixed_dictionaries({
    "k": st.sampled_from([1, 3, 5]),
    "groups": st.sampled_from([1, 2, 4]),
    "dilation": st.sampled_from([1, 2]),
    "bias": st.booleans(),
    "padding_mode": st.sampled_from(["zeros", "zeros", "reflect"]),
})
block_spec = st.one_of(
    st.tuples(st.just("conv_bn"), conv_spec, st.sampled_from(["relu", "none"])),
    st.tuples(st.just("bn_conv"), conv_spec, st.booleans()),       # BN before a conv; padded or not
    st.tuples(st.just("residual"), conv_spec, st.just(None)),
    st.tuples(st.just("branches"), conv_spec, st.booleans()),      # RepVGG-style, identity BN or not
    st.tuples(st.just("cat"), conv_spec, st.booleans()),           # BN after a concatenation
    st.tuples(st.just("shared"), conv_spec, st.just(None)),         # one conv -> BN pair called twice
    st.tuples(st.just("multi_user"), conv_spec, st.just(None)),
    st.tuples(st.just("reshape"), conv_spec, st.booleans()),        # BatchNorm1d after flatten(2) / a permute
)


def _conv(spec: dict, c_out: int = C, padded: bool = True) -> nn.Conv2d:
    k, d = spec["k"], spec["dilation"]
    groups = spec["groups"] if c_out % spec["groups"] == 0 else 1
    return nn.Conv2d(C, c_out, k, padding=(k // 2) * d if padded else 0, dilation=d, groups=groups,
                     bias=spec["bias"], padding_mode=spec["padding_mode"] if padded else "zeros")


class Block(nn.Module):
    def __init__(self, kind: str, spec: dict, option) -> None:
        super().__init__()
        self.kind, self.option = kind, option
        if kind == "conv_bn":
            self.conv, self.bn = _conv(spec), nn.BatchNorm2d(C)
        elif kind == "bn_conv":
            self.bn, self.conv = nn.BatchNorm2d(C), _conv(spec, padded=option)
        elif kind in ("residual", "shared", "multi_user"):
            self.conv, self.bn = _conv(spec), nn.BatchNorm2d(C)
        elif kind == "branches":
            self.big, self.bn_big = _conv(dict(spec, dilation=1, padding_mode="zeros")), nn.BatchNorm2d(C)
            self.small, self.bn_small = _conv(dict(spec, k=1, dilation=1)), nn.BatchNorm2d(C)
            self.identity = nn.BatchNorm2d(C) if option else None
        elif kind == "cat":
            self.a, self.b = _conv(spec, C // 2), _conv(dict(spec, k=1), C // 2)
            self.bn = nn.BatchNorm2d(C)
        elif kind == "reshape":
            self.conv, self.bn = _conv(spec), nn.BatchNorm1d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k == "conv_bn":
            y = self.bn(self.conv(x))
            return torch.relu(y) if self.option == "relu" else y
        if k == "bn_conv":
            y = self.conv(self.bn(x))
            return y if self.option else nn.functional.interpolate(y, size=x.shape[-2:])
        if k == "residual":
            return x + self.bn(self.conv(x))
        if k == "branches":
            y = self.bn_big(self.big(x)) + self.bn_small(self.small(x))
            return y + self.identity(x) if self.identity is not None else y
        if k == "cat":
            return self.bn(torch.cat([self.a(x), self.b(x)], 1))
        if k == "reshape":
            y = self.conv(x)
            if self.option:                    # [N, C, HW]: the conv's channels, foldable
                return self.bn(y.flatten(2)).view_as(y)
            t = y.permute(0, 2, 3, 1).reshape(-1, C)   # channels last through a permute: not folded
            return self.bn(t).reshape(y.shape[0], *y.shape[2:], C).permute(0, 3, 1, 2)
        if k == "shared":
            return self.bn(self.conv(torch.tanh(self.bn(self.conv(x)))))
        y = self.conv(x)                       # multi_user
        return self.bn(y) * torch.sigmoid(y)


def _model(blocks) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(*(Block(*b) for b in blocks)).double()
    return randomize_bn(net, torch.randn(8, C, 10, 10, dtype=torch.float64)).eval()


def _state(model: nn.Module) -> tuple[list, dict]:
    return [id(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(block_spec, min_size=1, max_size=4))
def test_random_networks_exact_consistent_and_untouched(blocks):
    model = _model(blocks)
    x = torch.randn(2, C, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    ids, state = _state(model)
    n_bn = bn_calls(model)
    bn_names = {n for n, m in model.named_modules() if isinstance(m, _BatchNorm)}

    def deploy(m: nn.Module) -> nn.Module:
        return normfx.deploy(m, example_inputs=x)

    for make in (lambda m: normfx.convbn(m, mode="tune"), lambda m: normfx.convbn(m, mode="deploy"),
                 normfx.sync_bn, normfx.deploy, deploy):
        out = make(model)
        with torch.no_grad():
            assert rel_err(out.eval()(x), ref) < 1e-10
        report = normfx.last_report(out)
        if any(p.name == "fold_convbn" for p in report.passes):
            fold = report.get("fold_convbn")
            changed, skipped = {c.site for c in fold.changes}, {s.site for s in fold.skips}
            assert changed | skipped == bn_names and not changed & skipped   # every BatchNorm once
            if make in (normfx.deploy, deploy):   # what is left: the skipped ones merge_branches did not merge
                merged = " ".join(c.detail for c in report.get("merge_branches").changes) + " "
                left = {s for s in skipped if f"{s} " not in merged}
                assert {n for n, m in out.named_modules() if isinstance(m, _BatchNorm)} == left

    assert [id(m) for m in model.modules()] == ids
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert bn_calls(model) == n_bn


@pytest.mark.parametrize("blocks", [
    [("branches", {"k": 3, "groups": 2, "dilation": 1, "bias": False, "padding_mode": "zeros"}, True)],
    [("cat", {"k": 3, "groups": 1, "dilation": 2, "bias": True, "padding_mode": "zeros"}, False)],
    [("shared", {"k": 3, "groups": 4, "dilation": 1, "bias": False, "padding_mode": "reflect"}, None)],
    [("reshape", {"k": 3, "groups": 2, "dilation": 1, "bias": True, "padding_mode": "zeros"}, True)],
])
def test_the_folds_the_fuzzer_aims_at_do_fold(blocks):
    """The fuzzer's deeper blocks are not only left exact but folded: no BatchNorm left."""
    model = _model(blocks)
    x = torch.randn(2, C, 10, 10, dtype=torch.float64)
    deployed = normfx.deploy(model, example_inputs=x)
    assert bn_calls(deployed) == 0 and not any(isinstance(m, _BatchNorm) for m in deployed.modules())
    with torch.no_grad():
        assert rel_err(deployed(x), model(x)) < 1e-10
