"""The whole defended model as one traceable module: frame -> output, score d, flag, keep-mask (docs/zmask.md 3-4).

``DefendedGraph(model, calibration)`` runs the backbone with its taps as real outputs (``TapModule``)
and computes Z-Mask's first-pass analysis in ops that every deployment stack parses as standard ONNX
(Mul/Add, Resize, AvgPool, ReduceL1, ReduceMax, Max, Sigmoid/Tanh, ReduceSum, Greater, ArgMax, Cast),
so ``torch.onnx.export`` gives ONE graph for onnxruntime, TensorRT (trtexec / its ONNX parser),
DeepStream's nvinfer and Triton. The batch axis is dynamic; everything is per frame.

Same arithmetic as the plain-torch reference (``ZMask.reference_heatmaps`` + ``FusionBlock`` +
``ZMask.input_mask``), reordered only where it is exact in real arithmetic:

* the z-score ``(R(h) - mu) / (sigma + eps)`` is applied BEFORE the bilinear resize when the tap is
  smaller than the working grid (bilinear weights sum to one, so it commutes), as ``h * a + b``;
* the box means are ``AvgPool`` with ``count_include_pad=0``, rows then columns: exactly
  ``spr.box_mean`` in ``same`` mode (the oracle ``spr_fast`` is tested against);
* the channel mean of ``|box|`` is one ``ReduceL1`` over channels times ``1/C``.

Heads: ``labels`` (deployment: ``labels`` uint8 (N,H,W) argmax at input size, ``score`` (N,),
``flag`` bool (N,), ``keep_mask`` uint8 (N,1,H,W), 1 = keep) or ``logits`` (the engine's first pass:
float logits plus ``h_s``, ``h_d``, ``soft_mask`` on the grid, ``score``, ``flag``, ``keep_mask``).
The second pass is the plain graph (``PlainGraph``) run on the shielded input of flagged frames.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .tapped import TapModule

HEADS = ("labels", "logits")
EPS = 1e-5                                  # spr.zscore's eps
LABEL_OUTPUTS = ("labels", "score", "flag", "keep_mask")
LOGIT_OUTPUTS = ("logits", "h_s", "h_d", "soft_mask", "score", "flag", "keep_mask")


def output_names(head: str) -> Tuple[str, ...]:
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    return LABEL_OUTPUTS if head == "labels" else LOGIT_OUTPUTS


def box_mean_same(z: torch.Tensor, kernel: Tuple[int, int]) -> torch.Tensor:
    """``spr.box_mean(z, kernel, 'same')``: clipped window centred on the pixel, mean of what it covers."""
    ph, pw = int(kernel[0]) // 2, int(kernel[1]) // 2
    if ph:
        z = F.avg_pool2d(z, (2 * ph + 1, 1), stride=1, padding=(ph, 0), count_include_pad=False)
    if pw:
        z = F.avg_pool2d(z, (1, 2 * pw + 1), stride=1, padding=(0, pw), count_include_pad=False)
    return z


def box_mean_demo(z: torch.Tensor, kernel: Tuple[int, int]) -> torch.Tensor:
    """``spr.box_mean(z, kernel, 'demo')``: unpadded pooling (the map shrinks by k-1)."""
    return F.avg_pool2d(F.avg_pool2d(z, (int(kernel[0]), 1), stride=1), (1, int(kernel[1])), stride=1)


def labels_of(logits: torch.Tensor) -> torch.Tensor:
    """(N,C,H,W) logits -> (N,H,W) uint8 class map (ONNX ArgMax + Cast)."""
    return logits.argmax(1).to(torch.uint8)


class _Layer(nn.Module):
    """One hooked layer's z-score constants and the kernels its heatmap terms use."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor, kernels: Sequence[Tuple[int, int]]) -> None:
        super().__init__()
        scale = 1.0 / (sigma.detach().double() + EPS)
        self.register_buffer("a", scale.float().view(1, -1, 1, 1))
        self.register_buffer("b", (-mu.detach().double() * scale).float().view(1, -1, 1, 1))
        self.kernels: List[Tuple[int, int]] = list(dict.fromkeys(tuple(int(v) for v in k) for k in kernels))


class DefendedGraph(nn.Module):
    """``forward(x)`` -> the ``head``'s outputs (``output_names(head)``) for a float (N,3,H,W) batch in [0,1].

    ``cfg``: a ``ZMaskConfig``; ``stats``: its ``ChannelStats``; ``fusion``: the 8 scalars (dict).
    lambda0 and the M~ threshold are baked in (the flag and keep-mask are graph outputs)."""

    def __init__(self, model: nn.Module, cfg: Any, stats: Any, fusion: Dict[str, float], head: str = "labels",
                 probe_shape: Tuple[int, int] = (64, 64), conv_terms: bool = True) -> None:
        super().__init__()
        self.head = head
        self.names = output_names(head)
        self.cfg = cfg
        spr = cfg.spr
        self.work = (int(spr.work_size[0]), int(spr.work_size[1]))
        self.mode = spr.mode
        self.layer_names = tuple(cfg.layers)
        self.tapped = TapModule(model, self.layer_names, probe_shape=probe_shape)
        self.zs = nn.ModuleList()
        for name in self.layer_names:
            kernels = ((spr.kernels_shallow if name in cfg.shallow else ())
                       + (spr.kernels_deep if name in cfg.deep else ()))
            self.zs.append(_Layer(stats.mu[name], stats.sigma[name], kernels))
        self.fusion = {k: float(v) for k, v in fusion.items()}
        self.lambda0 = float(cfg.lambda0)
        self.mask_threshold = float(cfg.mask_threshold)
        self.conv_terms = conv_terms and self.mode == "same"
        self.ones = nn.ParameterDict()          # constant conv weights and inverse counts (frozen)
        for lay in self.zs:
            c = int(lay.a.shape[1])
            for kh, kw in lay.kernels:
                ph, pw = kh // 2, kw // 2
                for key, shape in ((f"r{2 * ph + 1}_{c}", (c, 1, 2 * ph + 1, 1)),
                                   (f"c{2 * pw + 1}_{c}", (c, 1, 1, 2 * pw + 1)), (f"s_{c}", (1, c, 1, 1))):
                    self.ones[key] = nn.Parameter(torch.ones(shape), requires_grad=False)
                self.ones[f"n{ph}_{pw}_{c}"] = nn.Parameter(self._inv_count((kh, kw), c), requires_grad=False)

    # ---------------------------------------------------------------- heatmaps
    def _work(self, t: torch.Tensor, lay: _Layer) -> torch.Tensor:
        """z-score on the working grid; z-scored before the resize when that is the smaller map."""
        interp = "bilinear" if self.mode == "same" else "nearest"
        same = tuple(t.shape[-2:]) == self.work
        small = t.shape[-2] * t.shape[-1] <= self.work[0] * self.work[1]
        if same:
            z = t * lay.a + lay.b
        else:
            kw = {"align_corners": False} if interp == "bilinear" else {}
            if small:
                z = F.interpolate(t * lay.a + lay.b, size=self.work, mode=interp, **kw)
            else:
                z = F.interpolate(t, size=self.work, mode=interp, **kw) * lay.a + lay.b
        # A static (C, HR, WR) in the graph (a Resize to computed sizes loses it): onnxruntime then
        # runs the pools in its blocked NCHWc layout (vectorised over channels; ~3x faster measured).
        return z.reshape(-1, lay.a.shape[1], *self.work)

    def _term(self, z: torch.Tensor, k: Tuple[int, int], zsum: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = z.shape[1]
        if self.mode == "same" and zsum is not None:
            return self._term_conv(z, k, zsum)
        if self.mode == "same":
            return torch.norm(box_mean_same(z, k), p=1, dim=1, keepdim=True) * (1.0 / c)
        p = torch.norm(box_mean_demo(z, k), p=1, dim=1, keepdim=True) * (1.0 / c)
        return F.interpolate(p, size=self.work, mode="nearest")

    def _term_conv(self, z: torch.Tensor, k: Tuple[int, int], zsum: torch.Tensor) -> torch.Tensor:
        """``mean_c |box_mean_k(z_c)|`` as convolutions, exact in real arithmetic ('same' mode).

        With S_c the clipped window SUM (zero padding) and n the pixel count of the clipped window
        (the same for every channel), box_mean = S_c / n and |S| = 2 relu(S) - S, so
        ``sum_c |S_c| = 2 sum_c relu(S_c) - box_sum(sum_c z_c)``. The sums are depthwise convolutions
        with ones (rows, then columns with the ReLU fused), the channel sum a 1x1 convolution: a chain
        onnxruntime keeps in its blocked NCHWc layout (no reorders per term, no strided channel
        reduction) and TensorRT fuses. ``sum_c z_c`` is box-summed on one channel only."""
        c = z.shape[1]
        ph, pw = int(k[0]) // 2, int(k[1]) // 2
        rows, cols = self.ones[f"r{2 * ph + 1}_{c}"], self.ones[f"c{2 * pw + 1}_{c}"]
        s = F.conv2d(F.conv2d(z, rows, padding=(ph, 0), groups=c), cols, padding=(0, pw), groups=c)
        pos = F.conv2d(F.relu(s), self.ones[f"s_{c}"])
        lin = F.conv2d(F.conv2d(zsum, rows[:1], padding=(ph, 0)), cols[:1], padding=(0, pw))
        return (2.0 * pos - lin) * self.ones[f"n{ph}_{pw}_{c}"]

    def _inv_count(self, k: Tuple[int, int], c: int) -> torch.Tensor:
        """(1,1,HR,WR) 1 / (C * pixels in the clipped window) for kernel k."""
        def count(n: int, r: int) -> torch.Tensor:
            i = torch.arange(n, dtype=torch.float64)
            return (i + r + 1).clamp(max=n) - (i - r).clamp(min=0)
        h, w = self.work
        n = count(h, int(k[0]) // 2).view(-1, 1) * count(w, int(k[1]) // 2).view(1, -1)
        return (1.0 / (c * n)).float().view(1, 1, h, w)

    def heatmaps(self, taps: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        spr, cfg = self.cfg.spr, self.cfg
        terms: Dict[Tuple[str, Tuple[int, int]], torch.Tensor] = {}
        for name, t, lay in zip(self.layer_names, taps, self.zs):
            z = self._work(t.float(), lay)
            zsum = z.sum(dim=1, keepdim=True) if self.conv_terms else None
            for k in lay.kernels:
                terms[(name, k)] = self._term(z, k, zsum)

        def cascade(name: str, kernels: Sequence[Tuple[int, int]]) -> torch.Tensor:
            heat = terms[(name, tuple(kernels[0]))]
            for k in kernels[1:]:
                peak = heat.amax(dim=(1, 2, 3), keepdim=True)
                heat = heat / (1.0 + peak) * terms[(name, tuple(k))]
            return heat

        def aggregate(maps: List[torch.Tensor]) -> torch.Tensor:
            out = maps[0]
            for m in maps[1:]:
                out = torch.maximum(out, m)
            return out

        h_s = aggregate([cascade(n, spr.kernels_shallow) for n in cfg.shallow])
        h_d = aggregate([cascade(n, spr.kernels_deep) for n in cfg.deep])
        self._fine = aggregate([terms[(n, tuple(spr.kernels_shallow[-1]))] for n in cfg.shallow])
        return h_s, h_d

    def grow(self, soft: torch.Tensor) -> torch.Tensor:
        """``ZMask.grow`` unrolled (a fixed ``grow_steps`` MaxPool steps; extra steps after convergence are
        no-ops, so this equals the reference's early exit)."""
        seed = soft > self.mask_threshold
        allowed = self._fine > float(self.cfg.grow_threshold)
        for _ in range(int(self.cfg.grow_steps)):
            seed = torch.logical_or(torch.logical_and(F.max_pool2d(seed.float(), 3, 1, 1) > 0.5, allowed), seed)
        return torch.where(seed, torch.ones_like(soft), soft)

    # ---------------------------------------------------------------- fusion, flag, mask
    def fuse(self, h_s: torch.Tensor, h_d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        f = self.fusion
        g = torch.sigmoid(f["w1"] * torch.tanh(f["w2"] * h_d + f["b2"]) + f["b1"])
        soft = torch.sigmoid(f["w4"] * torch.tanh(f["w3"] * (h_s * g) + f["b3"]) + f["b4"])
        score = (h_s * h_d * soft).sum(dim=(1, 2, 3)) / (1.0 + soft.sum(dim=(1, 2, 3)))
        return soft, score

    def keep_mask(self, soft: torch.Tensor, flag: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """uint8 (N,1,H,W): 0 where M~ > threshold on flagged frames (``ZMask.input_mask``)."""
        if self.mode == "same":
            hit = F.interpolate(soft, size=size, mode="bilinear", align_corners=False) > self.mask_threshold
        else:
            hit = F.interpolate((soft > self.mask_threshold).float(), size=size, mode="nearest") > 0.5
        hit = hit & flag.view(-1, 1, 1, 1)
        return torch.logical_not(hit).to(torch.uint8)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        logits, *taps = self.tapped(x)
        h_s, h_d = self.heatmaps(taps)
        soft, score = self.fuse(h_s, h_d)
        flag = score > self.lambda0
        grown = self.grow(soft) if getattr(self.cfg, "grow_threshold", None) is not None else soft
        keep = self.keep_mask(grown, flag, (x.shape[-2], x.shape[-1]))
        if self.head == "labels":
            return labels_of(logits), score, flag, keep
        return logits, h_s, h_d, soft, score, flag, keep


class PlainGraph(nn.Module):
    """The bare model with the same head: ``labels`` (uint8 (N,H,W)) or ``logits``; the second-pass graph."""

    def __init__(self, model: nn.Module, head: str = "labels") -> None:
        super().__init__()
        output_names(head)
        self.head = head
        self.tapped = TapModule(model, ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.tapped(x)[0]
        return labels_of(logits) if self.head == "labels" else logits


__all__ = ["DefendedGraph", "HEADS", "LABEL_OUTPUTS", "LOGIT_OUTPUTS", "PlainGraph", "box_mean_demo",
           "box_mean_same", "labels_of", "output_names"]
