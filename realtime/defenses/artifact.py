"""The calibration artifact: one safetensors file (tensors + a JSON header, no pickle).

Tensors: ``mu/<layer>``, ``sigma/<layer>`` (per-channel clean statistics), ``roc/fpr``, ``roc/tpr``,
``roc/thresholds``. JSON (safetensors metadata key ``zmask``): format version, model name and
fingerprint, layers, SPR settings, the 8 fusion scalars, lambda0, ROC summary, layer ranking and
provenance. Loading checks the header's shape and values (sizes, finite thresholds, finite per-channel
statistics with sigma > 0) and, given the model, its fingerprint and the statistics' shape against the
channels each tapped layer really has, so a broken or foreign calibration is refused at load time
(``ValueError``, one line) instead of failing inside the defense on every frame.
"""
from __future__ import annotations

import dataclasses

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors import safe_open

from .fusion import FusionBlock
from .spr import SPRConfig
from .zmask import ChannelStats, ZMask, ZMaskConfig
from realtime.core.files import write_safetensors
from realtime.core.taps import ActivationTaps
from realtime.models import fingerprint

FORMAT = "zmask-calibration/1"
MAX_SIZE = 16384          # pixels a side: no real input is larger (the live pipeline allows up to 4K)
PROBE_SIZE = (64, 64)     # the forward pass that counts each tapped layer's channels


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

    def check_layers(self, model: torch.nn.Module) -> None:
        """Every tapped layer exists in ``model`` and its mu/sigma have one entry per channel it outputs."""
        try:
            taps = ActivationTaps(model, self.config.layers)
        except KeyError as exc:
            raise CalibrationMismatchError(f"calibration layers do not exist in this model: "
                                           f"{' '.join(str(exc).split())[:300]}") from None
        p = next(model.parameters(), None)
        x = torch.rand(1, 3, *PROBE_SIZE, device=p.device if p is not None else "cpu")
        try:
            with torch.inference_mode():
                _, maps = taps(x)
        finally:
            taps.remove()
        bad = [f"{n}: {tuple(self.stats.mu[n].shape)} for {maps[n].shape[1]} channels"
               for n in self.config.layers if self.stats.mu[n].shape != (maps[n].shape[1],)]
        if bad:
            raise CalibrationMismatchError("calibration statistics do not fit the model's layers (mu/sigma need one "
                                           "value per channel): " + "; ".join(bad[:4]))

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
        if self.config.grow_threshold is not None:      # absent from artifacts made without mask growing
            header["grow"] = {"threshold": self.config.grow_threshold, "steps": self.config.grow_steps}
        write_safetensors(path, tensors, {"zmask": json.dumps(header)})
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
    try:
        h = json.loads(meta["zmask"])
    except ValueError as exc:
        raise ValueError(f"{path}: the calibration header is not valid JSON ({exc})") from None
    if not isinstance(h, dict):
        raise ValueError(f"{path}: the calibration header is {type(h).__name__}, not a JSON object")
    if h.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported calibration format {h.get('format')!r} (expected {FORMAT})")
    try:
        cal = _from_header(h, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else " ".join(str(exc).split())
        raise ValueError(f"{path}: malformed calibration: {what}") from None
    if model is not None:
        cal.check_model(model)
        cal.check_layers(model)
    return cal


def _size(value: Any, what: str, limit: int = MAX_SIZE) -> tuple:
    """Two ints in [1, limit] (a JSON list [h, w]), else ValueError."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{what} must be two integers [h, w], got {value!r}")
    if not all(1 <= v <= limit for v in value):
        raise ValueError(f"{what} {list(value)} is out of range (1..{limit} pixels a side)")
    return tuple(value)


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _from_header(h: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Calibration:
    sp = h["spr"]
    spr = SPRConfig(work_size=_size(sp["work_size"], "spr.work_size", 4096),
                    kernels_shallow=tuple(tuple(k) for k in sp["kernels_shallow"]),
                    kernels_deep=tuple(tuple(k) for k in sp["kernels_deep"]), mode=sp["mode"])
    cfg = ZMaskConfig(shallow=tuple(h["shallow"]), deep=tuple(h["deep"]), spr=spr,
                      lambda0=_finite(h["lambda0"], "lambda0"),
                      mask_threshold=_finite(h["mask_threshold"], "mask_threshold"))
    grow = h.get("grow")
    if grow is not None:
        if not isinstance(grow, dict) or not isinstance(grow.get("steps"), int) or not 0 <= grow["steps"] <= 1024:
            raise ValueError(f"grow must be {{'threshold': number, 'steps': int in 0..1024}}, got {grow!r}")
        cfg = dataclasses.replace(cfg, grow_threshold=_finite(grow.get("threshold"), "grow.threshold"),
                                  grow_steps=grow["steps"])
    fusion = h["fusion"]
    if not isinstance(fusion, dict):
        raise ValueError(f"fusion must be an object of 8 numbers, got {fusion!r}")
    for k, v in fusion.items():
        _finite(v, f"fusion.{k}")
    layers = list(h["stats_layers"])
    missing = [n for n in cfg.layers if n not in layers]
    if missing:
        raise ValueError(f"no channel statistics for the tapped layers {missing}")
    for n in layers:
        mu, sigma = tensors[f"mu/{n}"], tensors[f"sigma/{n}"]
        if mu.ndim != 1 or mu.shape != sigma.shape:
            raise ValueError(f"mu/{n} {tuple(mu.shape)} and sigma/{n} {tuple(sigma.shape)} must be one value "
                             "per channel, of the same length")
        if not (bool(torch.isfinite(mu).all()) and bool(torch.isfinite(sigma).all())):
            raise ValueError(f"mu/{n} or sigma/{n} holds NaN or infinite values")
        if not bool((sigma > 0).all()):
            raise ValueError(f"sigma/{n} must be > 0 for every channel")
    stats = ChannelStats({k: tensors[f"mu/{k}"] for k in layers}, {k: tensors[f"sigma/{k}"] for k in layers})
    roc = dict(h.get("roc") or {})
    for key in ("fpr", "tpr", "thresholds"):
        if f"roc/{key}" in tensors:
            roc[key] = tensors[f"roc/{key}"].tolist()
    return Calibration(model_name=str(h["model"]), fingerprint=str(h["fingerprint"]),
                       input_size=_size(h["input_size"], "input_size"), config=cfg, stats=stats,
                       fusion=fusion, roc=roc, extra=h.get("extra", {}))
