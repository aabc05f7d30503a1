"""Detector registry: ``--model NAME`` for detectors, with shipped-weights lookup like the segmenters'."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Union

import torch
from torch import nn

from ..data.detection import DETECTION_CLASSES
from .models import build_fcos_ddrnet, build_stock

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class DetectorEntry:
    name: str
    factory: Callable[..., nn.Module]
    description: str


def _stock_entry(name: str, description: str) -> DetectorEntry:
    return DetectorEntry(name, lambda **kw: build_stock(name, **kw), description)


_DETECTORS: Dict[str, DetectorEntry] = {e.name: e for e in (
    DetectorEntry("fcos_ddrnet", build_fcos_ddrnet,
                  "torchvision FCOS on a DDRNet-23-slim pyramid (trunk from our CamVid segmenter)"),
    _stock_entry("retinanet_resnet50_fpn", "torchvision RetinaNet R50-FPN (weights=None)"),
    _stock_entry("fasterrcnn_resnet50_fpn", "torchvision Faster R-CNN R50-FPN (weights=None)"),
    _stock_entry("fcos_resnet50_fpn", "torchvision FCOS R50-FPN (weights=None)"),
    _stock_entry("ssd300_vgg16", "torchvision SSD300 VGG-16 (weights=None)"),
    _stock_entry("ssdlite320_mobilenet_v3_large", "torchvision SSDlite320 MobileNetV3 (weights=None)"),
)}


def list_detectors() -> List[str]:
    return sorted(_DETECTORS)


def is_detector(name: str) -> bool:
    return name in _DETECTORS


def default_detector_weights(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}_camvid.pt"


def build_detector(name: str, weights: Union[str, os.PathLike, None] = "default",
                   device: Union[str, torch.device] = "cpu", **kwargs) -> nn.Module:
    """Build a registered detector in eval mode (5 classes: background + CamVid's four "things").

    ``weights``: ``"default"`` loads the shipped CamVid weights (error if missing), ``None`` keeps the
    initialisation (for ``fcos_ddrnet`` the trunk still starts from our segmentation weights unless
    ``trunk_weights=None``), anything else is a checkpoint path.
    """
    if name not in _DETECTORS:
        raise KeyError(f"unknown detector '{name}'; available: {', '.join(list_detectors())}")
    kwargs.setdefault("class_names", DETECTION_CLASSES)
    if name == "fcos_ddrnet" and weights is not None:
        kwargs.setdefault("trunk_weights", None)      # the full checkpoint replaces the trunk anyway
    model = _DETECTORS[name].factory(**kwargs)
    if weights is not None:
        from ..models.registry import load_weights, resolve_weights
        load_weights(model, resolve_weights(weights, default_detector_weights(name), f"detector '{name}'",
                                            f"python -m realtime.detection.train --model {name}"))
    return model.to(device).eval()
