"""ONNX export of a tapped model, cached on disk: the file the onnxruntime and TensorRT backends run.

The graph has one input ``input`` (N,3,H,W) in [0,1] and outputs ``logits`` then one named output per
tapped layer (``tap_<layer with _ for dots>``; the layer -> name mapping is stored in the model's
metadata). The batch axis is dynamic; H and W are fixed at export. The file is keyed by the model
fingerprint, layers, input shape, opset, precision and torch version, written atomically, and
re-exported when the key changes or the cached file does not carry the expected key.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .cache import atomic_path, cache_key, safe_name
from .config import EngineConfig, EngineError
from .tapped import TapModule, onnx_names

FORMAT = "zmask-engine-onnx/1"
INPUT_NAME = "input"
LOGITS_NAME = "logits"
EXPORT_PRECISIONS = ("fp32", "fp16")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnnxArtifact:
    """An exported graph: where it is, its I/O names, and whether it came from the cache."""
    path: Path
    key: str
    precision: str
    tap_names: Dict[str, str]        # layer -> graph output name, in layer order
    hit: bool

    @property
    def input_name(self) -> str:
        return INPUT_NAME

    @property
    def output_names(self) -> Tuple[str, ...]:
        return (LOGITS_NAME, *self.tap_names.values())


def onnx_key_parts(fingerprint: str, layers: Sequence[str], input_shape: Tuple[int, int], opset: int,
                   precision: str) -> Dict[str, object]:
    """Everything the exported graph depends on (see ``cache_key``)."""
    return {"format": FORMAT, "fingerprint": fingerprint, "layers": list(layers),
            "input_shape": list(input_shape), "opset": int(opset), "precision": precision,
            "torch": torch.__version__.split("+")[0]}


def onnx_path(cfg: EngineConfig, model_name: str, key: str) -> Path:
    return cfg.cache_root() / "onnx" / f"{safe_name(model_name)}-{key}.onnx"


def save_with_metadata(proto: "onnx.ModelProto", meta: Dict[str, str], out: Path) -> None:
    """Replace the model's metadata with ``meta`` (what cache hits are checked against) and save it."""
    import onnx
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(out))


def read_metadata(path: Path) -> Dict[str, str]:
    """The ``zmask.*`` metadata of an ONNX file ({} when unreadable)."""
    import onnx
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # a foreign or damaged file: treated as a cache miss
        return {}
    return {p.key: p.value for p in proto.metadata_props if p.key.startswith("zmask.")}


def _export(model: nn.Module, layers: Sequence[str], cfg: EngineConfig, precision: str, out: Path,
            meta: Dict[str, str]) -> None:
    import onnx
    tapped = TapModule(model, layers, probe_shape=cfg.input_shape).to("cpu")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    tapped = tapped.to(dtype)
    names = onnx_names(tapped.layers)
    outputs = [LOGITS_NAME, *names.values()]
    dummy = torch.rand(cfg.batch, 3, *cfg.input_shape, dtype=dtype)
    axes = {n: {0: "batch"} for n in [INPUT_NAME, *outputs]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # TracerWarnings on shape checks; the legacy-exporter notice
        torch.onnx.export(tapped, (dummy,), str(out), input_names=[INPUT_NAME], output_names=outputs,
                          dynamic_axes=axes, opset_version=cfg.opset, dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    save_with_metadata(proto, meta, out)


def export_onnx(model: nn.Module, layers: Sequence[str], cfg: EngineConfig, fingerprint: str, model_name: str,
                precision: Optional[str] = None) -> OnnxArtifact:
    """The cached ONNX file for (model, layers, cfg), exported now when missing, stale or ``cfg.rebuild``."""
    try:
        import onnx  # noqa: F401
    except Exception as exc:
        raise EngineError(f"ONNX export needs the onnx package: {exc}") from None
    precision = precision or cfg.precision
    if precision not in EXPORT_PRECISIONS:
        raise EngineError(f"ONNX export supports {', '.join(EXPORT_PRECISIONS)}, not {precision}")
    layers = tuple(dict.fromkeys(layers))
    key = cache_key(onnx_key_parts(fingerprint, layers, cfg.input_shape, cfg.opset, precision))
    path = onnx_path(cfg, model_name, key)
    names = onnx_names(layers)
    if path.is_file() and not cfg.rebuild:
        meta = read_metadata(path)
        if meta.get("zmask.key") == key and json.loads(meta.get("zmask.tap_names", "{}")) == names:
            return OnnxArtifact(path, key, precision, names, hit=True)
        log.warning("cached ONNX %s does not carry key %s; exporting again", path, key)
    meta = {"zmask.format": FORMAT, "zmask.key": key, "zmask.model": model_name, "zmask.fingerprint": fingerprint,
            "zmask.layers": json.dumps(list(layers)), "zmask.tap_names": json.dumps(names),
            "zmask.input_shape": json.dumps(list(cfg.input_shape)), "zmask.precision": precision,
            "zmask.opset": str(cfg.opset), "zmask.torch": torch.__version__}
    try:
        with atomic_path(path) as tmp:
            _export(model, layers, cfg, precision, tmp, meta)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"ONNX export of {model_name} failed: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}") from exc
    return OnnxArtifact(path, key, precision, names, hit=False)
