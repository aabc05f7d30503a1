"""Z-Mask's first pass inside onnxruntime: the defended graph as an engine, and the router ZMask uses with it.

``DefendedOrtEngine(model, cal, cfg, ...)`` runs ``DefendedGraph`` (head ``logits``) in one session:
``engine(x) -> (logits, {"zmask/h_s", "zmask/h_d", "zmask/soft_mask", "zmask/score", "zmask/flag",
"zmask/keep_mask"})``, and ``engine.plain(x)`` runs the plain graph (logits only) for the second pass.
``GraphDetections`` is what ``ZMask(heatmap_backend=engine.zmask_backend)`` attaches: ``detect``
reads the graph's outputs instead of computing heatmaps (the same ``use/heatmaps/detect`` router
interface as the fused CUDA kernels). lambda0 and the mask threshold are baked into the graph; when
the ZMask's own values differ (``--threshold``), the flag and keep-mask are recomputed from d and M~.
``OrtEngine.defended(cal)`` builds one for the same model and config.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from realtime.defenses.zmask import Detection

from .base import Engine
from .config import EngineConfig, EngineError, check_device
from .defended_export import GraphFile, export_defended, export_plain
from .threads import session_options

PREFIX = "zmask/"


def _session(ort: Any, path: Any, cfg: EngineConfig) -> Any:
    try:
        return ort.InferenceSession(str(path), session_options(ort, cfg.threads), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EngineError(f"onnxruntime could not load {path}: {' '.join(str(exc).split())[:300]}") from exc


class DefendedOrtEngine(Engine):
    """The defended graph (first pass: logits + Z-Mask outputs) and the plain graph (second pass), CPU."""

    name = "onnxruntime"
    static_shape = True

    def __init__(self, model: nn.Module, cal: Any, cfg: EngineConfig, fingerprint: str, model_name: str,
                 mean_color: Optional[torch.Tensor]) -> None:
        super().__init__(cfg, (), mean_color, fingerprint, model_name)
        import onnxruntime as ort
        check_device(self.device, "onnxruntime")
        if self.device.type != "cpu" or cfg.precision != "fp32":
            raise EngineError("the defended onnxruntime graph runs on CPU in fp32 (use the fused kernels on CUDA)")
        self.lambda0 = float(cal.config.lambda0)
        self.mask_threshold = float(cal.config.mask_threshold)
        self.graph: GraphFile = export_defended(model, cal, cfg, fingerprint, model_name, head="logits")
        self.plain_graph: GraphFile = export_plain(model, cfg, fingerprint, model_name, head="logits")
        self.session = _session(ort, self.graph.path, cfg)
        self.plain_session = _session(ort, self.plain_graph.path, cfg)
        self._names = list(self.graph.outputs)
        self.info = {"providers": self.session.get_providers(), "defended_onnx": str(self.graph.path),
                     "plain_onnx": str(self.plain_graph.path), "onnx_cache_hit": self.graph.hit,
                     "intra_op_threads": session_options(ort, cfg.threads).intra_op_num_threads,
                     "heatmaps": "inside the onnxruntime graph"}

    def _run(self, x: torch.Tensor) -> List[torch.Tensor]:          # not used: _forward is overridden
        return [self.plain(x)]

    def _forward(self, x: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        x = self.check_input(x)
        outs = self.session.run(self._names, {self.graph.input_name: x.contiguous().numpy()})
        res = dict(zip(self._names, (torch.from_numpy(np.asarray(o)) for o in outs)))
        logits = res.pop("logits")
        return logits, {PREFIX + k: v for k, v in res.items()}

    def plain(self, x: Any) -> torch.Tensor:
        x = self.check_input(x)
        out = self.plain_session.run(None, {self.plain_graph.input_name: x.contiguous().numpy()})[0]
        return torch.from_numpy(out)

    @property
    def zmask_backend(self) -> Any:
        """``ZMask(heatmap_backend=...)`` factory reading this graph's outputs."""
        return functools.partial(GraphDetections, engine=self)


class GraphDetections:
    """ZMask heatmap router over the defended graph's outputs (``use`` / ``heatmaps`` / ``detect``)."""

    mode = "onnxruntime-graph"
    grows = True                   # the graph grows the keep-mask itself (DefendedGraph.grow)

    def __init__(self, zmask: Any, engine: DefendedOrtEngine) -> None:
        self._zm = weakref.ref(zmask)
        self.lambda0 = engine.lambda0
        self.mask_threshold = engine.mask_threshold

    def use(self, taps: Dict[str, torch.Tensor], with_fusion: bool) -> bool:
        return PREFIX + "score" in taps

    def heatmaps(self, taps: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return taps[PREFIX + "h_s"], taps[PREFIX + "h_d"]

    def detect(self, taps: Dict[str, torch.Tensor], size: Tuple[int, int]) -> Detection:
        zm = self._zm()
        soft, score = taps[PREFIX + "soft_mask"], taps[PREFIX + "score"]
        lam = zm.cfg.lambda0 if zm is not None else self.lambda0
        thr = zm.cfg.mask_threshold if zm is not None else self.mask_threshold
        if lam == self.lambda0 and thr == self.mask_threshold:
            flagged = taps[PREFIX + "flag"].bool()
            keep = taps[PREFIX + "keep_mask"]
            mask = (torch.ones(keep.shape, dtype=soft.dtype) if not bool(flagged.any())
                    else keep.to(soft.dtype))
        else:                                   # a threshold override: flag and mask from d and M~
            if zm.cfg.grow_threshold is not None:
                raise ValueError("a threshold override with a mask-growing calibration needs the fine map, which the "
                                 "defended graph does not output: run it with --engine torch, or re-export")
            flagged = score > lam
            mask = zm.input_mask(soft, flagged, size)
        return Detection(taps[PREFIX + "h_s"], taps[PREFIX + "h_d"], soft, score, flagged, mask)


__all__ = ["DefendedOrtEngine", "GraphDetections", "PREFIX"]
