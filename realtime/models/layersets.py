"""Z-Mask layer sets for detectors, by model name (zmask.md section 1; paper supplementary Table 1).

The paper hooks torchvision's R50-FPN detectors (RetinaNet, Faster R-CNN) at
S = backbone.body.relu, backbone.body.conv1, backbone.body.layer1.0.conv1 and
D = backbone.body.conv1, backbone.body.layer4, backbone.body.layer1.0.conv1, and SSD300-VGG16 at
S = backbone.extra.0.3, backbone.extra.0.1, D = backbone.extra.0.3, backbone.extra.0.5. We apply the
R50-FPN set to torchvision's FCOS too (same backbone). For our ``fcos_ddrnet`` the trunk is DDRNet-23-slim,
so the paper's DDRNet set (rbb2, rbb1, rb1, rb2 / rbb2, rbb1) is used under ``backbone.body``.
``ssdlite320_mobilenet_v3_large`` has no paper set; ours hooks early and late MobileNetV3 blocks
and is marked as such.
"""
from __future__ import annotations

from typing import Dict

from .base import LayerSpec

_R50 = LayerSpec(
    shallow=("backbone.body.relu", "backbone.body.conv1", "backbone.body.layer1.0.conv1"),
    deep=("backbone.body.conv1", "backbone.body.layer4", "backbone.body.layer1.0.conv1"),
    candidates=("backbone.body.conv1", "backbone.body.relu", "backbone.body.layer1.0.conv1", "backbone.body.layer1",
                "backbone.body.layer2", "backbone.body.layer3", "backbone.body.layer4"),
    aliases={"conv1": "backbone.body.conv1", "relu": "backbone.body.relu", "layer4": "backbone.body.layer4"})

_DDR = "backbone.body."
_FCOS_DDRNET = LayerSpec(
    shallow=tuple(_DDR + n for n in ("layer5", "layer5_", "layer3_", "layer4_")),   # rbb2, rbb1, rb1, rb2
    deep=tuple(_DDR + n for n in ("layer5", "layer5_")),                            # rbb2, rbb1
    candidates=tuple(_DDR + n for n in ("conv1", "layer1", "layer2", "layer3", "layer3_", "layer4", "layer4_",
                                        "layer5_", "layer5", "spp")),
    aliases={"rb1": _DDR + "layer3_", "rb2": _DDR + "layer4_", "rbb1": _DDR + "layer5_", "rbb2": _DDR + "layer5"})

_SSD300 = LayerSpec(
    shallow=("backbone.extra.0.3", "backbone.extra.0.1"),
    deep=("backbone.extra.0.3", "backbone.extra.0.5"),
    candidates=("backbone.features.15", "backbone.features.22", "backbone.extra.0.1", "backbone.extra.0.3",
                "backbone.extra.0.5", "backbone.extra.1"))

_SSDLITE = LayerSpec(  # ours, not the paper's: no set was published for SSDlite
    shallow=("backbone.features.0.1", "backbone.features.0.3"),
    deep=("backbone.features.0.3", "backbone.features.1.0"),
    candidates=("backbone.features.0.1", "backbone.features.0.3", "backbone.features.0.6",
                "backbone.features.1.0", "backbone.extra.0"))

LAYER_SETS: Dict[str, LayerSpec] = {
    "fcos_ddrnet": _FCOS_DDRNET,
    "retinanet_resnet50_fpn": _R50,
    "fasterrcnn_resnet50_fpn": _R50,
    "fcos_resnet50_fpn": _R50,
    "ssd300_vgg16": _SSD300,
    "ssdlite320_mobilenet_v3_large": _SSDLITE,
}

PAPER_SETS = ("retinanet_resnet50_fpn", "fasterrcnn_resnet50_fpn", "ssd300_vgg16", "fcos_ddrnet")


def layer_spec_for(name: str) -> LayerSpec:
    """The layer set registered for detector ``name``; KeyError naming the known ones otherwise."""
    if name not in LAYER_SETS:
        raise KeyError(f"no Z-Mask layer set for detector '{name}'; known: {', '.join(sorted(LAYER_SETS))}")
    return LAYER_SETS[name]
