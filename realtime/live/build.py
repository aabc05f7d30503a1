"""What a live run is built from: ``build(RunConfig) -> Runtime`` (the per-frame step and its description).

The backbone runs through an engine from ``engines`` (``engine``/``precision``), built for the
pipeline's input size with the layers the calibration taps; every defense — Z-Mask included — is
built through the defense registry on that engine and run by the one ``DefenseStep``. The Z-Mask
calibration is loaded and checked against the model once, here, and handed to the registry's
builder. Detectors return per-image box dicts, which the engines (one output tensor) do not carry,
so they run eagerly on the module: ``engine torch``, ``precision fp32`` only, for now. Any problem
with the configuration, model, calibration or backend is a ``UsageError`` (one line, exit status 2).
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from engines import EngineConfig, EngineError, build_engine, engine_class
from kernels.backend import heatmap_backend
from realtime.core.errors import UsageError, one_line
from realtime.defenses.artifact import Calibration, load_calibration
from realtime.defenses.cue import cue_layers
from realtime.defenses.registry import ZMASK_VARIANTS, DefenseContext, build_defense
from realtime.models import build_model, model_slug
from realtime.models.registry import model_task

from .pipeline import PipelineConfig
from .step import DefenseStep

REPO = Path(__file__).resolve().parents[2]
DEFAULT_IMGSZ: Tuple[int, int] = (360, 480)


MAX_SIDE, MAX_PIXELS = 3840, 3840 * 2160      # 4K UHD, either orientation: bigger inputs exhaust memory


def check_imgsz(hw: Tuple[int, int], what: str) -> Tuple[int, int]:
    """``hw`` unless it is larger than the pipeline can hold (UsageError)."""
    h, w = hw
    if max(h, w) > MAX_SIDE or h * w > MAX_PIXELS:
        raise UsageError(f"{what} {h}x{w} is too large: at most {MAX_SIDE} px a side and 3840x2160 pixels "
                         "in all (the model runs on every frame at this size)")
    return hw


@dataclass(frozen=True)
class RunConfig:
    """Everything a live run is made of (``python -m realtime.run`` fills it from its flags)."""
    source: str = "demo"
    sources: Tuple[str, ...] = ()             # a multi-stream run: every source (several --source / a .streams file)
    model: str = "ddrnet23_slim"
    weights: Optional[str] = "default"        # "none": random init (development, tests)
    defense: str = "zmask"
    calibration: Optional[str] = None         # default calibration/shipped/<model>.safetensors
    threshold: Optional[float] = None         # overrides the calibration's lambda0
    engine: str = "torch"
    precision: str = "fp32"
    kernels: str = "auto"                     # Z-Mask heatmaps: auto | fused | reference
    device: str = "auto"
    threads: Optional[int] = None
    default_malloc: bool = False              # keep glibc's adaptive thresholds (default: realtime.core.memory)
    data: Optional[str] = None
    output: Optional[str] = None
    events: Optional[str] = None
    summary: Optional[str] = None
    max_frames: Optional[int] = None
    vote: str = "3/5"
    clear: Optional[int] = None
    mask_window: int = 3
    dilate: int = 16
    no_propagate: bool = False
    motion: bool = False                      # move propagated masks with the scene (motion compensation)
    evidence: Optional[str] = None            # "N:R": alarm on the mean score / lambda0 over N frames (off: None)
    refine: str = "none"                      # grabcut: snap flagged frames' masks to the patch's edges
    fail_closed: bool = False
    box_threshold: float = 0.4
    show: bool = False
    realtime: bool = False
    imgsz: Optional[str] = None
    fps: float = 10.0
    patch: Optional[str] = None
    patch_start: Optional[int] = None
    patch_frames: Optional[int] = None
    timeout: float = 10.0
    reconnect: Optional[int] = None           # live sources: reconnect attempts per drop (None: 5); files never
    audit: bool = False
    quiet: bool = False


@dataclass
class Runtime:
    """The built run: the step the pipeline calls per frame, what to record about it, the input size."""
    step: DefenseStep
    description: Dict[str, Any]
    imgsz: Tuple[int, int]


def calibration_path(cfg: RunConfig) -> Path:
    """``calibration``, else the shipped artifact of ``model``."""
    return Path(cfg.calibration) if cfg.calibration else REPO / "calibration" / "shipped" / f"{model_slug(cfg.model)}.safetensors"


def weights_arg(text: Optional[str]) -> Optional[str]:
    """``none`` keeps the random initialisation (development, tests), else as given."""
    return None if text is None or text.lower() == "none" else text


def load_model_and_calibration(cfg: RunConfig, device: torch.device
                               ) -> Tuple[torch.nn.Module, Optional[Calibration]]:
    """The model and (with Z-Mask) its calibration, checked against each other."""
    try:
        model = build_model(cfg.model, weights=weights_arg(cfg.weights), device=device)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        raise UsageError(f"cannot load model '{cfg.model}': {one_line(exc)}") from None
    if model_task(model) == "detection" and (cfg.engine != "torch" or cfg.precision != "fp32"):
        raise UsageError(f"detectors run on --engine torch for now, in fp32 (model '{cfg.model}' got "
                         f"--engine {cfg.engine} --precision {cfg.precision})")
    if cfg.defense != "zmask":
        return model, None
    path = calibration_path(cfg)
    if not path.is_file():
        raise UsageError(f"calibration {path} not found; make one with `python -m calibration.fit --model "
                         f"{cfg.model}` or run with --defense none")
    try:
        return model, load_calibration(path, model)
    except (ValueError, KeyError, RuntimeError) as exc:
        msg = one_line(exc)
        msg = msg[len(f"{path}: "):] if msg.startswith(f"{path}: ") else msg
        raise UsageError(f"--calibration {path}: {msg}") from None


def make_engine(cfg: RunConfig, model: torch.nn.Module, layers: Tuple[str, ...], device: torch.device,
                imgsz: Tuple[int, int]) -> Any:
    """The ``engine``/``precision`` backend for ``model`` with ``layers`` tapped, or a UsageError."""
    ecfg = EngineConfig(backend=cfg.engine, device=str(device), precision=cfg.precision, input_shape=imgsz,
                        threads=cfg.threads)
    ok, why = engine_class(cfg.engine).available()
    if not ok:
        raise UsageError(f"--engine {cfg.engine} is not available: {why}")
    try:
        engine = build_engine(model, layers, ecfg)
        engine.warmup(runs=1)          # first-call costs (compilation, autotuning) before the first frame
    except (EngineError, ValueError, KeyError) as exc:
        raise UsageError(f"--engine {cfg.engine}: {one_line(exc)}") from None
    return engine


def detector_description(cfg: RunConfig, model: torch.nn.Module, layers: Tuple[str, ...], device: torch.device,
                         imgsz: Tuple[int, int]) -> Dict[str, Any]:
    """Warm the detector up (first-call costs before the first frame) and describe how it runs."""
    with torch.inference_mode():
        model(torch.rand(1, 3, *imgsz, device=device))
    return {"engine": "torch", "device": str(device), "precision": "fp32", "layers": list(layers),
            "input_shape": list(imgsz), "model": cfg.model, "eager_module": True}


def readable_calibration(cfg: RunConfig, model: torch.nn.Module) -> Optional[Calibration]:
    """The run's Z-Mask calibration, None when it cannot be read (the defense's build then says why)."""
    try:
        return load_calibration(calibration_path(cfg), model)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError):
        return None


def build(cfg: RunConfig, device: torch.device, pipeline: PipelineConfig) -> Runtime:
    """The model, its calibration, the engine and the defense, assembled into the pipeline's step.

    A detector's description also carries ``task`` and ``class_names`` (what the sinks label boxes with)."""
    model, cal = load_model_and_calibration(cfg, device)
    task = model_task(model)
    cal_size = tuple(int(v) for v in cal.input_size) if cal is not None else None
    if pipeline.imgsz is None and cal_size is not None:
        check_imgsz(cal_size, f"the input size of --calibration {calibration_path(cfg)}")
    imgsz = tuple(pipeline.imgsz or cal_size or DEFAULT_IMGSZ)
    layers = tuple(cal.config.layers) if cal is not None else ()
    cue_cal = readable_calibration(cfg, model) if cfg.defense == "zmask_cue" else None
    if cue_cal is not None:                 # the engine exports Z-Mask's and the cue's layers, so the cue reads its taps
        layers = tuple(dict.fromkeys((*cue_cal.config.layers, *cue_layers(cfg.model))))
    if task == "detection":
        engine, engine_desc = None, detector_description(cfg, model, layers, device, imgsz)
        task_desc: Dict[str, Any] = {"task": task, "class_names": list(getattr(model, "class_names", ()))}
    else:
        engine = make_engine(cfg, model, layers, device, imgsz)
        engine_desc, task_desc = engine.describe(), {}
    ctx = DefenseContext(model, cfg.model, device=device, engine=engine, data=cfg.data,
                         calibration=calibration_path(cfg), loaded_calibration=cal or cue_cal)
    options: Dict[str, Any] = {}
    if cfg.defense in ZMASK_VARIANTS:
        try:
            options = {"threshold": cfg.threshold, "heatmap_backend": heatmap_backend(cfg.kernels),
                       "refine": cfg.refine}
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"--kernels {cfg.kernels}: {one_line(exc)}") from None
    try:
        defense = build_defense(cfg.defense, ctx, **options)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        what = f"--calibration {calibration_path(cfg)}" if cfg.defense == "zmask" else f"--defense {cfg.defense}"
        raise UsageError(f"{what}: {one_line(exc)}") from None
    plain = engine.plain if engine is not None else model
    step = DefenseStep(defense, pipeline.voting, device, pipeline.fail_closed, plain=plain, task=task,
                       audit=pipeline.audit)
    if cfg.defense == "none":
        desc: Dict[str, Any] = {"defense": "none", "engine": engine_desc}
    elif cal is not None:
        zm = defense.zm     # type: ignore[attr-defined]
        desc = {"defense": "zmask", "calibration": str(calibration_path(cfg)), "lambda0": zm.cfg.lambda0,
                "calibration_lambda0": cal.config.lambda0, "calibration_fingerprint": cal.fingerprint,
                "calibration_model": cal.model_name, "kernels": zm.heatmap_backend,
                "voting": pipeline.voting.describe(), "engine": engine_desc,
                **({"refine": dataclasses.asdict(defense.refine)} if getattr(defense, "refine", None) else {})}
    else:
        desc = {**defense.describe(), "voting": pipeline.voting.describe(), "engine": engine_desc}
        zm = getattr(defense, "zm", None)
        if zm is not None:      # zmask_cue: the backend asked for ("heatmaps" says what has run so far: nothing yet)
            desc["kernels"] = zm.heatmap_backend
    return Runtime(step, {**desc, **task_desc}, imgsz)


__all__ = ["DEFAULT_IMGSZ", "MAX_PIXELS", "MAX_SIDE", "RunConfig", "Runtime", "UsageError", "build", "calibration_path", "check_imgsz",
           "load_model_and_calibration", "make_engine", "weights_arg"]
