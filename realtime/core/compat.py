"""Compatibility shims for third-party packages on CPU-only machines.

``import_torchvision()``: some torchvision wheels ship compiled ops (``_C.so``) that fail to load
without CUDA; ``import torchvision`` then dies with "operator torchvision::nms does not exist"
(its fake-tensor registrations assume the op was defined by ``_C``). When, and only when, that
happens we define ``torchvision::nms`` (and ``torchvision::qnms``, which the same registration
file needs) in plain torch, import torchvision again, and let ``torchvision.ops.nms`` call it.
A machine whose torchvision loads normally is left untouched.
"""
from __future__ import annotations

import functools
import importlib
import sys
import types

import torch

_NMS_SCHEMA = "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_QNMS_SCHEMA = "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def nms_reference(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: visit boxes by descending score, keep one, drop the rest with IoU > threshold.

    ``dets`` (N,4) as (x1,y1,x2,y2); returns kept indices (int64, descending score) on dets' device.
    Same arithmetic as torchvision's CPU kernel: area = (x2-x1)*(y2-y1), no +1.
    """
    if dets.dim() != 2 or dets.shape[1] != 4:
        raise ValueError(f"boxes should be a (N,4) tensor, got {tuple(dets.shape)}")
    if scores.dim() != 1 or scores.shape[0] != dets.shape[0]:
        raise ValueError(f"scores should be (N,) matching boxes, got {tuple(scores.shape)}")
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=dets.device)
    boxes = dets.detach().float()
    order = torch.argsort(scores.detach().float(), descending=True, stable=True)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    remaining = order
    while remaining.numel() > 0:
        i = remaining[0]
        keep.append(i)
        rest = remaining[1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        remaining = rest[~(iou > iou_threshold)]          # NaN IoU (degenerate boxes) keeps, like C++
    return torch.stack(keep).to(torch.int64)


def _qnms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Quantised variant: torchvision passes integer representations; IoU is scale-free."""
    return nms_reference(dets.float(), scores.float(), iou_threshold)


def _op_exists(name: str) -> bool:
    """Whether ``torchvision::<name>`` is defined in the dispatcher (by torchvision's _C or by us)."""
    return hasattr(torch.ops.torchvision, name)


@functools.lru_cache(maxsize=None)
def _fallback_library() -> torch.library.Library:
    """Define the missing ops once per process; the Library must stay alive for them to stay defined."""
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema, fn in (("nms", _NMS_SCHEMA, nms_reference), ("qnms", _QNMS_SCHEMA, _qnms)):
        if not _op_exists(name):
            lib.define(schema)
            # CPU and CUDA kernels; the Meta (fake) kernel is registered by torchvision on import.
            for key in ("CPU", "CUDA"):
                lib.impl(name, fn, key)
    return lib


def _purge_torchvision() -> None:
    """Forget a half-imported torchvision so the next import starts clean."""
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]


def import_torchvision() -> types.ModuleType:
    """``import torchvision``, defining a pure-torch ``torchvision::nms`` first if its compiled ops are missing."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    _purge_torchvision()
    _fallback_library()
    tv = importlib.import_module("torchvision")
    # torchvision.ops.nms still refuses to run when the compiled library failed to load; allow it
    # now that the op exists (other compiled ops keep their own checks and python fallbacks).
    boxes = importlib.import_module("torchvision.ops.boxes")
    original = boxes._assert_has_ops

    def _assert_nms_available() -> None:
        if not _op_exists("nms"):
            original()

    boxes._assert_has_ops = _assert_nms_available
    return tv
