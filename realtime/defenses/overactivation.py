"""Over-activation detectors FPDA and HN on one deep layer (detection only: no mask, output = first pass).

Both look at the deepest layer of the Z-Mask calibration's deep set D (by position in the model):
``layer3`` for ddrnet23_slim (D = layer3, layer2) and ``context_path.backbone.layer3`` for bisenetv1
(D = context levels 2 and 3 of the backbone). Scores, per frame, of that layer's map A (C,h,w):
- FPDA: the mean activation after the ReLU, ``mean(max(A, 0))`` (DDRNet's ``layer3`` output is pre-ReLU:
  the raw mean *drops* under a patch while the rectified one rises);
- HN: the fraction of activations above their channel's clean threshold, ``mean(A_c > t_c)``, with
  ``t_c`` the ``percentile``-th (99th) percentile of channel c over clean frames' pixels.
A frame is flagged when its score exceeds a threshold set for ``fpr`` (1 %) false positives on clean
CamVid TRAIN frames (never val/test). Fit and ship with
``python -m realtime.defenses.overactivation --model NAME [--data DIR] [--limit N]``, which writes
``calibration/shipped/<model>_overactivation.json`` holding the model fingerprint; loading it for a
different model raises ``OverActivationMismatchError``.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from .base import Defense, DefenseResult, StageTimer
from .registry import REPO, DefenseContext, register_defense
from realtime.core.taps import ActivationTaps

FORMAT = "overactivation/1"


class OverActivationMismatchError(ValueError):
    """The thresholds were fitted for a different model (fingerprint mismatch)."""


@dataclass
class OverActivationCalibration:
    """What the fit produced: the layer, HN channel thresholds, the two frame thresholds and provenance."""
    model_name: str
    fingerprint: str
    layer: str
    channel_thresholds: List[float]
    fpda_threshold: float
    hn_threshold: float
    percentile: float = 99.0
    target_fpr: float = 0.01
    train_fpr: Dict[str, float] = field(default_factory=dict)
    frames: int = 0
    split: str = "train"
    input_size: List[int] = field(default_factory=list)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, model: Optional[nn.Module] = None) -> "OverActivationCalibration":
        """Read a JSON artifact; with ``model`` given, refuse it unless the fingerprints match."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"over-activation thresholds {path} not found; fit them with "
                                    f"`python -m realtime.defenses.overactivation --model NAME`")
        raw = json.loads(path.read_text())
        if raw.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not an {FORMAT} artifact")
        cal = cls(**raw)
        if model is not None:
            from realtime.models import fingerprint
            fp = fingerprint(model)
            if fp != cal.fingerprint:
                name = getattr(model, "model_name", type(model).__name__)
                raise OverActivationMismatchError(
                    f"{path} was fitted for model '{cal.model_name}' (fingerprint {cal.fingerprint}); this "
                    f"model '{name}' has fingerprint {fp}. Re-run: python -m realtime.defenses.overactivation "
                    f"--model {name}")
        return cal


def deepest_layer(model: nn.Module, names: Sequence[str]) -> str:
    """The module among ``names`` that comes last in ``model.named_modules()`` order (the deepest)."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    missing = [n for n in names if n not in order]
    if missing or not names:
        raise KeyError(f"layers {missing or names} not found in {type(model).__name__}")
    return max(names, key=lambda n: order[n])


def fpda_score(act: torch.Tensor) -> torch.Tensor:
    """(N,) mean of ``max(A, 0)`` over a (N,C,h,w) map: the activation after the ReLU that follows the layer
    (DDRNet's ``layer3`` output is pre-ReLU; on already non-negative maps such as BiSeNet's it is a no-op)."""
    return act.float().clamp(min=0).flatten(1).mean(1)


def hn_score(act: torch.Tensor, channel_thresholds: torch.Tensor) -> torch.Tensor:
    """(N,) fraction of activations above their channel's threshold."""
    t = channel_thresholds.to(device=act.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (act.float() > t).float().flatten(1).mean(1)


def threshold_at_fpr(scores: torch.Tensor, fpr: float) -> float:
    """Smallest threshold such that at most ``floor(fpr * n)`` clean scores lie strictly above it."""
    s = scores.double().sort(descending=True).values
    allowed = int(math.floor(fpr * s.numel()))
    return float(s[min(allowed, s.numel() - 1)])


class OverActivationDetector(Defense):
    """FPDA (``kind='fpda'``) or HN (``kind='hn'``): score one deep layer, flag above the clean threshold."""
    name = "overactivation"
    flags = True

    def __init__(self, model: nn.Module, cal: OverActivationCalibration, kind: str,
                 threshold: Optional[float] = None, engine: Optional[Any] = None) -> None:
        super().__init__(model)
        if kind not in ("fpda", "hn"):
            raise ValueError(f"kind must be 'fpda' or 'hn', got {kind!r}")
        self.kind, self.cal = kind, cal
        self.threshold = float(threshold if threshold is not None else
                               (cal.fpda_threshold if kind == "fpda" else cal.hn_threshold))
        self.channel_thresholds = torch.tensor(cal.channel_thresholds, dtype=torch.float32)
        self.taps = engine if engine is not None else ActivationTaps(model, [cal.layer])

    def run(self, x: torch.Tensor, timer: StageTimer) -> DefenseResult:
        with timer("backbone"):
            out, maps = self.taps(x)
        with timer("detector"):
            if self.cal.layer not in maps:
                raise KeyError(f"the runtime returned no map for layer {self.cal.layer!r} "
                               f"(has {sorted(maps)}); build it with that layer tapped")
            act = maps[self.cal.layer]
            score = fpda_score(act) if self.kind == "fpda" else hn_score(act, self.channel_thresholds)
            flagged = score > self.threshold
        return DefenseResult(output=out, defended_input=x, flagged=flagged, score=score, first_output=out)

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "defense": self.kind, "layer": self.cal.layer,
                "threshold": self.threshold, "target_fpr": self.cal.target_fpr}


class FPDA(OverActivationDetector):
    """Mean activation of the deepest D layer."""
    name = "fpda"

    def __init__(self, model: nn.Module, cal: OverActivationCalibration, threshold: Optional[float] = None,
                 engine: Optional[Any] = None) -> None:
        super().__init__(model, cal, "fpda", threshold, engine)


class HN(OverActivationDetector):
    """Fraction of over-threshold activations of the deepest D layer."""
    name = "hn"

    def __init__(self, model: nn.Module, cal: OverActivationCalibration, threshold: Optional[float] = None,
                 engine: Optional[Any] = None) -> None:
        super().__init__(model, cal, "hn", threshold, engine)


def artifact_path(ctx: DefenseContext) -> Path:
    return Path(ctx.artifacts) / f"{ctx.model_name}_overactivation.json"


@register_defense("fpda")
def _build_fpda(ctx: DefenseContext, threshold: Optional[float] = None) -> Defense:
    """FPDA with the shipped thresholds (fingerprint checked); ``threshold`` overrides the 1 % FPR one."""
    return FPDA(ctx.model, OverActivationCalibration.load(artifact_path(ctx), ctx.model), threshold, ctx.engine)


@register_defense("hn")
def _build_hn(ctx: DefenseContext, threshold: Optional[float] = None) -> Defense:
    """HN with the shipped thresholds (fingerprint checked); ``threshold`` overrides the 1 % FPR one."""
    return HN(ctx.model, OverActivationCalibration.load(artifact_path(ctx), ctx.model), threshold, ctx.engine)


@torch.no_grad()
def fit(model: nn.Module, model_name: str, images: torch.Tensor, deep: Sequence[str], percentile: float = 99.0,
        fpr: float = 0.01, batch: int = 4) -> OverActivationCalibration:
    """Fit channel thresholds and both frame thresholds on clean uint8 frames (N,3,H,W)."""
    from realtime.models import fingerprint
    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError(f"fit needs a batch of at least 2 frames (N,3,H,W), got {tuple(images.shape)}")
    if not 0 < percentile < 100 or not 0 < fpr < 1:
        raise ValueError(f"percentile must be in (0, 100) and fpr in (0, 1), got {percentile}, {fpr}")
    layer = deepest_layer(model, deep)
    taps = ActivationTaps(model, [layer])
    maps = []
    try:
        for i in tqdm(range(0, images.shape[0], batch), desc=f"{model_name} {layer}", unit="batch"):
            maps.append(taps(images[i:i + batch].float().div(255))[1][layer].half())
    finally:
        taps.remove()
    act = torch.cat(maps)                                                    # (N,C,h,w) fp16
    per_channel = act.transpose(0, 1).flatten(1).float()                     # (C, N*h*w)
    thr_c = torch.stack([torch.quantile(row, percentile / 100) for row in per_channel])
    del per_channel
    fpda = fpda_score(act)
    hn = hn_score(act, thr_c)
    t_fpda, t_hn = threshold_at_fpr(fpda, fpr), threshold_at_fpr(hn, fpr)
    return OverActivationCalibration(
        model_name=model_name, fingerprint=fingerprint(model), layer=layer,
        channel_thresholds=[float(v) for v in thr_c], fpda_threshold=t_fpda, hn_threshold=t_hn,
        percentile=percentile, target_fpr=fpr, frames=int(images.shape[0]), input_size=list(images.shape[-2:]),
        train_fpr={"fpda": float((fpda > t_fpda).float().mean()), "hn": float((hn > t_hn).float().mean())})


__all__ = ["FPDA", "HN", "OverActivationCalibration", "OverActivationDetector", "OverActivationMismatchError",
           "deepest_layer", "fit", "fpda_score", "hn_score", "threshold_at_fpr"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Fit FPDA/HN thresholds on clean CamVid train frames.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--limit", type=int, default=None, help="use the first N train frames")
    ap.add_argument("--percentile", type=float, default=99.0)
    ap.add_argument("--fpr", type=float, default=0.01)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from realtime.defenses.artifact import load_calibration
    from realtime.data import CamVid
    from realtime.models import build_model
    model = build_model(args.model)
    deep = load_calibration(REPO / "calibration" / "shipped" / f"{args.model}.safetensors", model).config.deep
    ds = CamVid(args.data, "train")
    n = len(ds) if args.limit is None else min(args.limit, len(ds))
    images, _ = ds.to_tensors(range(n), progress=True)
    cal = fit(model, args.model, images, deep, args.percentile, args.fpr)
    out = Path(args.out) if args.out else REPO / "calibration" / "shipped" / f"{args.model}_overactivation.json"
    cal.save(out)
    print(f"{out}: layer {cal.layer}, FPDA > {cal.fpda_threshold:.6g}, HN > {cal.hn_threshold:.6g}, "
          f"train FPR {cal.train_fpr} on {cal.frames} frames")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

