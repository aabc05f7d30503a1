"""Detectors: torchvision's detection models (``weights=None``) adapted to our defense interface.

Every detector here is a torchvision ``FCOS`` / ``RetinaNet`` / ``FasterRCNN`` / ``SSD`` instance whose
class gains :class:`DetectorMixin`: it takes a [0,1] image batch (N,3,H,W) as well as a list of images,
normalises with the CamVid mean/std (torchvision's transform does it), and exposes ``layers()`` (the
Z-Mask layer sets) and ``mean_color`` like our segmenters, so taps, Z-Mask, attacks and the live
pipeline handle both tasks through one interface.

``fcos_ddrnet`` is the detector we train on CPU: torchvision's FCOS (one-stage, anchor-free) on a
feature pyramid built from the DDRNet-23-slim trunk, initialised from our own CamVid segmentation
weights (no downloaded weights exist here; a trunk that already separates cars, pedestrians and signs
pixel-wise is the cheapest start). The stock builders (``retinanet_resnet50_fpn``,
``fasterrcnn_resnet50_fpn``, ``ssd300_vgg16``, ``ssdlite320_mobilenet_v3_large``, ``fcos_resnet50_fpn``)
are registered with ``weights=None`` so the paper's layer sets resolve on them by name and the same
training command can train them where compute allows (a GPU).
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from realtime.core.compat import import_torchvision
from .base import CAMVID_MEAN, CAMVID_STD, LayerSpec
from .ddrnet import DDRNet, ddrnet_trunk

import_torchvision()
from torchvision.models import detection as tvdet  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.fcos import FCOSHead  # noqa: E402
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7  # noqa: E402

from .layersets import layer_spec_for  # noqa: E402
from .registry import build_model, register_model  # noqa: E402


class DetectorMixin:
    """What our pipeline needs from a detector on top of torchvision's model class."""

    task = "detection"
    model_name: str = "detector"
    class_names: Sequence[str] = ()

    def layers(self) -> LayerSpec:
        found = self.__dict__.get("_layer_spec")       # an adopted external detector's discovered layers
        return found if found is not None else layer_spec_for(self.model_name)

    @property
    def mean_color(self) -> torch.Tensor:
        """(1,3,1,1) colour in [0,1] that the transform normalises to zero: what masking fills with."""
        return torch.as_tensor(self.transform.image_mean, dtype=torch.float32).view(1, 3, 1, 1)

    def forward(self, images: Any, targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        """``images``: an (N,3,H,W) batch in [0,1] or a list of (3,H,W) images; eval -> list of dicts."""
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"expected an image batch of shape (N,3,H,W), got {tuple(images.shape)}")
            images = list(images.unbind(0))
        return super().forward(images, targets)  # type: ignore[misc]


def _adopt(model: nn.Module, name: str, class_names: Sequence[str]) -> nn.Module:
    """Give a torchvision detector instance our mixin (a subclass with no extra state)."""
    base = type(model)
    model.__class__ = type(f"Z{base.__name__}", (DetectorMixin, base), {})
    model.model_name = name
    model.class_names = tuple(class_names)
    return model


def adopt_detector(model: nn.Module, name: str, class_names: Sequence[str]) -> nn.Module:
    """``_adopt`` for a detector this project did not register: its Z-Mask candidate layers are found
    by probing its backbone (``external.discover_layers``), named from the detector's root."""
    from .external import discover_layers
    model = _adopt(model, name, class_names)
    spec = discover_layers(model.backbone)
    pre = "backbone."
    model._layer_spec = LayerSpec(tuple(pre + n for n in spec.shallow), tuple(pre + n for n in spec.deep),
                                  tuple(pre + n for n in spec.candidates))
    return model


class DDRNetPyramid(nn.Module):
    """The DDRNet-23-slim trunk as a 3-level feature extractor for an FPN.

    Levels (strides at 360x480): ``c3`` = high-resolution branch + upsampled context (what the segmenter's
    head sees; 1/8, 128 ch), ``c4`` = low-resolution branch after the conv4 fusion (1/16, 128 ch),
    ``c5`` = low-resolution branch after the conv5_1 fusion (1/32, 256 ch). Module names match
    ``DDRNet`` (layer3_, layer5, ...) so the paper's DDRNet layer set hooks the same stages.
    Input is already normalised by the detector's transform.
    """

    channels = (128, 128, 256)

    def __init__(self, trunk: DDRNet) -> None:
        super().__init__()
        for name in ("conv1", "relu", "layer1", "layer2", "layer3", "layer4", "compression3", "compression4",
                     "down3", "down4", "layer3_", "layer4_", "layer5_", "layer5", "spp"):
            setattr(self, name, getattr(trunk, name))

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        t = ddrnet_trunk(self, x)
        return OrderedDict([("c3", self.relu(t.hi + t.ctx)), ("c4", self.relu(t.lo4)), ("c5", self.relu(t.lo5))])


class PyramidBackbone(nn.Module):
    """``body`` + torchvision FPN (P3-P5) + P6/P7: the ``backbone.body.*`` naming torchvision uses."""

    def __init__(self, body: DDRNetPyramid, out_channels: int = 96) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.channels), out_channels,
                                         extra_blocks=LastLevelP6P7(out_channels, out_channels))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))


def _transform_kwargs(min_size: int, max_size: int) -> Dict[str, Any]:
    return dict(min_size=min_size, max_size=max_size, image_mean=list(CAMVID_MEAN), image_std=list(CAMVID_STD))


@register_model("fcos_ddrnet", task="detection",
                description="torchvision FCOS on a DDRNet-23-slim pyramid (trunk from our CamVid segmenter)")
def build_fcos_ddrnet(num_classes: int = 5, trunk_weights: Optional[str] = "default", min_size: int = 360,
                      max_size: int = 480, fpn_channels: int = 96, head_convs: int = 2,
                      class_names: Sequence[str] = ()) -> nn.Module:
    """FCOS on a DDRNet-23-slim pyramid. ``trunk_weights``: ``"default"`` starts from our CamVid
    segmentation weights (an error if they are missing), ``None`` from random init, or a checkpoint path."""
    trunk = build_model("ddrnet23_slim", weights=trunk_weights)
    backbone = PyramidBackbone(DDRNetPyramid(trunk), fpn_channels)
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,), (128,)), aspect_ratios=((1.0,),) * 5)
    head = FCOSHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes, num_convs=head_convs)
    # size_divisible=8: 360x480 frames are not padded (DDRNet's stride-2 convs round up by themselves),
    # so feature maps and Z-Mask heatmaps cover exactly the image.
    model = tvdet.FCOS(backbone, num_classes, anchor_generator=anchors, head=head, score_thresh=0.05,
                       detections_per_img=100, size_divisible=8, **_transform_kwargs(min_size, max_size))
    return _adopt(model, "fcos_ddrnet", class_names)


def _stock(builder_name: str, name: str, num_classes: int, min_size: int, max_size: int,
           class_names: Sequence[str], **extra: Any) -> nn.Module:
    builder = getattr(tvdet, builder_name)
    kw = dict(weights=None, weights_backbone=None, num_classes=num_classes, **extra)
    if not builder_name.startswith("ssd"):
        kw.update(_transform_kwargs(min_size, max_size))
    else:
        kw.update(image_mean=list(CAMVID_MEAN), image_std=list(CAMVID_STD))
    return _adopt(builder(**kw), name, class_names)


def build_stock(name: str, num_classes: int = 5, min_size: int = 360, max_size: int = 480,
                class_names: Sequence[str] = ()) -> nn.Module:
    """torchvision's own builder with ``weights=None, weights_backbone=None`` (random init)."""
    return _stock(name, name, num_classes, min_size, max_size, class_names)


STOCK = {"retinanet_resnet50_fpn": "torchvision RetinaNet R50-FPN (weights=None)",
         "fasterrcnn_resnet50_fpn": "torchvision Faster R-CNN R50-FPN (weights=None)",
         "fcos_resnet50_fpn": "torchvision FCOS R50-FPN (weights=None)",
         "ssd300_vgg16": "torchvision SSD300 VGG-16 (weights=None)",
         "ssdlite320_mobilenet_v3_large": "torchvision SSDlite320 MobileNetV3 (weights=None)"}
for _name, _desc in STOCK.items():
    register_model(_name, task="detection", description=_desc)(functools.partial(build_stock, _name))
