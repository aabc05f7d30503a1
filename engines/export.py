"""Export the whole defended model as one graph: ``python -m engines.export``.

    python -m engines.export --model ddrnet23_slim --format onnx --out exports/
    python -m engines.export --model bisenetv1 --calibration my.safetensors --format triton --out triton_repo/

``onnx`` writes ``<model>_defended.onnx`` (input ``input`` float32 (N,3,H,W) in [0,1] -> ``labels``
uint8 (N,H,W), ``score`` float32 (N,), ``flag`` bool (N,), ``keep_mask`` uint8 (N,1,H,W), 1 = keep),
``<model>_plain.onnx`` (input -> labels: the second pass, run on the shielded input
``x * keep + mean_color * (1 - keep)`` of flagged frames) and ``<model>_export.json`` (I/O, mean
colour, thresholds). ``triton`` writes a model repository of both (``engines.triton_repo``). The batch
axis is dynamic; H x W is the calibration's input size unless ``--imgsz`` says otherwise.
TensorRT: ``trtexec --onnx=<model>_defended.onnx --minShapes=input:1x3xHxW --optShapes=... --maxShapes=...``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from realtime.core.cli import parse_hw
from realtime.core.taps import model_mean_color
from realtime.defenses.artifact import load_calibration
from realtime.models import build_model, fingerprint, model_slug

from .config import EngineConfig
from .defended_export import export_defended, export_plain
from .triton_repo import TritonSettings, model_names, write_repository

REPO = Path(__file__).resolve().parents[1]


def describe(model_name: str, cal: Any, hw: Any, mean_color: Any, files: Dict[str, str]) -> Dict[str, Any]:
    h, w = hw
    return {"model": model_name, "input": {"name": "input", "dtype": "float32", "shape": ["N", 3, h, w],
                                           "range": [0, 1]},
            "defended_outputs": {"labels": ["uint8", ["N", h, w]], "score": ["float32", ["N"]],
                                 "flag": ["bool", ["N"]], "keep_mask": ["uint8", ["N", 1, h, w]]},
            "plain_outputs": {"labels": ["uint8", ["N", h, w]]},
            "lambda0": cal.config.lambda0, "mask_threshold": cal.config.mask_threshold,
            "mean_color": None if mean_color is None else [float(v) for v in mean_color.flatten()],
            "second_pass": "plain graph on x * keep + mean_color * (1 - keep), flagged frames only", "files": files}


def export(model_name: str, out: Path, fmt: str = "onnx", calibration: Optional[str] = None,
           imgsz: Optional[str] = None, opset: int = 17, max_batch: int = 8,
           settings: Optional[TritonSettings] = None) -> Dict[str, Any]:
    """Export ``model_name`` defended + plain into ``out``; returns the description written next to them."""
    model = build_model(model_name)
    slug = model_slug(model_name)
    path = Path(calibration) if calibration else REPO / "calibration" / "shipped" / f"{slug}.safetensors"
    cal = load_calibration(path, model)
    hw = parse_hw(imgsz, minimum=8) if imgsz else tuple(int(v) for v in cal.input_size)
    cfg = EngineConfig(backend="onnxruntime", input_shape=hw, opset=opset, max_batch=max_batch, rebuild=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(model)
    stage = out / ".export" if fmt == "triton" else out
    d = export_defended(model, cal, cfg, fp, model_name, head="labels", out=stage / f"{slug}_defended.onnx")
    p = export_plain(model, cfg, fp, model_name, head="labels", out=stage / f"{slug}_plain.onnx")
    files = {"defended": str(d.path), "plain": str(p.path)}
    if fmt == "triton":
        s = settings or TritonSettings(max_batch_size=max_batch,
                                       preferred_batch_sizes=tuple(b for b in (1, 4, 8) if b <= max_batch))
        folders = write_repository(out, slug, d.path, p.path, hw, s)
        files = {name: str(folder) for name, folder in folders.items()}
        shutil.rmtree(stage, ignore_errors=True)
    doc = describe(model_name, cal, hw, model_mean_color(model), files)
    doc["calibration"] = str(path)
    if fmt == "triton":
        doc["triton_models"] = list(model_names(slug))
    (out / f"{slug}_export.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engines.export", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", help="Z-Mask artifact (default calibration/shipped/<model>.safetensors)")
    p.add_argument("--format", choices=("onnx", "triton"), default="onnx")
    p.add_argument("--out", required=True, help="output folder (the Triton model repository for --format triton)")
    p.add_argument("--imgsz", help="HxW input (default: the calibration's input size)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--instance-kind", choices=("KIND_CPU", "KIND_GPU"), default="KIND_CPU")
    a = p.parse_args(argv)
    settings = None
    if a.format == "triton":
        settings = TritonSettings(max_batch_size=a.max_batch, instance_kind=a.instance_kind,
                                  preferred_batch_sizes=tuple(b for b in (1, 4, 8) if b <= a.max_batch))
    try:
        doc = export(a.model, Path(a.out), a.format, a.calibration, a.imgsz, a.opset, a.max_batch, settings)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps(doc["files"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
