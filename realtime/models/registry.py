"""Model registry: ``--model NAME`` resolves here for every command (timm-style ``build_*`` factories)."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from realtime.core.registry import Registry
from realtime.data.detection import DETECTION_CLASSES

from .external import build_external, is_external

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TASKS = ("segmentation", "detection")

# Every model, segmenter or detector: ``@register_model(name, task=..., description=...)`` on its factory.
MODELS: Registry[Callable[..., nn.Module]] = Registry(
    "model", builtins=("realtime.models.ddrnet", "realtime.models.bisenet", "realtime.models.detectors"))


def register_model(name: str, task: str = "segmentation", description: str = "",
                   train_command: Optional[str] = None) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a factory ``fn(**kwargs) -> nn.Module`` as model ``name`` of ``task``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    trainer = "realtime.train" if task == "segmentation" else "realtime.train_detection"
    return MODELS.register(name, task=task, description=description,
                           train_command=train_command or f"python -m {trainer} --model {name}")


def list_models(task: Optional[str] = None) -> List[str]:
    """Registered names, sorted: segmenters, detectors, or both (``task=None``, segmenters first)."""
    if task not in (None, *TASKS):
        raise ValueError(f"task must be 'segmentation' or 'detection', got {task!r}")
    return [n for t in TASKS if task in (None, t) for n in sorted(MODELS.names(task=t))]


def model_arg(text: str) -> str:
    """argparse ``type`` for ``--model``: a registered name or an external spec (checked when built)."""
    if is_external(text) or text in MODELS:
        return text
    raise ValueError(f"unknown model {text!r}; registered: {', '.join(list_models())}; or torchvision:NAME, "
                     "package.module:factory")


def model_slug(name: str) -> str:
    """``name`` as a file-name stem: registered names as they are, specs with ':' ',' '=' made safe
    (``torchvision:lraspp_mobilenet_v3_large`` -> ``torchvision-lraspp_mobilenet_v3_large``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def model_task(model: nn.Module) -> str:
    """'segmentation' (logits out) or 'detection' (torchvision-style list of box dicts out)."""
    return getattr(model, "task", "segmentation")


def default_weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}_camvid.pt"


def build_model(name: str, weights: Union[str, os.PathLike, None] = "default",
                device: Union[str, torch.device] = "cpu", **kwargs: Any) -> nn.Module:
    """Build a registered model in eval mode; ``kwargs`` go to its factory (e.g. ``num_classes``).

    ``name`` may also be a spec for a network this project did not design (``torchvision:NAME``,
    ``package.module:factory``; see ``realtime.models.external``): ``weights`` is then a state-dict path,
    or ``"default"``/``None`` for the factory's own initialisation.
    ``weights``: ``"default"`` loads the shipped CamVid weights (error if they are missing),
    ``None`` keeps the random initialisation, anything else is a checkpoint path. Detectors get
    CamVid's four "things" as ``class_names`` unless given; ``fcos_ddrnet``'s trunk is left at random
    init when full weights replace it anyway (``trunk_weights``).
    """
    if isinstance(weights, str) and weights.lower() == "none":    # the CLIs' spelling of random init
        weights = None
    if is_external(name):      # torchvision:NAME or package.module:factory (realtime.models.external)
        model = build_external(name, DETECTION_CLASSES)
        if weights not in (None, "default"):     # "default": as the factory made it (nothing is shipped)
            load_weights(model, resolve_weights(weights, Path(weights), f"'{name}'", ""))
        return model.to(device).eval()
    entry = MODELS.entry(name)
    if entry.meta["task"] == "detection":
        kwargs.setdefault("class_names", DETECTION_CLASSES)
        if name == "fcos_ddrnet" and weights is not None:
            kwargs.setdefault("trunk_weights", None)      # the full checkpoint replaces the trunk anyway
    model = entry.obj(**kwargs)
    model.model_name = name
    if weights is not None:
        what = f"'{name}'" if entry.meta["task"] == "segmentation" else f"detector '{name}'"
        load_weights(model, resolve_weights(weights, default_weights_path(name), what, entry.meta["train_command"]))
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
    try:
        with warnings.catch_warnings():      # torch's pickle-protocol notes would break the one-line error
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:   # the safe loader met Python objects: never retry it unsafely
        raise ValueError(f"{path} is not a plain weights file: it holds Python objects besides tensors, which "
                         "are never loaded (only weights_only checkpoints are read)") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({' '.join(str(exc).split())[:160]})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    ref = model.state_dict()
    wrong = [k for k, v in state.items() if k in ref and tuple(v.shape) != tuple(ref[k].shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{path} does not match {type(model).__name__}: {len(wrong)} tensors have another shape, "
                         f"e.g. {k} {tuple(state[k].shape)} where the model has {tuple(ref[k].shape)} "
                         "(was it trained for another model?)")
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
