"""Model registry: ``--model NAME`` resolves here for every command (timm-style ``build_*`` factories)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn

from .base import SegmentationModel
from .bisenet import build_bisenetv1
from .ddrnet import build_ddrnet23_slim

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., SegmentationModel]
    description: str


_MODELS: Dict[str, ModelEntry] = {e.name: e for e in (
    ModelEntry("ddrnet23_slim", build_ddrnet23_slim, "DDRNet-23-slim, two-branch real-time segmenter"),
    ModelEntry("bisenetv1", build_bisenetv1, "BiSeNet V1, spatial path + half-width ResNet-18 context path"),
)}


def _detection():
    """The detector registry (imported lazily: the detection package builds on this module)."""
    from ..detection import registry
    return registry


def list_models(task: Optional[str] = None) -> List[str]:
    """Registered names: segmenters, detectors (``realtime.detection``), or both (``task=None``)."""
    seg = sorted(_MODELS) if task in (None, "segmentation") else []
    det = _detection().list_detectors() if task in (None, "detection") else []
    if task not in (None, "segmentation", "detection"):
        raise ValueError(f"task must be 'segmentation' or 'detection', got {task!r}")
    return seg + det


def model_task(model: nn.Module) -> str:
    """'segmentation' (logits out) or 'detection' (torchvision-style list of box dicts out)."""
    return getattr(model, "task", "segmentation")


def default_weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}_camvid.pt"


def _entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise KeyError(f"unknown model '{name}'; available: {', '.join(list_models())}")
    return _MODELS[name]


def build_model(name: str, weights: Union[str, os.PathLike, None] = "default", num_classes: int = 11,
                device: Union[str, torch.device] = "cpu") -> SegmentationModel:
    """Build a registered model in eval mode.

    ``weights``: ``"default"`` loads the shipped CamVid weights (error if they are missing),
    ``None`` keeps the random initialisation, anything else is a checkpoint path. Detector names
    (``list_models("detection")``) go to ``realtime.detection.build_detector`` (``num_classes`` unused).
    """
    if name not in _MODELS and _detection().is_detector(name):
        return _detection().build_detector(name, weights=weights, device=device)
    model = _entry(name).factory(num_classes=num_classes)
    model.model_name = name
    if weights is not None:
        load_weights(model, resolve_weights(weights, default_weights_path(name), f"'{name}'",
                                            f"python -m realtime.train --model {name}"))
    return model.to(device).eval()


def resolve_weights(weights: Union[str, os.PathLike], default: Path, what: str, train_command: str) -> Path:
    """``"default"`` -> the shipped file ``default``, else the given path; a missing file is an error that
    says how to make it (the training command) or to check the path."""
    path = default if weights == "default" else Path(weights)
    if not path.is_file():
        hint = f"train it with: {train_command}" if weights == "default" else "check the path"
        raise FileNotFoundError(f"weights for {what} not found at {path}; {hint}")
    return path


def load_weights(model: nn.Module, path: Union[str, os.PathLike]) -> Dict:
    """Load a state dict (plain, or a training checkpoint with ``model``) safely; returns its metadata."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    ref = model.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref and v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (was it trained for another model?)")
    meta_path = Path(path).with_suffix(".json")
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def save_weights(model: nn.Module, path: Union[str, os.PathLike], meta: Optional[Dict] = None,
                 half: bool = True) -> Path:
    """Write the state dict (floating tensors in fp16 when ``half``) and a JSON sidecar with ``meta``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu()
          for k, v in model.state_dict().items()}
    torch.save(sd, path)
    if meta is not None:
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex) of the architecture and its weights as float32: same model, same value on any device
    or precision it is later cast to; a different model (or retrained weights) gives another."""
    h = hashlib.sha256(type(model).__name__.encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        t = v.detach().to("cpu")
        t = t.float() if t.is_floating_point() else t
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
