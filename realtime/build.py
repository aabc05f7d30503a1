"""What ``python -m realtime.run`` runs: the model, its Z-Mask calibration and the backbone engine.

The backbone always runs through an engine from ``engines`` (``--engine torch|compile|onnxruntime|
tensorrt|torch_tensorrt``, ``--precision``), built for the pipeline's input size with the layers the
calibration taps; Z-Mask is then built on the engine's taps, and ``--defense none`` uses
``engine.plain``. Detectors (``list_models("detection")``) return per-image box dicts, which the
engines (built around one output tensor) do not carry, so they run eagerly on the module with hooked
taps: ``--engine torch --precision fp32`` only, for now. Any problem with the arguments, model, calibration or backend is a ``UsageError``
(one line, exit status 2).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from engines import EngineConfig, EngineError, build_engine, engine_class
from realtime.models import build_model
from realtime.models.registry import model_task
from realtime.pipeline import PipelineConfig, PlainEngine, ZMaskEngine

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMGSZ: Tuple[int, int] = (360, 480)


class UsageError(Exception):
    """A one-line problem with the arguments, model, calibration or engine (exit status 2)."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def calibration_path(args: argparse.Namespace) -> Path:
    """``--calibration``, else the shipped artifact of ``--model``."""
    return Path(args.calibration) if args.calibration else REPO / "calibration" / "shipped" / f"{args.model}.safetensors"


def weights_arg(text: Optional[str]) -> Optional[str]:
    """``--weights``: ``none`` keeps the random initialisation (development, tests), else as given."""
    return None if text is None or text.lower() == "none" else text


def load_model_and_calibration(args: argparse.Namespace, device: torch.device) -> Tuple[torch.nn.Module, Any]:
    """The model and (with ``--defense zmask``) its calibration, checked against each other."""
    try:
        model = build_model(args.model, weights=weights_arg(args.weights), device=device)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot load model '{args.model}': {exc}") from None
    if model_task(model) == "detection":
        check_detector_engine(args)
    if args.defense != "zmask":
        return model, None
    from calibration.artifact import load_calibration
    path = calibration_path(args)
    if not path.is_file():
        raise UsageError(f"calibration {path} not found; make one with `python -m calibration.fit --model "
                         f"{args.model}` or run with --defense none")
    try:
        cal = load_calibration(path, model)
    except (ValueError, KeyError) as exc:
        raise UsageError(f"--calibration {path}: {_one_line(exc)}") from None
    return model, cal


def make_engine(args: argparse.Namespace, model: torch.nn.Module, layers: Tuple[str, ...], device: torch.device,
                imgsz: Tuple[int, int]) -> Any:
    """The ``--engine``/``--precision`` backend for ``model`` with ``layers`` tapped, or a UsageError."""
    cfg = EngineConfig(backend=args.engine, device=str(device), precision=args.precision, input_shape=imgsz,
                       threads=args.threads)
    ok, why = engine_class(args.engine).available()
    if not ok:
        raise UsageError(f"--engine {args.engine} is not available: {why}")
    try:
        engine = build_engine(model, layers, cfg)
        engine.warmup(runs=1)          # first-call costs (compilation, autotuning) before the first frame
    except (EngineError, ValueError, KeyError) as exc:
        raise UsageError(f"--engine {args.engine}: {_one_line(exc)}") from None
    return engine


def check_detector_engine(args: argparse.Namespace) -> None:
    """Detectors run eagerly (the engines carry one output tensor, not per-image box dicts)."""
    if args.engine != "torch" or args.precision != "fp32":
        raise UsageError(f"detectors run on --engine torch for now, in fp32 (model '{args.model}' got "
                         f"--engine {args.engine} --precision {args.precision})")


def make_detector_backend(args: argparse.Namespace, model: torch.nn.Module, layers: Tuple[str, ...],
                          device: torch.device, imgsz: Tuple[int, int]) -> Dict[str, Any]:
    """Warm the detector up (first-call costs before the first frame) and describe how it runs."""
    with torch.inference_mode():
        model(torch.rand(1, 3, *imgsz, device=device))
    return {"engine": "torch", "device": str(device), "precision": "fp32", "layers": list(layers),
            "input_shape": list(imgsz), "model": args.model, "eager_module": True}


def baseline_runtime(args: argparse.Namespace, model: torch.nn.Module, engine: Any, device: torch.device,
                     cfg: PipelineConfig, engine_desc: Dict[str, Any]) -> Tuple[Any, Dict[str, Any]]:
    """A registered baseline defense (LGS, PatchZero, FPDA...) on the engine's forward pass
    (``engine`` None: on the module itself, as for detectors)."""
    from realtime.defense_step import DefenseStep
    from realtime.defenses.registry import DefenseContext, build_defense
    ctx = DefenseContext(model, args.model, device=device, engine=engine, data=args.data)
    try:
        defense = build_defense(args.defense, ctx)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UsageError(f"--defense {args.defense}: {_one_line(exc)}") from None
    desc = {**defense.describe(), "voting": cfg.voting.describe(), "engine": engine_desc}
    plain = engine.plain if engine is not None else model
    return DefenseStep(defense, cfg.voting, device, cfg.fail_closed, plain=plain, task=model_task(model)), desc


def build_runtime(args: argparse.Namespace, device: torch.device, cfg: PipelineConfig
                  ) -> Tuple[Any, Dict[str, Any], Tuple[int, int]]:
    """(pipeline step engine, description for the summary, model input size).

    A detector's description also carries ``task`` and ``class_names`` (what the sinks label boxes with)."""
    model, cal = load_model_and_calibration(args, device)
    task = model_task(model)
    cal_size: Optional[Tuple[int, int]] = tuple(int(v) for v in cal.input_size) if cal is not None else None
    imgsz = tuple(cfg.imgsz or cal_size or DEFAULT_IMGSZ)
    layers = tuple(cal.config.layers) if cal is not None else ()
    if task == "detection":
        engine, engine_desc = None, make_detector_backend(args, model, layers, device, imgsz)
        task_desc: Dict[str, Any] = {"task": task, "class_names": list(getattr(model, "class_names", ()))}
    else:
        engine = make_engine(args, model, layers, device, imgsz)
        engine_desc, task_desc = engine.describe(), {}
    if args.defense == "none":
        plain = engine.plain if engine is not None else model
        return (PlainEngine(plain, device, task=task), {"defense": "none", "engine": engine_desc, **task_desc},
                imgsz)
    if cal is None:
        step, desc = baseline_runtime(args, model, engine, device, cfg, engine_desc)
        return step, {**desc, **task_desc}, imgsz
    from realtime.defenses.registry import DefenseContext, build_defense
    ctx = DefenseContext(model, args.model, device=device, calibration=calibration_path(args), engine=engine)
    try:
        zm = build_defense("zmask", ctx, threshold=args.threshold).zm
    except (ValueError, KeyError) as exc:
        raise UsageError(f"--calibration {calibration_path(args)}: {_one_line(exc)}") from None
    desc = {"defense": "zmask", "calibration": str(calibration_path(args)), "lambda0": zm.cfg.lambda0,
            "calibration_lambda0": cal.config.lambda0, "calibration_fingerprint": cal.fingerprint,
            "calibration_model": cal.model_name, "voting": cfg.voting.describe(), "engine": engine_desc,
            **task_desc}
    return ZMaskEngine(zm, cfg.voting, device, cfg.fail_closed, cfg.audit, task=task), desc, imgsz
