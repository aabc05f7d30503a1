"""Latency benchmark: every defense next to the bare backbone, per stage, on clean and attacked frames.

    python -m benchmarks.latency --model ddrnet23_slim --defense zmask lgs --resolution 360x480 --frames 100
    python -m benchmarks.latency --suite --device cpu --resolutions 360x480      # the committed CPU run
    python -m benchmarks.latency --suite --device cuda                             # GPU matrix (gpu_check.sh)

``none`` (the bare backbone) is always measured in the same process, interleaved frame by frame with
the defenses (see ``benchmarks.timing``), so overhead ratios compare like with like. With ``zmask`` in
the list, the live pipeline's temporal mask-reuse path (``ZMaskEngine``: voting + propagation) is
measured too, as ``zmask+temporal``. See docs/latency.md for what every column means.
"""
from __future__ import annotations

import argparse
import gc
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.latency_entries import (defense_entry, multistream_entries, probe, stack_batches, temporal_entry,
                                        to_input)
from benchmarks.latency_frames import build_frames, screen_attacked
from benchmarks.latency_report import device_slug, environment, write_all
from benchmarks.timing import Entry, measure, overhead, rss_peak_scope, summarize_samples
from kernels.backend import heatmap_backend
from realtime.core.cli import USER_ERRORS, parse_hw, report_error
from realtime.defenses.cue import cue_layers
from realtime.defenses.registry import ZMASK_VARIANTS, DefenseContext, build_defense, list_defenses
from realtime.core.devices import pick_device
from realtime.core.memory import steady_heap
from realtime.models import build_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SUITE_MODELS = ("ddrnet23_slim", "bisenetv1")
SUITE_RESOLUTIONS = ((360, 480), (720, 960), (1024, 2048))
TEMPORAL = "zmask+temporal"
INTERLEAVE = ("interleaved frame by frame: in each round every entry processes one clean then one attacked "
              "batch, and the entry order rotates by one each round")


@dataclass
class LatencyConfig:
    """One benchmark invocation: the matrix to run and how to measure each cell."""
    models: Tuple[str, ...] = ("ddrnet23_slim",)
    engines: Tuple[str, ...] = ("torch",)
    resolutions: Tuple[Tuple[int, int], ...] = ((360, 480),)
    defenses: Tuple[str, ...] = ("zmask",)
    device: str = "auto"
    precision: str = "fp32"
    batch: int = 1
    frames: int = 100              # timed rounds (one clean + one attacked batch per entry each)
    warmup: int = 10
    pool: int = 16                 # distinct frames per kind (cycled)
    kernel: Optional[str] = None   # Z-Mask heatmap backend passed to ZMask (fused | reference | auto)
    temporal: bool = True
    streams: int = 0               # > 1: also N live streams batched into one step vs N x one stream
    screen: bool = True            # keep only attacked frames that Z-Mask flags (so the 2nd pass runs)
    synthetic: bool = False
    data: Optional[str] = None
    threads: Optional[int] = None
    steady_heap: bool = True       # fixed malloc thresholds (realtime.core.memory), as realtime.run runs
    progress: bool = True
    command: str = ""
    skipped: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.frames < 1 or self.warmup < 0 or self.batch < 1 or self.pool < 1:
            raise ValueError("need --frames >= 1, --warmup >= 0, --batch >= 1 and --pool >= 1")
        if self.precision not in ("fp32", "fp16", "bf16", "int8"):
            raise ValueError(f"--precision must be fp32, fp16, bf16 or int8, got {self.precision!r}")


# ---------------------------------------------------------------- engines
def engine_status() -> Dict[str, Tuple[bool, str]]:
    """``{backend: (usable here, why not)}`` from ``engines.available_engines``; just torch without that package."""
    try:
        from engines import available_engines
    except ImportError as exc:
        return {"torch": (True, f"eager module (engines package not importable: {exc})")}
    status = {str(k): (bool(v[0]), str(v[1])) for k, v in available_engines().items()}
    status.setdefault("torch", (True, "eager module"))
    return status


def make_engine(kind: str, model: torch.nn.Module, model_name: str, layers: Sequence[str], device: torch.device,
                precision: str, hw: Tuple[int, int], batch: int, threads: Optional[int]) -> Any:
    """None for eager torch in fp32 (the module itself, as the live pipeline runs it), else an engine
    (every other backend, and eager torch at reduced precision, come from ``engines.build_engine``)."""
    if kind == "torch" and precision == "fp32":
        return None
    try:
        from engines import EngineConfig, build_engine
    except ImportError as exc:
        raise RuntimeError(f"--engine {kind} --precision {precision} needs the engines package ({exc})") from None
    cfg = EngineConfig(backend=kind, device=str(device), precision=precision, input_shape=hw, batch=batch,
                       max_batch=max(batch, 8), threads=threads)
    return build_engine(model, tuple(layers), cfg)


def zmask_layers(model: torch.nn.Module, model_name: str) -> Tuple[str, ...]:
    """The layers the shipped Z-Mask calibration taps (what an engine must export)."""
    from realtime.defenses.artifact import load_calibration
    ctx = DefenseContext(model, model_name)
    return tuple(load_calibration(ctx.calibration_path(), model).config.layers)


# ---------------------------------------------------------------- defenses

def known_defenses() -> List[str]:
    """Every registered defense (the registry imports its built-in modules)."""
    return list_defenses()


def make_defense(name: str, ctx: DefenseContext, **opts: Any) -> Any:
    return build_defense(name, ctx, **opts)


# ---------------------------------------------------------------- one cell of the matrix
def build_defenses(names: Sequence[str], ctx: DefenseContext, kernel: Optional[str],
                   notes: List[str], contexts: Optional[Dict[str, DefenseContext]] = None) -> Dict[str, Any]:
    """``none`` plus each requested defense that builds here; the others are noted and left out.
    ``contexts`` gives a defense its own context (``zmask_cue``: an engine that also exports the cue's layers)."""
    out: Dict[str, Any] = {}
    for name in ["none", *[n for n in names if n != "none"]]:
        opts = {"heatmap_backend": heatmap_backend(kernel)} if (name in ZMASK_VARIANTS and kernel) else {}
        try:
            out[name] = make_defense(name, (contexts or {}).get(name, ctx), **opts)
        except TypeError as exc:
            if name in ZMASK_VARIANTS and kernel:
                raise RuntimeError(f"--kernel {kernel}: this ZMask has no heatmap_backend option ({exc})") from None
            raise
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
            if name == "none":
                raise
            notes.append(f"{name} not measured: {' '.join(str(exc).split())[:300]}")
    return out


def run_config(cfg: LatencyConfig, model_name: str, engine_kind: str, hw: Tuple[int, int], device: torch.device
               ) -> Dict[str, Any]:
    """Build everything for one (model, engine, resolution), measure it, summarise it."""
    notes: List[str] = []
    model = build_model(model_name, device=device)
    layers = zmask_layers(model, model_name) if engine_kind != "torch" or cfg.precision != "fp32" else ()
    engine = make_engine(engine_kind, model, model_name, layers, device, cfg.precision, hw, cfg.batch, cfg.threads)
    ctx = DefenseContext(model, model_name, engine=engine, device=device, data=cfg.data)
    contexts: Dict[str, DefenseContext] = {}
    extra = tuple(n for n in cue_layers(model_name) if n not in layers) if "zmask_cue" in cfg.defenses else ()
    if engine is not None and extra:
        # its own engine with the cue's layers exported too, so the other entries' graphs stay as they are
        cue_engine = make_engine(engine_kind, model, model_name, (*layers, *extra), device, cfg.precision, hw,
                                 cfg.batch, cfg.threads)
        contexts["zmask_cue"] = DefenseContext(model, model_name, engine=cue_engine, device=device, data=cfg.data)
    defenses = build_defenses(cfg.defenses, ctx, cfg.kernel, notes, contexts)
    n_candidates = cfg.pool * 3 if (cfg.screen and "zmask" in defenses) else cfg.pool
    fs = build_frames(model_name, n_candidates, hw, cfg.data, cfg.synthetic)
    if cfg.screen and "zmask" in defenses:
        zm = defenses["zmask"]

        def flags(frame: np.ndarray) -> bool:
            with torch.inference_mode():
                return bool(zm(to_input(frame[None], device)).flagged.any())
        fs = screen_attacked(fs, flags, cfg.pool)
    else:
        fs = replace(fs, clean=fs.clean[:cfg.pool], attacked=fs.attacked[:cfg.pool])
    n_batches = max(1, min(cfg.frames, -(-len(fs.clean) // cfg.batch)))
    batches = {"clean": stack_batches(fs.clean, cfg.batch, n_batches),
               "attacked": stack_batches(fs.attacked, cfg.batch, n_batches)}
    entries: List[Entry] = [defense_entry(n, d, batches, device) for n, d in defenses.items()]
    if cfg.temporal and "zmask" in defenses:
        entries.append(_temporal(defenses["zmask"], fs, device, cfg.batch, notes))
    multi = _multistream(defenses, fs, device, cfg.streams, notes)
    entries += multi
    kept: List[Entry] = []
    for e in entries:
        err = probe(e)
        if err is None:
            kept.append(e)
        elif e.name == "none":
            raise RuntimeError(f"the bare backbone fails on {model_name}/{engine_kind}/{hw}: {err}")
        else:
            notes.append(f"{e.name} left out: {err}")
    title = f"{model_name} {engine_kind} {hw[0]}x{hw[1]}"
    samples = measure(kept, cfg.frames, cfg.warmup, device, progress=cfg.progress, desc=title)
    doc = {"model": model_name, "engine": engine_kind, "precision": cfg.precision, "resolution": list(hw),
           "batch": cfg.batch, "frames": {"source": fs.source, "patch": fs.patch, "screened": fs.screened,
                                          "distinct": len(fs.clean)},
           "defenses": {n: d.describe() for n, d in defenses.items()},
           "entries": {}, "samples_ms": {}, "overhead": {}, "notes": notes}
    if engine is not None and hasattr(engine, "describe"):
        doc["engine_info"] = engine.describe()
    names = [e.name for e in multi if e.name in samples]
    for name, kinds in samples.items():
        per_round = cfg.streams if any(e.name == name for e in multi) else cfg.batch
        doc["entries"][name] = {k: summarize_samples(s, per_round) for k, s in kinds.items()}
        doc["samples_ms"][name] = {k: [round(v, 3) for v in s.total_ms] for k, s in kinds.items()}
        doc["overhead"][name] = {k: overhead(s.total_ms, samples["none"][k].total_ms)
                                 for k, s in kinds.items() if k in samples["none"]}
    if len(names) == 2:
        fps = {n: {k: v["fps"] for k, v in doc["entries"][n].items()} for n in names}
        doc["multistream"] = {"streams": cfg.streams, "fps": fps, "speedup": {
            k: round(fps[names[0]][k] / fps[names[1]][k], 3) for k in fps[names[0]] if fps[names[1]].get(k)}}
    del defenses, entries, kept, engine, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return doc


def _temporal(zdef: Any, fs: Any, device: torch.device, batch: int, notes: List[str]) -> Entry:
    from realtime.live.step import DefenseStep
    from realtime.live.voting import VotingConfig
    vc = VotingConfig()
    notes.append(f"{TEMPORAL}: realtime.live.step.DefenseStep (Z-Mask) with default voting {vc.k}/{vc.n}, clear after {vc.m}, "
                 f"mask window {vc.mask_window}, dilate {vc.dilate} px; batch 1; paths: plain = unmasked pass, no "
                 f"flag; reuse = previous mask applied before the pass and no second pass; second_pass = flagged")
    if batch != 1:
        notes.append(f"{TEMPORAL} runs at batch 1 whatever --batch is (the live pipeline is per frame)")
    return temporal_entry(TEMPORAL, lambda: DefenseStep(zdef, vc, device),
                          {"clean": fs.clean, "attacked": fs.attacked}, device)


def _multistream(defenses: Dict[str, Any], fs: Any, device: torch.device, n: int, notes: List[str]) -> List[Entry]:
    if n < 2 or "zmask" not in defenses:
        return []
    from realtime.live.step import DefenseStep
    from realtime.live.voting import VotingConfig
    notes.append(f"{TEMPORAL} x{n}: {n} streams, one voter each, through one DefenseStep: 'batched' = one "
                 f"step_batch call on the {n} streams' frames per round (realtime.run with {n} --source), "
                 f"'serial' = {n} one-frame calls; a round is {n} frames, FPS counts frames of all streams")
    return multistream_entries(TEMPORAL, lambda: DefenseStep(defenses["zmask"], VotingConfig(), device),
                               {"clean": fs.clean, "attacked": fs.attacked}, device, n)


def run_all(cfg: LatencyConfig) -> Dict[str, Any]:
    """Every cell of the matrix; a cell that cannot run (engine missing, out of memory) is noted."""
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    heap = steady_heap(cfg.steady_heap)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    settings = {"command": cfg.command, "frames": cfg.frames, "warmup": cfg.warmup, "batch": cfg.batch,
                "precision": cfg.precision, "pool": cfg.pool, "kernel": cfg.kernel, "interleave": INTERLEAVE,
                "timing": ("CUDA events per stage, torch.cuda.synchronize around each frame" if device.type == "cuda"
                           else "time.perf_counter per stage"),
                "rss_scope": rss_peak_scope(), "screen_attacked": cfg.screen, "heap": heap}
    doc: Dict[str, Any] = {"env": environment(device), "settings": settings, "configs": [],
                           "skipped": list(cfg.skipped)}
    cells = [(m, e, r) for m in cfg.models for e in cfg.engines for r in cfg.resolutions]
    for m, e, r in tqdm(cells, desc="configs", unit="cfg", disable=not cfg.progress or len(cells) < 2):
        try:
            doc["configs"].append(run_config(cfg, m, e, r, device))
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            doc["skipped"].append(f"{m}/{e}/{r[0]}x{r[1]}: out of memory ({str(exc)[:120]})")
        except (RuntimeError, ValueError, KeyError, ImportError) as exc:
            if len(cells) == 1:
                raise
            doc["skipped"].append(f"{m}/{e}/{r[0]}x{r[1]}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
    return doc


# ---------------------------------------------------------------- CLI
def _resolution(text: str) -> Tuple[int, int]:
    try:
        return parse_hw(text, minimum=32)
    except ValueError as exc:
        raise ValueError(f"--resolution: {exc}") from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", help="model name(s) (default ddrnet23_slim; --suite: both)")
    p.add_argument("--engine", nargs="+", help="torch / compile / onnxruntime / tensorrt (default torch; "
                                               "--suite: every available one)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8"))
    p.add_argument("--resolution", "--resolutions", dest="resolution", nargs="+", metavar="HxW",
                   help="input size(s) (default 360x480; --suite: 360x480 720x960 1024x2048)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--defense", nargs="+", help="defense name(s) or 'all' (none is always included; "
                                                "default zmask; --suite: all)")
    p.add_argument("--frames", type=int, default=100, help="timed rounds per config")
    p.add_argument("--warmup", type=int, default=10, help="discarded rounds before timing")
    p.add_argument("--pool", type=int, default=16, help="distinct frames per kind (cycled)")
    p.add_argument("--kernel", "--kernels", dest="kernel", choices=("fused", "reference", "auto"), default="auto",
                   help="Z-Mask heatmap backend (default auto, as realtime.run: CUDA kernels on CUDA, the C "
                        "kernel on CPU), passed as ZMask(heatmap_backend=kernels.heatmap_backend(...))")
    p.add_argument("--no-temporal", action="store_true", help=f"skip the {TEMPORAL} path")
    p.add_argument("--streams", type=int, default=0, metavar="N",
                   help=f"also time N streams batched into one {TEMPORAL} step vs N x one stream (N >= 2)")
    p.add_argument("--no-screen", action="store_true", help="use attacked frames even when Z-Mask does not flag them")
    p.add_argument("--synthetic", action="store_true", help="synthetic frames instead of CamVid val")
    p.add_argument("--data", help="CamVid root (default: the usual lookup)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's adaptive malloc thresholds alone (default: fixed, as realtime.run runs)")
    p.add_argument("--suite", action="store_true", help="the standard matrix (both models x engines x 3 sizes)")
    p.add_argument("--json", help="write JSON here, with .md and .png next to it "
                                  "(--suite default: benchmarks/results/latency_<device>.json)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace, argv: Sequence[str]) -> LatencyConfig:
    models = tuple(a.model) if a.model else (SUITE_MODELS if a.suite else ("ddrnet23_slim",))
    res = tuple(_resolution(r) for r in a.resolution) if a.resolution else (
        SUITE_RESOLUTIONS if a.suite else ((360, 480),))
    names = a.defense or (["all"] if a.suite else ["zmask"])
    known = known_defenses()
    defenses = tuple(known) if "all" in names else tuple(names)
    unknown = [n for n in defenses if n not in known]
    if unknown:
        raise KeyError(f"unknown defense(s) {', '.join(unknown)}; available: {', '.join(known)}")
    status = engine_status()
    available = [e for e, (ok, _why) in status.items() if ok]
    skipped: List[str] = []
    if a.engine:
        engines = tuple(a.engine)
    elif a.suite:
        engines = tuple(available)
    else:
        engines = ("torch",)
    for e in engines:
        if e not in available:
            why = status[e][1] if e in status else f"unknown engine; known: {', '.join(status)}"
            skipped.append(f"engine {e}: {why}")
    engines = tuple(e for e in engines if e in available)
    if not engines:
        raise RuntimeError("no requested engine is available: " + "; ".join(skipped))
    return LatencyConfig(models=models, engines=engines, resolutions=res, defenses=defenses, device=a.device,
                         precision=a.precision, batch=a.batch, frames=a.frames, warmup=a.warmup, pool=a.pool,
                         kernel=a.kernel, temporal=not a.no_temporal, screen=not a.no_screen, streams=a.streams,
                         synthetic=a.synthetic, data=a.data, threads=a.threads, steady_heap=not a.default_malloc,
                         progress=not a.quiet,
                         command="python -m benchmarks.latency " + " ".join(shlex.quote(v) for v in argv),
                         skipped=skipped)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    try:
        cfg = config_from_args(a, argv)
        doc = run_all(cfg)
    except USER_ERRORS as exc:
        return report_error(exc)
    from benchmarks.latency_report import markdown
    print(markdown(doc))
    json_path = Path(a.json) if a.json else (RESULTS / f"latency_{device_slug(pick_device(a.device))}.json"
                                             if a.suite else None)
    if json_path is not None:
        written = write_all(doc, json_path, make_plot=not a.no_plot)
        print("wrote " + ", ".join(str(p) for p in written.values()), file=sys.stderr)
    return 0 if doc["configs"] else 2


if __name__ == "__main__":
    sys.exit(main())
