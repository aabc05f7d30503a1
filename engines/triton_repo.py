"""A Triton Inference Server model repository for the defended graph and the plain graph.

    <repo>/zmask_<model>/config.pbtxt      defended: input -> labels, score, flag, keep_mask
    <repo>/zmask_<model>/1/model.onnx
    <repo>/<model>_plain/config.pbtxt      plain (second pass on the shielded input): input -> labels
    <repo>/<model>_plain/1/model.onnx

Both use the ``onnxruntime_onnx`` platform (the same file runs under Triton's TensorRT backend after
``trtexec --onnx=model.onnx --saveEngine=model.plan``). ``max_batch_size`` > 0, so every ``dims`` is per
frame; per-frame scalars (score, flag) are ``dims: [ 1 ]`` reshaped to ``[ ]``. Dynamic batching is on:
every output of the defended graph is computed frame by frame, so batching frames is exact.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

# name -> (Triton data type, per-frame dims as a function of (H, W), reshape to [] when a scalar)
Spec = Tuple[str, str, Tuple[int, ...], bool]


def defended_outputs(h: int, w: int) -> List[Spec]:
    return [("labels", "TYPE_UINT8", (h, w), False), ("score", "TYPE_FP32", (1,), True),
            ("flag", "TYPE_BOOL", (1,), True), ("keep_mask", "TYPE_UINT8", (1, h, w), False)]


def plain_outputs(h: int, w: int) -> List[Spec]:
    return [("labels", "TYPE_UINT8", (h, w), False)]


@dataclass(frozen=True)
class TritonSettings:
    """Repository-wide settings: batch limit, dynamic batching, where instances run."""
    max_batch_size: int = 8
    preferred_batch_sizes: Tuple[int, ...] = (1, 4, 8)
    max_queue_delay_us: int = 2000
    instance_kind: str = "KIND_CPU"          # KIND_GPU on a GPU server
    instance_count: int = 1
    extra: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.instance_kind not in ("KIND_CPU", "KIND_GPU"):
            raise ValueError(f"instance_kind must be KIND_CPU or KIND_GPU, got {self.instance_kind!r}")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ValueError(f"preferred batch sizes {bad} are outside 1..{self.max_batch_size}")


def _tensor(name: str, dtype: str, dims: Sequence[int], scalar: bool) -> str:
    body = f'    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(str(d) for d in dims)} ]\n'
    if scalar:
        body += "    reshape: { shape: [ ] }\n"
    return "  {\n" + body + "  }"


def config_pbtxt(name: str, input_hw: Tuple[int, int], outputs: Sequence[Spec], s: TritonSettings) -> str:
    """The text of one model's ``config.pbtxt`` (Triton's protobuf text format)."""
    h, w = input_hw
    inputs = [_tensor("input", "TYPE_FP32", (3, h, w), False)]
    outs = [_tensor(*o) for o in outputs]
    prefs = ", ".join(str(b) for b in s.preferred_batch_sizes)
    sep = ",\n"
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {s.max_batch_size}\n'
            f"input [\n{sep.join(inputs)}\n]\noutput [\n{sep.join(outs)}\n]\n"
            f"dynamic_batching {{\n  preferred_batch_size: [ {prefs} ]\n"
            f"  max_queue_delay_microseconds: {s.max_queue_delay_us}\n}}\n"
            f"instance_group [\n  {{\n    count: {s.instance_count}\n    kind: {s.instance_kind}\n  }}\n]\n"
            "version_policy: { latest: { num_versions: 1 } }\n")


def model_names(slug: str) -> Tuple[str, str]:
    """(defended, plain) model names in the repository."""
    return f"zmask_{slug}", f"{slug}_plain"


def write_repository(root: Path, slug: str, defended_onnx: Path, plain_onnx: Path, input_hw: Tuple[int, int],
                     settings: TritonSettings = TritonSettings(), version: int = 1) -> Dict[str, Path]:
    """Write both models (config + versioned model.onnx) under ``root``; returns {model name: its folder}."""
    root = Path(root)
    out: Dict[str, Path] = {}
    h, w = input_hw
    for name, src, outputs in zip(model_names(slug), (defended_onnx, plain_onnx),
                                  (defended_outputs(h, w), plain_outputs(h, w))):
        folder = root / name
        (folder / str(version)).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / str(version) / "model.onnx")
        (folder / "config.pbtxt").write_text(config_pbtxt(name, input_hw, outputs, settings))
        out[name] = folder
    return out


__all__ = ["TritonSettings", "config_pbtxt", "defended_outputs", "model_names", "plain_outputs",
           "write_repository"]
