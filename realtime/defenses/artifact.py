"""The calibration artifact: one safetensors file (tensors + a JSON header, no pickle).

Tensors: ``mu/<layer>``, ``sigma/<layer>`` (per-channel clean statistics), ``roc/fpr``, ``roc/tpr``,
``roc/thresholds``. JSON (safetensors metadata key ``zmask``): format version, model name and
fingerprint, layers, SPR settings, the 8 fusion scalars, lambda0, ROC summary, layer ranking and
provenance. Loading checks the model fingerprint so a calibration is never applied to another model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .fusion import FusionBlock
from .spr import SPRConfig
from .zmask import ChannelStats, ZMask, ZMaskConfig
from realtime.models import fingerprint

FORMAT = "zmask-calibration/1"


class CalibrationMismatchError(ValueError):
    """The calibration was made for a different model (fingerprint mismatch)."""


@dataclass
class Calibration:
    model_name: str
    fingerprint: str
    input_size: tuple
    config: ZMaskConfig
    stats: ChannelStats
    fusion: Dict[str, float]
    roc: Dict[str, Any] = field(default_factory=dict)      # auc, chosen, youden, fpr/tpr/thresholds lists
    extra: Dict[str, Any] = field(default_factory=dict)    # layer ranking, provenance, metrics

    def check_model(self, model: torch.nn.Module) -> None:
        fp = fingerprint(model)
        if fp != self.fingerprint:
            name = getattr(model, "model_name", type(model).__name__)
            raise CalibrationMismatchError(
                f"calibration was made for model '{self.model_name}' (fingerprint {self.fingerprint}); "
                f"this model '{name}' has fingerprint {fp}. Re-run: python -m calibration.fit --model {name}")

    def build_zmask(self, model: torch.nn.Module, check: bool = True, taps: Optional[Any] = None,
                    **options: Any) -> ZMask:
        """A ready Z-Mask for ``model`` (fingerprint checked unless ``check=False``).

        ``taps``: an engine returning ``(output, taps)`` to run instead of hooking ``model`` itself;
        ``options`` go to ``ZMask`` (e.g. ``heatmap_backend``)."""
        if check:
            self.check_model(model)
        dev = next(model.parameters()).device
        return ZMask(taps if taps is not None else model, self.config, self.stats.to(dev),
                     FusionBlock.from_dict(self.fusion).to(dev), **options)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: Dict[str, torch.Tensor] = {}
        for k in self.stats.mu:
            tensors[f"mu/{k}"] = self.stats.mu[k].detach().float().cpu().contiguous()
            tensors[f"sigma/{k}"] = self.stats.sigma[k].detach().float().cpu().contiguous()
        roc = dict(self.roc)
        for key in ("fpr", "tpr", "thresholds"):
            if key in roc:
                tensors[f"roc/{key}"] = torch.tensor(roc.pop(key), dtype=torch.float64)
        spr = self.config.spr
        header = {
            "format": FORMAT, "model": self.model_name, "fingerprint": self.fingerprint,
            "input_size": list(self.input_size), "shallow": list(self.config.shallow), "deep": list(self.config.deep),
            "spr": {"work_size": list(spr.work_size), "kernels_shallow": [list(k) for k in spr.kernels_shallow],
                    "kernels_deep": [list(k) for k in spr.kernels_deep], "mode": spr.mode},
            "lambda0": self.config.lambda0, "mask_threshold": self.config.mask_threshold,
            "fusion": self.fusion, "roc": roc, "stats_layers": list(self.stats.mu), "extra": self.extra,
        }
        save_file(tensors, str(path), metadata={"zmask": json.dumps(header)})
        return path


def load_calibration(path: str | Path, model: Optional[torch.nn.Module] = None) -> Calibration:
    """Read an artifact; with ``model`` given, refuse it unless the fingerprints match."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated/foreign files
        raise ValueError(f"{path} is not a readable calibration artifact: {exc}") from exc
    if "zmask" not in meta:
        raise ValueError(f"{path} has no Z-Mask header; not a calibration artifact")
    h = json.loads(meta["zmask"])
    if h.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported calibration format {h.get('format')!r} (expected {FORMAT})")
    spr = SPRConfig(work_size=tuple(h["spr"]["work_size"]),
                    kernels_shallow=tuple(tuple(k) for k in h["spr"]["kernels_shallow"]),
                    kernels_deep=tuple(tuple(k) for k in h["spr"]["kernels_deep"]), mode=h["spr"]["mode"])
    cfg = ZMaskConfig(shallow=tuple(h["shallow"]), deep=tuple(h["deep"]), spr=spr, lambda0=float(h["lambda0"]),
                      mask_threshold=float(h["mask_threshold"]))
    stats = ChannelStats({k: tensors[f"mu/{k}"] for k in h["stats_layers"]},
                         {k: tensors[f"sigma/{k}"] for k in h["stats_layers"]})
    roc = dict(h["roc"])
    for key in ("fpr", "tpr", "thresholds"):
        if f"roc/{key}" in tensors:
            roc[key] = tensors[f"roc/{key}"].tolist()
    cal = Calibration(model_name=h["model"], fingerprint=h["fingerprint"], input_size=tuple(h["input_size"]),
                      config=cfg, stats=stats, fusion=h["fusion"], roc=roc, extra=h.get("extra", {}))
    if model is not None:
        cal.check_model(model)
    return cal
