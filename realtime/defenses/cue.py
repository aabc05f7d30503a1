"""A second, independent cue next to Z-Mask's score d: shallow texture outliers (issue 22).

Why: an attacker who knows Z-Mask can push d under lambda0 by keeping its layers' z-scores low under the
patch, and still do damage. The cue watches other layers (the earliest ones, where a printed pattern's
texture is unlike any natural surface) with a statistic of its own: per layer, the channel-mean |z| on
Z-Mask's working grid, averaged over ``pool`` x ``pool`` cells; the frame's cue score is the max over
cells and layers of that map divided by the layer's clean threshold (a high quantile of the per-frame
max on clean training frames). A frame is flagged when ``d > lambda0`` *or* ``cue > 1``; on a
cue-flagged frame the cells whose map exceeds the layer's clean *cell* threshold are masked too.

Everything is plain differentiable torch, so the white-box attacker (``realtime.attacks.whitebox``) can
and does fight the cue as well as d.

Artifact: one safetensors file, tensors ``mu/<layer>``, ``sigma/<layer>`` and JSON metadata
``outlier-cue`` (format, model, fingerprint, layers, pool, frame and cell thresholds, provenance).
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from safetensors import safe_open

from realtime.core.files import write_safetensors
from realtime.core.taps import ActivationTaps
from realtime.models import fingerprint, model_slug

from .registry import DefenseContext, REPO, register_defense
from .spr import SPRConfig, resize, to_work, zscore
from .zmask import ChannelStats, Detection, HeatmapBackend, ZMask
from .refine import parse_refine
from .zmask_defense import ZMaskDefense, context_calibration

FORMAT = "outlier-cue/1"


@dataclass
class OutlierCue:
    """Clean statistics and thresholds of the cue for one model (see the module docstring)."""
    model_name: str
    fingerprint: str
    layers: Tuple[str, ...]
    mu: Dict[str, torch.Tensor]
    sigma: Dict[str, torch.Tensor]
    frame_threshold: Dict[str, float]           # per layer: clean quantile of the per-frame max
    cell_threshold: Dict[str, float]            # per layer: clean quantile over all cells (mask)
    pool: int = 3
    extra: Dict[str, Any] = field(default_factory=dict)

    def mean_abs(self, taps: Dict[str, torch.Tensor], spr: SPRConfig) -> Dict[str, torch.Tensor]:
        """Per layer (N,1,HR,WR): channel-mean |z| on Z-Mask's working grid, before pooling (differentiable)."""
        out = {}
        for name in self.layers:
            f = taps[name].float()
            z = zscore(to_work(f, spr), self.mu[name].to(f.device), self.sigma[name].to(f.device))
            out[name] = z.abs().mean(dim=1, keepdim=True)
        return out

    def maps(self, taps: Dict[str, torch.Tensor], spr: SPRConfig,
             mean_abs: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Per layer (N,1,HR,WR): pooled channel-mean |z| on Z-Mask's working grid (differentiable);
        ``mean_abs``: those per-cell means already computed (e.g. by the CPU kernel), pooled here."""
        cells = mean_abs if mean_abs is not None else self.mean_abs(taps, spr)
        return {name: F.avg_pool2d(cells[name], self.pool, 1, self.pool // 2, count_include_pad=False)
                for name in self.layers}

    def stats(self) -> ChannelStats:
        """The cue's own per-channel statistics, as Z-Mask's type (what a heatmap backend takes)."""
        return ChannelStats({n: self.mu[n] for n in self.layers}, {n: self.sigma[n] for n in self.layers})

    def score(self, maps: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) max over layers and cells of map / frame threshold: > 1 flags the frame."""
        return torch.stack([maps[n].amax(dim=(1, 2, 3)) / self.frame_threshold[n] for n in self.layers]).amax(0)

    def hit(self, maps: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,1,HR,WR) bool: cells above their layer's clean cell threshold, any layer."""
        hits = [maps[n].detach() > self.cell_threshold[n] for n in self.layers]
        return torch.stack(hits).any(dim=0)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {f"{k}/{n}": getattr(self, k)[n].detach().float().cpu().contiguous()
                   for k in ("mu", "sigma") for n in self.layers}
        header = {"format": FORMAT, "model": self.model_name, "fingerprint": self.fingerprint,
                  "layers": list(self.layers), "pool": self.pool, "frame_threshold": self.frame_threshold,
                  "cell_threshold": self.cell_threshold, "extra": self.extra}
        write_safetensors(path, tensors, {"outlier-cue": json.dumps(header)})
        return path


def load_cue(path: str | Path, model: Optional[torch.nn.Module] = None) -> OutlierCue:
    """Read a cue artifact; with ``model``, refuse one made for other weights (one-line ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"outlier-cue file {path} not found; fit one with python -m calibration.cue")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        h = json.loads(meta["outlier-cue"])
        if h.get("format") != FORMAT:
            raise ValueError(f"unsupported format {h.get('format')!r}")
        layers = tuple(h["layers"])
        cue = OutlierCue(h["model"], h["fingerprint"], layers, {n: tensors[f"mu/{n}"] for n in layers},
                         {n: tensors[f"sigma/{n}"] for n in layers},
                         {n: float(h["frame_threshold"][n]) for n in layers},
                         {n: float(h["cell_threshold"][n]) for n in layers}, int(h.get("pool", 3)), h.get("extra", {}))
    except Exception as exc:      # safetensors' own errors, JSON, missing keys: all one message
        raise ValueError(f"{path} is not a readable outlier-cue artifact: {exc}") from None
    bad = [n for n in layers if not (cue.frame_threshold[n] > 0 and cue.cell_threshold[n] > 0)
           or not bool(torch.isfinite(cue.mu[n]).all() and (cue.sigma[n] > 0).all())]
    if bad:
        raise ValueError(f"{path}: non-positive thresholds or bad statistics for layers {bad}")
    if model is not None and fingerprint(model) != cue.fingerprint:
        raise ValueError(f"{path} was fitted for model '{cue.model_name}' (fingerprint {cue.fingerprint}), "
                         f"not this one ({fingerprint(model)}); re-run python -m calibration.cue")
    return cue


class CuedZMask(ZMask):
    """Z-Mask whose ``detect`` also reads the outlier cue.

    The score becomes ``max(d, cue * lambda0)`` (d's units), so ``score > lambda0`` is exactly "d over
    its threshold or the cue over its own", the ROC of the score is the ROC of the combined detector,
    and everything that reads the score (voting, benchmarks, the white-box attacker's hinge) sees both
    cues. On frames the cue flags, its hit cells are masked as well as Z-Mask's own mask.

    ``base`` must tap the cue's layers too (``build`` does that); its taps, statistics and fusion are
    shared, not copied. ``heatmap_backend`` as for ``ZMask``: with the CPU kernel it computes Z-Mask's terms
    and the cue's per-cell |z| too (the pooling, score and mask stay here)."""

    def __init__(self, base: ZMask, cue: OutlierCue, heatmap_backend: Union[str, HeatmapBackend] = "reference") -> None:
        if not base.cfg.lambda0 > 0:
            raise ValueError(f"the outlier cue needs a positive lambda0 to share the score's units, "
                             f"got {base.cfg.lambda0}")
        missing = [n for n in cue.layers if n not in base.taps.layers]
        if missing:
            raise ValueError(f"the Z-Mask does not tap the cue's layers {missing}; build it with CuedZMask.build")
        super().__init__(base.taps, base.cfg, base.stats, base.fusion, heatmap_backend=heatmap_backend)
        self.cue = cue
        self.cue_stats = cue.stats()

    @classmethod
    def build(cls, cal: Any, model: torch.nn.Module, cue: OutlierCue,
              heatmap_backend: Union[str, HeatmapBackend] = "reference") -> "CuedZMask":
        """From a calibration artifact: one set of hooks on Z-Mask's and the cue's layers together."""
        layers = tuple(dict.fromkeys((*cal.config.layers, *cue.layers)))
        return cls(cal.build_zmask(model, check=False, taps=ActivationTaps(model, layers)), cue, heatmap_backend)

    def cue_maps(self, taps: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The cue's pooled maps; the per-cell |z| from the heatmap backend's kernel when it takes these taps."""
        kernel = getattr(self._fused, "mean_abs_z", None)
        cells = kernel(taps, self.cue_stats, lambda t: self.cue.mean_abs(t, self.cfg.spr)) if kernel else None
        return self.cue.maps(taps, self.cfg.spr, cells)

    def detect(self, taps: Dict[str, torch.Tensor], size: Tuple[int, int], timer=None) -> Detection:
        timer = timer or (lambda _stage: nullcontext())
        det = super().detect(taps, size, timer)
        with timer("heatmaps"):
            maps = self.cue_maps(taps)
        with timer("fusion"):
            cue = self.cue.score(maps)
            score = torch.maximum(det.score, cue.to(det.score.dtype) * self.cfg.lambda0)
            by_cue = cue.detach() > 1.0
            flagged = det.flagged | by_cue
        mask = det.mask
        if bool(by_cue.any()):
            with timer("mask"):
                hit = self.cue.hit(maps) & by_cue.view(-1, 1, 1, 1)
                cue_keep = (resize(hit.to(det.mask.dtype), size, "nearest") < 0.5).to(det.mask.dtype)
                mask = torch.minimum(det.mask, cue_keep)
        return Detection(det.h_s, det.h_d, det.soft_mask, score, flagged, mask)


class CuedZMaskDefense(ZMaskDefense):
    """``zmask`` with the outlier cue: the same orchestration (prior, second pass), a second flag."""
    name = "zmask_cue"

    def describe(self) -> Dict[str, Any]:
        cue = self.zm.cue
        return {**super().describe(), "cue_layers": list(cue.layers), "cue_pool": cue.pool,
                "cue_frame_threshold": cue.frame_threshold, "cue_fingerprint": cue.fingerprint}


def cue_path(model_name: str) -> Path:
    """Where the shipped cue of a model lives."""
    return REPO / "calibration" / "shipped" / f"{model_slug(model_name)}_cue.safetensors"


def cue_layers(model_name: str, cue: Optional[str] = None) -> Tuple[str, ...]:
    """The layers a model's cue reads (what an engine must also export for ``zmask_cue``); () without a readable
    cue file (``load_cue`` then reports what is wrong with it)."""
    try:
        return load_cue(cue or cue_path(model_name)).layers
    except (FileNotFoundError, ValueError):
        return ()


@register_defense("zmask_cue")
def _build_zmask_cue(ctx: DefenseContext, cue: Optional[str] = None, threshold: Optional[float] = None,
                     heatmap_backend: Union[str, HeatmapBackend] = "reference", refine: Any = None) -> CuedZMaskDefense:
    """Z-Mask from its calibration plus the outlier cue (default calibration/shipped/<model>_cue); ``threshold``
    overrides lambda0 (the cue's own threshold is unchanged: it is scaled into lambda0's units); ``refine`` as
    for ``zmask``. An engine that exports Z-Mask's and the cue's layers (``cue_layers`` says which to ask for) runs
    the first pass; otherwise the module itself is hooked."""
    cal = context_calibration(ctx)
    oc = load_cue(cue or cue_path(ctx.model_name), ctx.model)
    exported = getattr(ctx.engine, "layers", None) or ()
    if ctx.engine is not None and all(n in exported for n in (*cal.config.layers, *oc.layers)):
        zm = CuedZMask(cal.build_zmask(ctx.model, check=False, taps=ctx.engine), oc, heatmap_backend)
    else:
        zm = CuedZMask.build(cal, ctx.model, oc, heatmap_backend)
    if threshold is not None:
        zm.cfg = dataclasses.replace(zm.cfg, lambda0=float(threshold))
    return CuedZMaskDefense(zm.eval(), parse_refine(refine))
