"""Z-Mask (Rossolini et al., AAAI 2023): over-activation analysis, detection and masking of adversarial patches.

One forward pass gives the output and every hooked map; the maps become per-layer SPR heatmaps,
aggregated into H_S (shallow) and H_D (deep); the fusion block turns them into a soft mask and a
score d. Frames with d > lambda0 are flagged; their masked pixels are filled with the model's mean
colour (the same as zeroing in normalised space) and only those frames go through a second pass.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .fusion import FusionBlock
from .spr import SPRConfig, aggregate, cascade, resize, to_work, zscore
from .spr_fast import pooled_maps
from .stats import LayerStatsAccumulator
from realtime.core.taps import ActivationTaps, EngineTaps
from realtime.core.types import validate_input

Taps = Union[ActivationTaps, EngineTaps]
# A heatmap backend factory: called with the ZMask, returns a router with ``use(taps, with_fusion)``,
# ``heatmaps(taps)`` and ``detect(taps, size)`` (``kernels.heatmap_backend`` makes the fused one).
HeatmapBackend = Callable[["ZMask"], Any]


@dataclass
class ChannelStats:
    """Clean-data per-channel mean/std of each hooked layer at the working size, each (C,)."""
    mu: Dict[str, torch.Tensor]
    sigma: Dict[str, torch.Tensor]

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None
           ) -> "ChannelStats":
        """A copy on ``device`` (and ``dtype``)."""
        return ChannelStats({k: v.to(device=device, dtype=dtype) for k, v in self.mu.items()},
                            {k: v.to(device=device, dtype=dtype) for k, v in self.sigma.items()})

    def layers(self) -> List[str]:
        return list(self.mu)


@dataclass(frozen=True)
class ZMaskConfig:
    """Hooked layers (module names), SPR settings, detection threshold on d, and soft-mask threshold.

    ``check_finite`` rejects NaN/inf inputs (one device sync per call). ``grow_threshold`` (None: off)
    turns on mask growing on flagged frames: the thresholded soft mask is grown, ``grow_steps`` 3x3
    steps at the working size, over the cells whose fine shallow map (the shallow layers' smallest-kernel
    SPR term, max over layers) exceeds it -- so a poster found by its most over-activated part is masked
    whole, as far as it over-activates, and nothing unconnected to the detection is masked."""
    shallow: Tuple[str, ...]
    deep: Tuple[str, ...]
    spr: SPRConfig
    lambda0: float = 0.0
    mask_threshold: float = 0.5
    check_finite: bool = True
    grow_threshold: Optional[float] = None
    grow_steps: int = 24

    def __post_init__(self) -> None:
        if isinstance(self.shallow, str) or isinstance(self.deep, str):
            raise TypeError("shallow/deep must be sequences of layer names")
        if not self.shallow or not self.deep:
            raise ValueError("Z-Mask needs at least one shallow and one deep layer")
        object.__setattr__(self, "shallow", tuple(self.shallow))
        object.__setattr__(self, "deep", tuple(self.deep))

    @property
    def layers(self) -> Tuple[str, ...]:
        """Union of shallow and deep layers, first-seen order."""
        return tuple(dict.fromkeys((*self.shallow, *self.deep)))


@dataclass
class ZMaskResult:
    """Everything one Z-Mask call computed. Masks: 1 = keep the pixel, 0 = masked."""
    output: Any                      # first-pass model output
    h_s: torch.Tensor                # (N,1,HR,WR)
    h_d: torch.Tensor                # (N,1,HR,WR)
    soft_mask: torch.Tensor          # (N,1,HR,WR), M~ in [0,1]
    score: torch.Tensor              # (N,) over-activation score d
    flagged: torch.Tensor            # (N,) bool, d > lambda0
    mask: torch.Tensor               # (N,1,H,W) float at input resolution, all ones where not flagged
    defended_input: torch.Tensor     # (N,3,H,W)
    defended_output: Any = None      # second-pass output for flagged frames, first-pass otherwise;
                                     # None from ``analyse`` (no second pass)
    taps: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)   # the hooked maps used


class Detection(NamedTuple):
    """What the defense computes from one pass's taps (see ``ZMask.detect``)."""
    h_s: torch.Tensor
    h_d: torch.Tensor
    soft_mask: torch.Tensor
    score: torch.Tensor
    flagged: torch.Tensor
    mask: torch.Tensor


def merge_batch(first: Any, second: Any, index: torch.Tensor, n: int) -> Any:
    """``first`` (a batch of n) with the entries at ``index`` replaced by ``second`` (a batch of len(index)).

    Tensors whose first dim is n are merged row-wise; dicts and tuples/lists recurse, except a
    list/tuple of length n of per-image dicts (torchvision detection) whose items are replaced.
    Anything else is taken from ``first``.
    """
    if isinstance(first, torch.Tensor):
        if first.dim() > 0 and first.shape[0] == n and isinstance(second, torch.Tensor):
            return first.index_copy(0, index.to(first.device), second.to(first.dtype))
        return first
    if isinstance(first, dict):
        return {k: merge_batch(v, second[k], index, n) if k in second else v for k, v in first.items()}
    if isinstance(first, (list, tuple)):
        if len(first) == n and all(isinstance(v, dict) for v in first):
            items = list(first)
            for j, i in enumerate(index.tolist()):
                items[i] = second[j]
            return _same_sequence(first, items)
        return _same_sequence(first, [merge_batch(a, b, index, n) for a, b in zip(first, second)])
    return first


def _same_sequence(like: Sequence[Any], items: List[Any]) -> Any:
    """``items`` as the sequence type of ``like`` (list, tuple or namedtuple)."""
    if isinstance(like, list):
        return items
    return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)


class ZMask(nn.Module):
    """Z-Mask around a model (hooked once) or an engine that returns its own taps."""

    def __init__(self, model: Any, cfg: ZMaskConfig, stats: ChannelStats,
                 fusion: Optional[FusionBlock] = None, heatmap_backend: Union[str, HeatmapBackend] = "reference"
                 ) -> None:
        super().__init__()
        if not (heatmap_backend == "reference" or callable(heatmap_backend)):
            raise ValueError(f"heatmap_backend must be 'reference' or a backend factory "
                             f"(kernels.heatmap_backend('fused'|'auto')), got {heatmap_backend!r}")
        missing = [n for n in cfg.layers if n not in stats.mu or n not in stats.sigma]
        if missing:
            raise KeyError(f"channel statistics missing for layers {missing}; have {sorted(stats.mu)}")
        self.cfg = cfg
        self.stats = stats
        self.fusion = fusion if fusion is not None else FusionBlock()
        if isinstance(model, (ActivationTaps, EngineTaps)):
            self.taps: Taps = model
        else:
            self.taps = ActivationTaps(model, cfg.layers)
        inner = getattr(self.taps, "model", None)
        if isinstance(inner, nn.Module):
            self.model = inner           # a submodule, so .to()/.eval() reach it
        mc = self.taps.mean_color
        fill = mc.detach().clone().float() if mc is not None else torch.full((1, 3, 1, 1), 0.5)
        # (1,3,1,1) fill colour in [0,1] for masked pixels: the model's mean colour, else 0.5.
        self.register_buffer("mean_color", fill.reshape(1, 3, 1, 1), persistent=False)
        # Optional fused CUDA kernels: a factory from ``kernels`` (chosen by whoever builds the defense;
        # this layer never imports kernels). The reference below stays the CPU path and the oracle.
        self._fused: Any = None
        self.heatmap_backend = "reference"
        if heatmap_backend != "reference":
            self._fused = heatmap_backend(self)
            self.heatmap_backend = getattr(self._fused, "mode", "custom")

    def heatmaps_in_use(self) -> str:
        """What has computed the heatmaps so far ('reference', or what the attached backend reports)."""
        if self._fused is None:
            return "reference"
        in_use = getattr(self._fused, "in_use", None)
        return in_use() if callable(in_use) else self.heatmap_backend

    def _stat(self, name: str, feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mu, sigma = self.stats.mu[name], self.stats.sigma[name]
        if mu.numel() != feat.shape[1] or sigma.numel() != feat.shape[1]:
            raise ValueError(f"layer {name!r}: tap has {feat.shape[1]} channels but statistics have "
                             f"{mu.numel()} (mu) / {sigma.numel()} (sigma)")
        return (mu.to(device=feat.device, dtype=feat.dtype), sigma.to(device=feat.device, dtype=feat.dtype))

    def heatmaps(self, taps: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Aggregated (H_S, H_D), each (N,1,HR,WR), from a {layer: feature map} dict."""
        if self._fused is not None and self._fused.use(taps, with_fusion=False):
            return self._fused.heatmaps(taps)
        return self.reference_heatmaps(taps)

    def reference_heatmaps(self, taps: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``heatmaps`` in plain torch (differentiable, any device): the oracle of the fused kernels."""
        h_s, h_d, _ = self.reference_maps(taps, with_fine=False)
        return h_s, h_d

    def reference_maps(self, taps: Dict[str, torch.Tensor], with_fine: bool = True
                       ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(H_S, H_D, fine map): the fine map is the shallow layers' smallest-kernel SPR term, max over
        layers (N,1,HR,WR) -- the finest over-activation evidence, used to grow the mask (None unless
        ``with_fine``)."""
        return self.maps_from_terms(self.reference_terms(taps), with_fine)

    def reference_terms(self, taps: Dict[str, torch.Tensor]) -> Dict[Tuple[str, Tuple[int, int]], torch.Tensor]:
        """{(layer, kernel): SPR term p (N,1,HR,WR)} in plain torch, each (layer, kernel) pooled once."""
        spr = self.cfg.spr
        missing = [n for n in self.cfg.layers if n not in taps]
        if missing:
            raise KeyError(f"taps missing for layers {missing}; have {sorted(taps)}")
        # A layer in both S and D is z-scored once, and each (layer, kernel) term pooled once: with
        # the paper's settings K_D is a prefix of K_S, so H_D's terms come for free.
        terms: Dict[Tuple[str, Tuple[int, int]], torch.Tensor] = {}
        for name in self.cfg.layers:
            feat = taps[name]
            if feat.dim() != 4:
                raise ValueError(f"layer {name!r}: expected a (N,C,H,W) map, got {tuple(feat.shape)}")
            mu, sigma = self._stat(name, feat)
            z = zscore(to_work(feat, spr), mu, sigma)
            kernels = ((spr.kernels_shallow if name in self.cfg.shallow else ())
                       + (spr.kernels_deep if name in self.cfg.deep else ()))
            unique = list(dict.fromkeys(tuple(k) for k in kernels))
            # All kernels of a layer from shared running sums (spr_fast; equal to spr.pooled_map, tested).
            for k, p in zip(unique, pooled_maps(z, unique, spr.mode)):
                terms[(name, k)] = p
        return terms

    def maps_from_terms(self, terms: Dict[Tuple[str, Tuple[int, int]], torch.Tensor], with_fine: bool = True
                        ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(H_S, H_D, fine map) from the SPR terms: cascades per layer, pixel-wise max over layers."""
        spr = self.cfg.spr
        h_s = aggregate([cascade([terms[(n, tuple(k))] for k in spr.kernels_shallow])
                         for n in self.cfg.shallow])
        h_d = aggregate([cascade([terms[(n, tuple(k))] for k in spr.kernels_deep]) for n in self.cfg.deep])
        fine = (aggregate([terms[(n, tuple(spr.kernels_shallow[-1]))] for n in self.cfg.shallow])
                if with_fine else None)
        return h_s, h_d, fine

    def grow(self, soft: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        """M~ with the cells reached by growing its thresholded part over ``fine > grow_threshold`` set to 1
        (geodesic dilation, ``grow_steps`` 3x3 steps; not differentiable, used for the keep-mask only)."""
        seed = soft.detach() > self.cfg.mask_threshold
        allowed = fine.detach() > float(self.cfg.grow_threshold)
        for _ in range(self.cfg.grow_steps):
            nxt = (torch.nn.functional.max_pool2d(seed.to(soft.dtype), 3, 1, 1) > 0.5) & allowed | seed
            if bool(torch.equal(nxt, seed)):
                break
            seed = nxt
        return torch.where(seed, torch.ones_like(soft), soft.detach())

    def input_mask(self, soft: torch.Tensor, flagged: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """Binary keep-mask (N,1,H,W): 0 where M~ > threshold on flagged frames, 1 elsewhere.

        'same' mode: M~ is resized bilinearly to the input, then thresholded (pixel centres aligned,
        smooth edges); 'demo' mode: thresholded at the working size, then nearest-upsampled (as the
        demo does).
        """
        thr = self.cfg.mask_threshold
        if not bool(flagged.any()):          # the common clean frame: nothing to resize or threshold, and no
            # full-size buffer to fill either: a broadcast view of one 1 (read-only: in-place writes raise)
            return soft.new_ones(()).expand(soft.shape[0], 1, *size)
        if self.cfg.spr.mode == "same":
            hit = resize(soft.detach(), size, "bilinear") > thr
        else:
            hit = resize((soft.detach() > thr).to(soft.dtype), size, "nearest") > 0.5
        hit = hit & flagged.view(-1, 1, 1, 1)
        return (~hit).to(soft.dtype)

    def shield(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x * M + mean_color * (1 - M)``: masked pixels take the colour that normalises to zero."""
        fill = self.mean_color.to(device=x.device, dtype=x.dtype)
        m = mask.to(x.dtype)
        return x * m + fill * (1.0 - m)

    def detect(self, taps: Dict[str, torch.Tensor], size: Tuple[int, int],
               timer: Optional[Callable[[str], ContextManager]] = None) -> Detection:
        """The defense proper, from one pass's taps: heatmaps, fusion, score, flags, keep-mask at ``size``.

        Split from ``analyse`` so callers that time the backbone and the defense separately (the live
        pipeline, the defense interface) run exactly the same steps; ``timer(stage)`` (optional) wraps
        the heatmaps, fusion and mask stages (the fused kernels do all three under "heatmaps")."""
        timer = timer or (lambda _stage: nullcontext())
        growing = self.cfg.grow_threshold is not None
        # A router that grows the mask itself (the defended ONNX graph) keeps the whole detection; one that
        # does not (the fused kernels emit no fine map) leaves a growing calibration to the reference.
        if (self._fused is not None and (not growing or getattr(self._fused, "grows", False))
                and self._fused.use(taps, with_fusion=True)):
            with timer("heatmaps"):
                return self._fused.detect(taps, size)
        with timer("heatmaps"):
            if growing:                   # the fine map needs the terms: CPU kernel's or the reference's
                terms = self._fused.maybe_terms(taps) if hasattr(self._fused, "maybe_terms") else None
                h_s, h_d, fine = self.maps_from_terms(terms) if terms is not None else self.reference_maps(taps)
            else:
                h_s, h_d = self.heatmaps(taps)
        with timer("fusion"):
            soft, score = self.fusion(h_s, h_d)
            flagged = score.detach() > self.cfg.lambda0
        with timer("mask"):
            grown = self.grow(soft, fine) if growing and bool(flagged.any()) else soft
            mask = self.input_mask(grown, flagged, size)
        return Detection(h_s, h_d, soft, score, flagged, mask)

    def second_pass(self, defended: torch.Tensor, flagged: torch.Tensor, output: Any) -> Any:
        """``output`` with the flagged frames replaced by the model run on their shielded input."""
        index = torch.nonzero(flagged, as_tuple=False).flatten()
        if index.numel() == 0:
            return output
        second = self.taps.plain(defended.index_select(0, index))
        return merge_batch(output, second, index, defended.shape[0])

    def analyse(self, x: torch.Tensor) -> ZMaskResult:
        """First pass, heatmaps, soft mask, score, flags and the shielded input (no second pass).

        Differentiable from ``x`` to ``soft_mask``/``score`` when grad is enabled."""
        validate_input(x, self.cfg.check_finite)
        out, taps = self.taps(x)
        det = self.detect(taps, (x.shape[-2], x.shape[-1]))
        return ZMaskResult(output=out, h_s=det.h_s, h_d=det.h_d, soft_mask=det.soft_mask, score=det.score,
                           flagged=det.flagged, mask=det.mask, defended_input=self.shield(x, det.mask), taps=taps)

    def forward(self, x: torch.Tensor) -> ZMaskResult:
        """``analyse`` plus the second pass on the flagged frames only."""
        res = self.analyse(x)
        res.defended_output = self.second_pass(res.defended_input, res.flagged, res.output)
        return res


def fit_channel_stats(maps: Sequence[Dict[str, torch.Tensor]], cfg: SPRConfig) -> ChannelStats:
    """Pooled per-channel mean/std over all pixels of all given tap dicts, at the working size.

    The same estimator calibration streams over a dataset (``LayerStatsAccumulator``), for maps at hand.
    """
    if not maps:
        raise ValueError("fit_channel_stats needs at least one batch of taps")
    acc = LayerStatsAccumulator()
    for m in maps:
        acc.update({name: to_work(t.detach().float(), cfg) for name, t in m.items()})
    mu, sigma = acc.result()
    return ChannelStats(mu, sigma)


__all__ = ["ChannelStats", "Detection", "HeatmapBackend", "ZMask", "ZMaskConfig", "ZMaskResult", "fit_channel_stats", "merge_batch",
           "validate_input"]
