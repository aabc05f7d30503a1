"""ONNX files of the defended graph and of the plain graph (``defended_graph``), keyed and cached on disk.

``export_defended(model, cal, cfg, fingerprint, model_name, head)`` writes the whole Z-Mask first
pass as one graph; ``export_plain(model, cfg, fingerprint, model_name, head)`` the bare model with the
same head (the second pass). Both take input ``input`` float32 (N,3,H,W) in [0,1], H and W fixed at
``cfg.input_shape``, the batch axis dynamic. The cache key covers the model fingerprint, the whole
calibration (layers, statistics, SPR, fusion, thresholds), input shape, opset, head and torch; files
are written atomically, like ``onnx_export``. The ``zmask.*`` metadata records what the graph is.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .cache import atomic_path, cache_key, safe_name
from .config import EngineConfig, EngineError
from .defended_graph import DefendedGraph, PlainGraph, output_names
from .onnx_export import INPUT_NAME, read_metadata, save_with_metadata

FORMAT = "zmask-defended-onnx/1"


@dataclass(frozen=True)
class GraphFile:
    """An exported graph: path, cache key, head, output names, whether it came from the cache."""
    path: Path
    key: str
    head: str
    outputs: Tuple[str, ...]
    hit: bool
    input_name: str = INPUT_NAME


def calibration_digest(cal: Any) -> str:
    """SHA-256 (16 hex) of everything in a calibration that shapes the graph."""
    h = hashlib.sha256()
    c = cal.config
    h.update(json.dumps({"shallow": list(c.shallow), "deep": list(c.deep), "lambda0": c.lambda0,
                         "mask_threshold": c.mask_threshold, "work": list(c.spr.work_size),
                         "ks": [list(k) for k in c.spr.kernels_shallow], "kd": [list(k) for k in c.spr.kernels_deep],
                         "mode": c.spr.mode, "fusion": cal.fusion,
                         **({"grow": [c.grow_threshold, c.grow_steps]} if c.grow_threshold is not None else {})},
                        sort_keys=True).encode())
    for n in c.layers:
        h.update(cal.stats.mu[n].detach().float().cpu().numpy().tobytes())
        h.update(cal.stats.sigma[n].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def export_module(module: nn.Module, outputs: Tuple[str, ...], cfg: EngineConfig, out: Path,
                  meta: Dict[str, str]) -> None:
    """``torch.onnx.export`` of ``module`` (fp32, CPU) with a dynamic batch axis, checked, metadata attached."""
    import onnx
    module = module.to("cpu").float().eval()
    dummy = torch.rand(max(2, cfg.batch), 3, *cfg.input_shape)
    axes = {n: {0: "batch"} for n in (INPUT_NAME, *outputs)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")         # TracerWarnings on shape checks; the legacy-exporter notice
        torch.onnx.export(module, (dummy,), str(out), input_names=[INPUT_NAME], output_names=list(outputs),
                          dynamic_axes=axes, opset_version=cfg.opset, dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(out))
    with torch.no_grad():
        shapes = [tuple(t.shape[1:]) for t in _as_tuple(module(dummy[:1]))]
    for value, shape in zip(proto.graph.output, shapes):   # static per-frame dims, symbolic batch
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        dims.add().dim_param = "batch"
        for d in shape:
            dims.add().dim_value = int(d)
    onnx.checker.check_model(proto)
    save_with_metadata(proto, meta, out)


def _as_tuple(out: Any) -> Tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _cached(kind: str, make: Any, outputs: Tuple[str, ...], parts: Dict[str, Any], cfg: EngineConfig,
            model_name: str, head: str, out: Optional[Path]) -> GraphFile:
    key = cache_key(parts)
    path = Path(out) if out is not None else cfg.cache_root() / "onnx" / f"{safe_name(model_name)}-{kind}-{key}.onnx"
    if path.is_file() and not cfg.rebuild and read_metadata(path).get("zmask.key") == key:
        return GraphFile(path, key, head, outputs, hit=True)
    meta = {"zmask.format": FORMAT, "zmask.key": key, "zmask.kind": kind, "zmask.head": head,
            "zmask.outputs": json.dumps(list(outputs)), **{f"zmask.{k}": json.dumps(v) if not isinstance(v, str)
                                                           else v for k, v in parts.items() if k != "format"}}
    try:
        with atomic_path(path) as tmp:
            export_module(make(), outputs, cfg, tmp, meta)
    except Exception as exc:
        raise EngineError(f"ONNX export of the {kind} graph of {model_name} failed: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}") from exc
    return GraphFile(path, key, head, outputs, hit=False)


def export_defended(model: nn.Module, cal: Any, cfg: EngineConfig, fingerprint: str, model_name: str,
                    head: str = "labels", out: Optional[Path] = None) -> GraphFile:
    """The defended graph (``DefendedGraph``) of ``model`` with calibration ``cal`` as ONNX (cached)."""
    outputs = output_names(head)
    parts = {"format": FORMAT, "kind": "defended", "fingerprint": fingerprint, "calibration": calibration_digest(cal),
             "input_shape": list(cfg.input_shape), "opset": int(cfg.opset), "head": head,
             "lambda0": float(cal.config.lambda0), "mask_threshold": float(cal.config.mask_threshold),
             "torch": torch.__version__.split("+")[0]}

    def make() -> nn.Module:
        return DefendedGraph(model, cal.config, cal.stats, cal.fusion, head=head, probe_shape=cfg.input_shape)
    return _cached("defended", make, outputs, parts, cfg, model_name, head, out)


def export_plain(model: nn.Module, cfg: EngineConfig, fingerprint: str, model_name: str, head: str = "labels",
                 out: Optional[Path] = None) -> GraphFile:
    """The bare model with the same head (``PlainGraph``): the second-pass graph (cached)."""
    name = "labels" if head == "labels" else "logits"
    parts = {"format": FORMAT, "kind": "plain", "fingerprint": fingerprint, "input_shape": list(cfg.input_shape),
             "opset": int(cfg.opset), "head": head, "torch": torch.__version__.split("+")[0]}
    return _cached("plain", lambda: PlainGraph(model, head=head), (name,), parts, cfg, model_name, head, out)


__all__ = ["FORMAT", "GraphFile", "calibration_digest", "export_defended", "export_module", "export_plain"]
