"""Issue 21.4: torchvision's detection and segmentation models keep their normal call.

After ``convbn`` in both modes, ``deploy``, ``freeze`` and ``fixed_point``, each model is called the
way its users call it (a list of images in, a list of dicts with boxes out; a batch in, a dict out),
and every exact transform computes what the original computes: the backbone's features for the
detectors (their boxes go through NMS, where a last-bit difference may reorder ties), the whole
output for the segmentation models. Random weights, randomized BatchNorm statistics.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models import detection, segmentation
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

import normfx
from tests.conftest import DEPLOY_RTOL, randomize_bn, rel_err

pytestmark = pytest.mark.slow


def _faster_rcnn_frozen_bn() -> nn.Module:
    # What a detector fine-tuned from pretrained weights has: FrozenBatchNorm2d in the backbone.
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    return detection.FasterRCNN(backbone, num_classes=5, min_size=128, max_size=160)


def _retinanet() -> nn.Module:
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   norm_layer=nn.BatchNorm2d,
                                   returned_layers=[2, 3, 4],
                                   extra_blocks=torchvision.ops.feature_pyramid_network.LastLevelP6P7(256, 256))
    return detection.RetinaNet(backbone, num_classes=5, min_size=128, max_size=160)


DETECTORS: dict[str, Callable[[], nn.Module]] = {
    "fasterrcnn_frozen_bn": _faster_rcnn_frozen_bn,
    "fasterrcnn_mobilenet_v3": lambda: detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=128, max_size=160),
    "retinanet": _retinanet,
    "ssdlite": lambda: detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5),
}
SEGMENTERS: dict[str, Callable[[], nn.Module]] = {
    "deeplabv3_mobilenet_v3": lambda: segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5, aux_loss=True),
    "lraspp_mobilenet_v3": lambda: segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5),
}
TRANSFORMS: dict[str, tuple[Callable[[nn.Module], nn.Module], bool]] = {
    # name: (one-liner, exact)
    "convbn_tune": (lambda m: normfx.convbn(m, mode="tune"), True),
    "convbn_deploy": (lambda m: normfx.convbn(m, mode="deploy"), True),
    "deploy": (normfx.deploy, True),
    "freeze": (lambda m: normfx.freeze(m, keep=_trainable_norm(m)), True),
    "fixed_point": (normfx.fixed_point, False),
}


def _trainable_norm(m: nn.Module) -> tuple[str, ...]:
    """BN-only training where the model has BatchNorms to train; a FrozenBatchNorm model has none
    (``freeze`` says so: tested in test_freeze.py), so its biases are trained instead."""
    return ("norm",) if any(isinstance(k, nn.BatchNorm2d) for k in m.modules()) else ("bias",)


def _transformed(build: Callable[[], nn.Module], transform: str) -> tuple[nn.Module, nn.Module, bool]:
    """(the original, randomized and in eval mode; its transformed copy in eval mode; exact?)"""
    torch.manual_seed(0)
    model = randomize_bn(build()).eval()
    one_liner, exact = TRANSFORMS[transform]
    return model, one_liner(model).eval(), exact


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_normal_call(name: str, transform: str) -> None:
    model, out, exact = _transformed(DETECTORS[name], transform)
    images = [torch.rand(3, 128, 144), torch.rand(3, 144, 128)]
    with torch.no_grad():
        result = out(images)
        assert isinstance(result, list) and len(result) == 2
        assert all({"boxes", "scores", "labels"} <= set(r) for r in result)
        if exact:
            batch = torch.rand(2, 3, 128, 128)
            got, want = out.backbone(batch), model.backbone(batch)
            if isinstance(want, torch.Tensor):
                got, want = {"0": got}, {"0": want}
            for k in want:
                assert rel_err(got[k], want[k]) < DEPLOY_RTOL, k
    assert normfx.last_report(out).passes


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("name", list(SEGMENTERS))
def test_segmenter_normal_call(name: str, transform: str) -> None:
    model, out, exact = _transformed(SEGMENTERS[name], transform)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        got = out(x)
        assert isinstance(got, dict) and got["out"].shape == (2, 5, 96, 96)
        if exact:
            want = model(x)
            for k in want:
                assert rel_err(got[k], want[k]) < DEPLOY_RTOL, k
