"""Networks this project did not design: ``torchvision:NAME`` and ``package.module:factory`` model specs.

``build_external(spec, weights)`` returns the user's module itself (same class behaviour, same
state-dict keys, so their checkpoints load as they are) with what the pipeline needs mixed in:

* input: an (N,3,H,W) batch in [0,1]. torchvision segmenters are normalised with the ImageNet
  mean/std torchvision's own recipes use; a custom factory's module gets [0,1] unless it defines
  ``input_mean`` / ``input_std`` (3 floats each), then it is normalised with those;
* output (segmenters): logits (N,C,H,W) at the input size -- a ``{"out": ...}`` dict (torchvision) or a
  tuple/list (first tensor) is reduced to that tensor, smaller maps are upsampled bilinearly;
  in training mode ``(logits, [])`` as the trainer expects;
* ``layers()``: candidate Z-Mask layers found automatically (``discover_layers``) unless the module
  has its own ``layers()``; ``mean_color``: the colour that normalises to zero (what masking fills with).

Spec grammar: ``torchvision:<builder>[,key=value...]`` (e.g. ``torchvision:lraspp_mobilenet_v3_large,
num_classes=11``; segmentation builders default to ``num_classes=11`` for CamVid, detection builders to
CamVid's 4 things + background, always ``weights=None, weights_backbone=None``: nothing is downloaded)
or ``package.module:factory[,key=value...]`` (any importable callable returning an ``nn.Module``; a
``task = "detection"`` attribute on the module marks a torchvision-style detector).
"""
from __future__ import annotations

import ast
import importlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from realtime.core.compat import import_torchvision

from .base import LayerSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDES = (4, 8, 16, 32)


def is_external(name: str) -> bool:
    """A spec (``prefix:target``) rather than a registered name."""
    return ":" in name


def parse_spec(spec: str) -> Tuple[str, str, Dict[str, Any]]:
    """``'torchvision:lraspp_mobilenet_v3_large,num_classes=11'`` -> ('torchvision', 'lraspp_...', {...})."""
    head, _, rest = spec.partition(":")
    target, *pairs = rest.split(",")
    if not head or not target:
        raise ValueError(f"model spec {spec!r}: expected torchvision:NAME or package.module:factory")
    kwargs: Dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ValueError(f"model spec {spec!r}: options are key=value, got {pair!r}")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return head, target, kwargs


class SegmenterMixin:
    """Our segmenter contract on top of any segmentation module (no parameters or buffers added)."""

    task = "segmentation"
    model_name: str = "external"
    aux_weights: Tuple[float, ...] = ()
    _input_mean: Optional[Tuple[float, ...]] = None
    _input_std: Optional[Tuple[float, ...]] = None
    _layer_spec: Optional[LayerSpec] = None

    def layers(self) -> LayerSpec:
        if self._layer_spec is None:
            raise RuntimeError(f"{self.model_name}: no candidate layers were found")
        return self._layer_spec

    @property
    def mean_color(self) -> torch.Tensor:
        mean = self._input_mean if self._input_mean is not None else (0.5, 0.5, 0.5)
        return torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch of shape (N,3,H,W), got {tuple(x.shape)}")
        if self._input_mean is not None:
            mean = torch.tensor(self._input_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self._input_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        out = first_map(super().forward(x, *args, **kwargs))  # type: ignore[misc]
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (out, []) if self.training else out


def first_map(out: Any) -> torch.Tensor:
    """The logits of a segmenter's output: ``out`` itself, ``out["out"]`` / the first dict value, or the
    first tensor of a tuple/list."""
    if isinstance(out, dict):
        out = out["out"] if "out" in out else next(iter(out.values()))
    if isinstance(out, (list, tuple)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise ValueError(f"a segmenter must return (N,C,H,W) logits, got {type(out).__name__}")
    return out


@torch.no_grad()
def discover_layers(model: nn.Module, size: Tuple[int, int] = (256, 320), limit: int = 10,
                    skip_channels: Sequence[int] = ()) -> LayerSpec:
    """Candidate layers: block outputs at strides 4-32, found by one probing forward pass.

    Every (N,C,h,w) map a module returns is recorded in call order with the names of all modules that
    returned it (a block and its last child return the same tensor); maps are named at the block level
    (``_block_depth``: the shallowest depth with at least 4 maps). For each stride run the
    last module (the stage output) is kept, plus the middle of runs of 3 or more, up to ``limit`` in all;
    maps with ``skip_channels`` channels (logits) are left out. Defaults: shallow = the stage outputs
    at the two finest strides, deep = the last two stage outputs. A model with a ``backbone`` submodule
    (torchvision's segmenters and detectors) is searched inside it only."""
    seen: Dict[int, Tuple[List[str], int]] = {}      # id(map) -> (every module name returning it, height)
    order: List[int] = []
    keep: List[torch.Tensor] = []      # hold every map so no id() is reused within the pass
    hooks = []
    trunk = "backbone." if isinstance(getattr(model, "backbone", None), nn.Module) else ""

    def hook(name: str):
        def fn(_m: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[1] not in skip_channels:
                keep.append(out)
                if id(out) not in seen:
                    order.append(id(out))
                    seen[id(out)] = ([], int(out.shape[-2]))
                seen[id(out)][0].append(name)
        return fn

    for name, module in model.named_modules():
        if name and name.startswith(trunk):        # the trunk's blocks when the model names one
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        dev = param.device if param is not None else torch.device("cpu")
        model(torch.rand(1, 3, *size, device=dev))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    level = lambda n: n[len(trunk):].count(".")          # noqa: E731
    depth = _block_depth([{level(n) for n in seen[key][0]} for key in order])
    runs: Dict[int, List[str]] = {}
    for key in order:
        names, h = seen[key]
        at_depth = [n for n in names if level(n) == depth]
        stride = round(size[0] / h) if h else 0
        if at_depth and stride in STRIDES and at_depth[0] not in runs.get(stride, []):
            runs.setdefault(stride, []).append(at_depth[0])
    stages = [(s, names[-1]) for s, names in sorted(runs.items())]
    picked = [n for _s, n in stages]
    for _s, names in sorted(runs.items()):
        if len(names) >= 3 and len(picked) < limit:
            picked.append(names[len(names) // 2])
    if not stages:
        raise ValueError("no (N,C,h,w) maps at strides 4-32 were found; pass --shallow/--deep module names")
    picked = picked[:limit]
    shallow = tuple(n for _s, n in stages[:2])
    deep = tuple(n for _s, n in stages[-2:])
    return LayerSpec(shallow=shallow, deep=deep, candidates=tuple(dict.fromkeys(picked)))


def _block_depth(levels: Sequence[set], minimum: int = 4) -> int:
    """The shallowest module depth (dots below the trunk) at which at least ``minimum`` distinct maps are
    returned: the level of a network's blocks (``backbone.7``, ``backbone.body.7``, ``backbone.layer3``).
    ``levels``: for each map, the depths of the modules that returned it."""
    counts: Dict[int, int] = {}
    for depths in levels:
        for d in depths:
            counts[d] = counts.get(d, 0) + 1
    for d in sorted(counts):
        if counts[d] >= minimum:
            return d
    return max(counts, key=counts.get) if counts else 0


def _torchvision_builder(target: str) -> Tuple[Any, str]:
    import_torchvision()
    from torchvision import models
    for task, module in (("segmentation", models.segmentation), ("detection", models.detection)):
        fn = getattr(module, target, None)
        if callable(fn) and not isinstance(fn, type):
            return fn, task
    raise KeyError(f"torchvision has no segmentation or detection builder {target!r}")


def _custom_factory(head: str, target: str) -> Any:
    try:
        module = importlib.import_module(head)
    except ImportError as exc:
        raise KeyError(f"cannot import {head!r} for model factory {head}:{target}: {exc}") from None
    fn = getattr(module, target, None)
    if not callable(fn):
        raise KeyError(f"{head} has no callable {target!r}")
    return fn


def build_external(spec: str, detection_classes: Sequence[str]) -> nn.Module:
    """The module ``spec`` names, adopted as a segmenter (or a detector), randomly initialised or as the
    factory made it; weights are loaded by the registry (``build_model``)."""
    head, target, kwargs = parse_spec(spec)
    # Seeded construction: the same spec gives the same initial weights in every process, so a
    # calibration fitted on an un-trained model (``--weights none``) still matches its fingerprint later.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _build(spec, head, target, kwargs, detection_classes)


def _build(spec: str, head: str, target: str, kwargs: Dict[str, Any], detection_classes: Sequence[str]) -> nn.Module:
    if head == "torchvision":
        fn, task = _torchvision_builder(target)
        kwargs = {"weights": None, "weights_backbone": None, **kwargs}
        if task == "segmentation":
            kwargs.setdefault("num_classes", 11)
        else:
            kwargs.setdefault("num_classes", len(detection_classes) + 1)
        model = fn(**kwargs)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if task == "segmentation" else (None, None)
    else:
        model = _custom_factory(head, target)(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{spec} returned {type(model).__name__}, not an nn.Module")
        task = getattr(model, "task", "segmentation")
        mean, std = getattr(model, "input_mean", None), getattr(model, "input_std", None)
    if task == "detection":
        from .detectors import adopt_detector
        return adopt_detector(model, spec, detection_classes)
    return adopt_segmenter(model, spec, mean, std)


def adopt_segmenter(model: nn.Module, name: str, mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None) -> nn.Module:
    """Give a segmentation module our contract (a subclass with no extra state, see ``SegmenterMixin``)."""
    base = type(model)
    own_layers = callable(getattr(model, "layers", None))
    model.__class__ = type(f"Z{base.__name__}", (SegmenterMixin, base), {})
    model.model_name = name
    if mean is not None:
        model._input_mean, model._input_std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if own_layers:
        model._layer_spec = base.layers(model)
    else:
        num_classes = getattr(model, "num_classes", None)
        logits = first_map(model.eval()(torch.rand(1, 3, 64, 80))).shape[1] if num_classes is None else num_classes
        model._layer_spec = discover_layers(model, skip_channels=(logits,))
    return model


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SegmenterMixin", "adopt_segmenter", "build_external",
           "discover_layers", "first_map", "is_external", "parse_spec"]
