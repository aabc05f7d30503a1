"""What ``python -m realtime.run`` runs: the model, its Z-Mask calibration and the backbone engine.

The backbone always runs through an engine from ``engines`` (``--engine torch|compile|onnxruntime|
tensorrt|torch_tensorrt``, ``--precision``), built for the pipeline's input size with the layers the
calibration taps; Z-Mask is then built on the engine's taps, and ``--defense none`` uses
``engine.plain``. Any problem with the arguments, model, calibration or backend is a ``UsageError``
(one line, exit status 2).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from engines import EngineConfig, EngineError, build_engine, engine_class
from realtime.models import build_model
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


def load_model_and_calibration(args: argparse.Namespace, device: torch.device) -> Tuple[torch.nn.Module, Any]:
    """The model and (with ``--defense zmask``) its calibration, checked against each other."""
    try:
        model = build_model(args.model, weights=args.weights, device=device)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot load model '{args.model}': {exc}") from None
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


def baseline_runtime(args: argparse.Namespace, model: torch.nn.Module, engine: Any, device: torch.device,
                     cfg: PipelineConfig) -> Tuple[Any, Dict[str, Any]]:
    """A registered baseline defense (LGS, PatchZero, FPDA...) on the engine's forward pass."""
    from realtime.defense_step import DefenseStep
    from realtime.defenses.registry import DefenseContext, build_defense
    ctx = DefenseContext(model, args.model, device=device, engine=engine, data=args.data)
    try:
        defense = build_defense(args.defense, ctx)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UsageError(f"--defense {args.defense}: {_one_line(exc)}") from None
    desc = {**defense.describe(), "voting": cfg.voting.describe(), "engine": engine.describe()}
    return DefenseStep(defense, cfg.voting, device, cfg.fail_closed, plain=engine.plain), desc


def build_runtime(args: argparse.Namespace, device: torch.device, cfg: PipelineConfig
                  ) -> Tuple[Any, Dict[str, Any], Tuple[int, int]]:
    """(pipeline step engine, description for the summary, model input size)."""
    model, cal = load_model_and_calibration(args, device)
    cal_size: Optional[Tuple[int, int]] = tuple(int(v) for v in cal.input_size) if cal is not None else None
    imgsz = tuple(cfg.imgsz or cal_size or DEFAULT_IMGSZ)
    layers = tuple(cal.config.layers) if cal is not None else ()
    engine = make_engine(args, model, layers, device, imgsz)
    if args.defense == "none":
        return PlainEngine(engine.plain, device), {"defense": "none", "engine": engine.describe()}, imgsz
    if cal is None:
        return baseline_runtime(args, model, engine, device, cfg) + (imgsz,)
    from realtime.defenses.registry import DefenseContext, build_defense
    ctx = DefenseContext(model, args.model, device=device, calibration=calibration_path(args), engine=engine)
    try:
        zm = build_defense("zmask", ctx, threshold=args.threshold).zm
    except (ValueError, KeyError) as exc:
        raise UsageError(f"--calibration {calibration_path(args)}: {_one_line(exc)}") from None
    desc = {"defense": "zmask", "calibration": str(calibration_path(args)), "lambda0": zm.cfg.lambda0,
            "calibration_lambda0": cal.config.lambda0, "calibration_fingerprint": cal.fingerprint,
            "calibration_model": cal.model_name, "voting": cfg.voting.describe(), "engine": engine.describe()}
    return ZMaskEngine(zm, cfg.voting, device, cfg.fail_closed, cfg.audit), desc, imgsz
