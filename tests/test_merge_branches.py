"""Deploy's structural re-parameterization (``normfx.passes.merge_branches``): summed linear branches of
one input become one conv — on timm's RepVGG and MobileOne (against their own ``reparameterize``) and
on hand-written ACNet-style blocks (asymmetric kernels, grouped convs, an identity BatchNorm, a bare
identity) — exactly, and every sum that cannot merge is reported with its reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import normfx
from normfx.report import SkipReason
from tests.conftest import randomize_bn, rel_err


def _bn_left(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _merge_pass(model: nn.Module):
    return next(p for p in normfx.last_report(model).passes if p.name == "merge_branches")


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "repghostnet_050", "fastvit_t8"])
def test_timm_reparameterizable_models_deploy_as_their_own_reparameterize(name):
    """repghostnet: ``x2 = cheap_operation(x1) + fusion_bn(nn.Identity()(x1))``, the identity BN
    behind an ``nn.Identity`` call; fastvit: RepMixer's ``x + γ·(mixer(x) − norm(x))``."""
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name), torch.randn(8, 3, 64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    deployed = normfx.deploy(model)
    theirs = timm.create_model(name).eval()
    theirs.load_state_dict(model.state_dict())
    theirs = reparameterize_model(theirs)
    with torch.no_grad():
        ref = model(x)
        assert rel_err(deployed(x), ref) < 1e-4
        assert rel_err(theirs(x), ref) < 1e-4
    assert _bn_left(deployed) == 0 and _bn_left(model) > 0
    ours, their_count = (sum(p.numel() for p in m.parameters()) for m in (deployed, theirs))
    # timm's RepGhost reparameterize merges the branches but keeps the conv -> BatchNorm pairs
    # outside them (bn1, primary_conv.1): normfx folds those too
    assert ours == their_count if name != "repghostnet_050" else ours < their_count
    merged = _merge_pass(deployed)
    assert merged.changes and not merged.skips
    assert all("->" in c.detail and c.action == "merge" for c in merged.changes)


class ACBlock(nn.Module):
    """ACNet/RepVGG-style: k×k, 1×k, k×1 and 1×1 branches with BatchNorms, an identity BatchNorm and the
    bare input, summed."""

    def __init__(self, c: int = 8, groups: int = 1, identity: str = "bn", dilation: int = 1,
                 padding_mode: str = "zeros") -> None:
        super().__init__()

        def branch(k: tuple[int, int], p: tuple[int, int], d: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c, c, k, 1, p, d, groups=groups, bias=False), nn.BatchNorm2d(c))

        self.square = branch((3, 3), (dilation, dilation), dilation)
        self.row, self.col = branch((1, 3), (0, 1)), branch((3, 1), (1, 0))
        self.point = branch((1, 1), (0, 0))
        self.square[0].padding_mode = padding_mode
        self.identity = nn.BatchNorm2d(c) if identity == "bn" else None
        self.bare = identity == "bare"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.square(x) + self.row(x) + self.col(x) + self.point(x)
        if self.identity is not None:
            y = y + self.identity(x)
        if self.bare:
            y = y + x
        return torch.relu(y)


def _prepared(block: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), block, nn.Conv2d(8, 4, 1))
    return randomize_bn(net, torch.randn(8, 3, 12, 12)).eval()


@pytest.mark.parametrize("groups, identity", [(1, "bn"), (2, "bn"), (8, "bn"), (1, "bare"), (4, "none")])
def test_asymmetric_and_grouped_branches_merge_into_one_conv(groups, identity):
    model = _prepared(ACBlock(groups=groups, identity=identity))
    x = torch.randn(2, 3, 12, 12)
    deployed = normfx.deploy(model)
    with torch.no_grad():
        assert rel_err(deployed(x), model(x)) < 1e-5
    merged = _merge_pass(deployed)
    assert [c.site for c in merged.changes] == ["1.square.0"]
    assert _bn_left(deployed) == 0
    convs = [n for n, m in deployed.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs == ["0", "1.square.0", "2"]          # the other branches left their slots
    assert "1.row.0.weight" not in deployed.state_dict()
    assert model[1].row[0].weight.shape == (8, 8 // groups, 1, 3)   # the caller's model is untouched


@pytest.mark.parametrize("block, reason", [
    (ACBlock(dilation=2), "dilated convs"),
    (ACBlock(padding_mode="reflect"), "pads otherwise than with explicit zeros"),
])
def test_sums_that_cannot_merge_say_why_and_stay_exact(block, reason):
    model = _prepared(block)
    x = torch.randn(2, 3, 12, 12)
    deployed = normfx.deploy(model)
    skip = _merge_pass(deployed).skips[0]
    assert skip.reason == SkipReason.UNSUPPORTED and reason in skip.detail
    with torch.no_grad():
        assert rel_err(deployed(x), model(x)) < 1e-5


def test_filter_fn_hooks_and_shared_outputs_keep_the_branches():
    model = _prepared(ACBlock())
    kept = normfx.deploy(model, filter_fn=lambda m, name: name != "1.identity")
    assert not _merge_pass(kept).changes and _merge_pass(kept).skips[0].reason == SkipReason.FILTERED

    hooked = _prepared(ACBlock())
    hooked[1].identity.register_forward_hook(lambda *a: None)
    skip = _merge_pass(normfx.deploy(hooked)).skips
    assert skip and skip[0].reason == SkipReason.HOOKED and "'1.identity' has" in skip[0].detail

    class Shared(nn.Module):      # a branch's output also leaves the block: not a private branch
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            u = self.b(x)
            return self.a(x) + u, u

    deployed = normfx.deploy(Shared().eval())
    assert not _merge_pass(deployed).sites


def test_a_residual_network_has_no_branches_to_merge():
    torchvision = pytest.importorskip("torchvision")
    deployed = normfx.deploy(torchvision.models.resnet18().eval())
    assert _merge_pass(deployed).sites == 0


def test_a_conv_also_called_inside_an_untraceable_module_is_not_merged():
    """``y + block.conv(y)`` where ``block``'s own forward (kept as a leaf: it writes module state) calls
    the same conv: merging would change the call no graph shows (found by
    tests/test_user_code_properties.py)."""
    from tests.test_user_code_properties import Net

    model = randomize_bn(Net([(True, True)], share=True), torch.randn(8, 3, 6, 6)).eval()
    x = torch.randn(2, 3, 6, 6)
    deployed = normfx.deploy(model)
    skip = _merge_pass(deployed).skips
    assert skip and skip[0].reason == SkipReason.SHARED_MODULE and "also called inside 'blocks.0'" in skip[0].detail
    with torch.no_grad():
        assert rel_err(deployed(x), model(x)) < 1e-6


class RepMixer(nn.Module):
    """FastViT's token mixer: ``x + γ·(BN(dwconv(x)) + BN(x) − BN'(x))`` with a per-channel layer scale."""

    def __init__(self, c: int = 8, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.id_mixer, self.id_norm = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x):
        y = self.conv(x) + self.id_mixer(x) - self.id_norm(x)
        return x + (y.mul_(self.gamma) if self.inplace else y * self.gamma)


@pytest.mark.parametrize("inplace", [False, True])
def test_differences_and_layer_scales_merge(inplace):
    m = randomize_bn(RepMixer(inplace=inplace), torch.randn(8, 8, 6, 6)).eval().double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    d = normfx.deploy(m)
    assert _bn_left(d) == 0
    detail = "identity + scaled conv.0 + scaled id_mixer - scaled id_norm -> one (3, 3) conv"
    assert _merge_pass(d).changes[0].detail == detail
    with torch.no_grad():
        assert rel_err(d(x), m(x)) < 1e-12


class _ScaledOnWidth(RepMixer):
    """A 1-D γ multiplies the last (width) axis, not the channels: not a per-channel scale."""

    def __init__(self) -> None:
        super().__init__(c=6)
        self.gamma = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return x + (self.conv(x) + self.id_mixer(x)) * self.gamma


def test_a_scale_on_another_axis_is_not_merged():
    m = randomize_bn(_ScaledOnWidth(), torch.randn(8, 6, 6, 6)).eval().double()
    x = torch.randn(2, 6, 6, 6, dtype=torch.float64)
    d = normfx.deploy(m)
    (skip,) = _merge_pass(d).skips
    assert "not one per output channel" in skip.detail
    with torch.no_grad():
        assert rel_err(d(x), m(x)) < 1e-12
