"""Every defense under every patch condition on the same CamVid frames (issue 8, parts 3-4).

    python -m benchmarks.robustness --model ddrnet23_slim --split val --json out.json
    python -m benchmarks.robustness --model bisenetv1 --defenses none,zmask,lgs --conditions none,eot_L --limit 4
    python -m benchmarks.robustness --model ddrnet23_slim --resume          # continue an interrupted run
    python -m benchmarks.robustness --model fcos_ddrnet --task detection   # detectors: benchmarks.robustness_detection

For each defense x condition (clean, random_L, eot_S/M/L, beta0.1-0.9_L, defense-aware adv* patches
found in the library): mIoU outside the patch (patch pixels and void ignored, CamVid labels), mask
precision / recall / IoU against the exact patch mask (all frames and flagged frames), detection AUC
and TPR at 1 % FPR (clean scores of the same defense as negatives, scikit-learn ROC), flag rate and
median per-frame latency. One seeded placement per frame, the same for every defense and condition;
digital paste by default (``--capture none``, as ``realtime.attacks.evaluate``).

Writes ``<out-dir>/robustness_<model>_<split>.{json,md}`` and PNGs (ROC on eot_L, beta and alpha sweeps);
raw per-(defense, condition) cells go to ``<out-dir>/partial/<model>_<split>/`` so ``--resume`` skips
finished cells. Combine models with ``python -m benchmarks.robustness_report``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

from realtime.attacks.apply import patch_size_for
from realtime.core.cli import USER_ERRORS, report_error, write_json
from realtime.data import CamVid, resolve_data_dir
from realtime.defenses import registry
from realtime.defenses.registry import DefenseContext
from realtime.core.devices import describe, pick_device
from realtime.models import build_model, fingerprint, list_models, model_arg, model_slug

from .robustness_conditions import CAPTURES, LIBRARY, capture_config, resolve_conditions
from .robustness_report import DEFAULT_DIR, model_markdown, write_outputs
from .robustness_runner import CellSettings, cell_signature, load_cell, run_cell, save_cell, warm_up
from .robustness_summary import summarize_defense

REPO = Path(__file__).resolve().parents[1]
TASKS = ("segmentation", "detection")


@dataclass
class RobustnessConfig:
    """Command-line settings of one run."""
    model: str
    data: Optional[str] = None
    split: str = "val"
    weights: Optional[str] = "default"          # the model's weights (a path for torchvision:/factory specs)
    calibration: Optional[str] = None           # Z-Mask artifact (default calibration/shipped/<model>.safetensors)
    defenses: Optional[List[str]] = None       # None: every registered defense
    conditions: Optional[List[str]] = None     # None: every condition in the library
    sweep_defenses: Optional[List[str]] = None  # run the beta / defense-aware sweeps only for these (None: all)
    limit: Optional[int] = None
    every: int = 1                             # take every k-th frame of the split (spread a short run)
    batch: int = 1
    seed: int = 0
    capture: str = "none"
    max_fpr: float = 0.01
    device: str = "auto"
    library: str = str(LIBRARY)
    out_dir: str = str(DEFAULT_DIR)
    json: Optional[str] = None
    resume: bool = False
    progress: bool = True


def available_splits(root: Path) -> List[str]:
    """Split folders in a CamVid root: sub-directories holding images, except the ``*annot`` label folders."""
    exts = (".png", ".jpg", ".jpeg")
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.endswith("annot")
                  and any(f.suffix.lower() in exts for f in p.iterdir()))


def validate_split(root: Path, split: str) -> None:
    """Raise ValueError naming the present splits when ``split`` is not one of them."""
    present = available_splits(root)
    if split not in present:
        raise ValueError(f"split {split!r} not found in {root}; present: {', '.join(present) or 'none'}")


def registered_defenses() -> List[str]:
    """Registered defense names (the registry imports its built-in modules once)."""
    return list(_registered())


@functools.lru_cache(maxsize=None)
def _registered() -> Tuple[str, ...]:
    return tuple(registry.list_defenses())


def make_defense(name: str, ctx: DefenseContext):
    """``registry.build_defense`` with the known names checked first (a clear error for typos)."""
    known = registered_defenses()
    if name not in known:
        raise KeyError(f"unknown defense {name!r}; available: {', '.join(known)}")
    return registry.build_defense(name, ctx)


@contextlib.contextmanager
def isolated_hooks(model: torch.nn.Module) -> Iterator[None]:
    """Remove, on exit, every forward (pre-)hook a defense registered on the shared model.

    Defenses such as Z-Mask hook layers of the model they are built on; without this, a later defense in
    the same run would run with those (idle but still called) hooks attached.
    """
    before = {n: (set(m._forward_hooks), set(m._forward_pre_hooks)) for n, m in model.named_modules()}
    try:
        yield
    finally:
        for n, m in model.named_modules():
            fwd, pre = before.get(n, (set(), set()))
            for k in [k for k in m._forward_hooks if k not in fwd]:
                del m._forward_hooks[k]
            for k in [k for k in m._forward_pre_hooks if k not in pre]:
                del m._forward_pre_hooks[k]
        model.eval()


def runs_condition(defense: str, condition: str, sweep_defenses: Optional[List[str]]) -> bool:
    """Table-4 conditions run for every defense; beta / defense-aware sweeps only for ``sweep_defenses``.

    The sweeps ask how detection degrades as the patch hides its over-activation: they matter for the
    defenses that flag or localise, and skipping them for the slow gradient-based maskers keeps a CPU
    run within hours."""
    sweep = condition.startswith("beta") or condition.startswith("adv")
    return not sweep or sweep_defenses is None or defense in sweep_defenses


def git_commit() -> Optional[str]:
    """``git rev-parse HEAD`` of the repository (read-only), or None outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def run(cfg: RobustnessConfig) -> Dict:
    """Measure every (defense, condition) cell (reusing saved ones with ``resume``) and summarise."""
    root = resolve_data_dir(cfg.data)
    validate_split(root, cfg.split)
    model_arg(cfg.model)                  # a registered name or an external spec (torchvision:NAME, pkg.mod:f)
    if cfg.batch < 1 or cfg.every < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise ValueError("--batch, --every and --limit must be positive")
    capture = capture_config(cfg.capture)
    explicit = cfg.defenses is not None
    names = cfg.defenses if explicit else registered_defenses()
    known = registered_defenses()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown defense(s) {', '.join(unknown)}; available: {', '.join(known)}")
    dev = pick_device(cfg.device)
    model = build_model(cfg.model, weights=cfg.weights, device=dev).eval()
    fp = fingerprint(model)
    conds = resolve_conditions(cfg.model, cfg.conditions, fp, Path(cfg.library))
    ds = CamVid(root, cfg.split)
    idx = list(range(0, len(ds), cfg.every))[:cfg.limit]
    n = len(idx)
    images, labels = ds.to_tensors(idx, progress=cfg.progress)
    settings = CellSettings(cfg.model, fp, cfg.split, n, cfg.seed, cfg.capture, cfg.batch, str(dev), cfg.every)
    eot_l = next((c for c in conds if c.name == "eot_L"), None)
    l_hw = tuple(eot_l.patch.shape[1:]) if eot_l is not None else patch_size_for("L", tuple(images.shape[-2:]))
    cal_tag = f"_{Path(cfg.calibration).stem}" if cfg.calibration else ""     # resumed cells never mix artifacts
    partial = Path(cfg.out_dir) / "partial" / f"{model_slug(cfg.model)}_{cfg.split}{cal_tag}"
    results: Dict[str, Dict] = {}
    skipped: Dict[str, str] = {}
    for name in tqdm(names, desc="defenses", unit="defense", disable=not cfg.progress):
        with isolated_hooks(model):
            try:
                defense = make_defense(name, DefenseContext(model, cfg.model, device=dev, data=str(root),
                                                            calibration=cfg.calibration))
            except (FileNotFoundError, RuntimeError) as exc:
                if explicit:
                    raise
                skipped[name] = str(exc).splitlines()[0]
                print(f"warning: defense {name} skipped: {skipped[name]}", file=sys.stderr)
                continue
            info = defense.describe()
            cells, warmed = {}, False
            for cond in conds:
                if not runs_condition(name, cond.name, cfg.sweep_defenses):
                    continue
                sig = cell_signature(settings, info, cond)
                cell = load_cell(partial, name, cond.name, sig) if cfg.resume else None
                if cell is None:
                    if not warmed:
                        warm_up(defense, images, dev, cfg.batch)
                        warmed = True
                    cell = run_cell(defense, cond, images, labels, settings, sig, dev, capture,
                                    l_patch_hw=l_hw if cond.name == "none" else None, progress=cfg.progress)
                    save_cell(cell, partial)
                cells[cond.name] = cell
            results[name] = {**summarize_defense(cells, cfg.max_fpr), "flags": bool(defense.flags),
                             "masks": bool(defense.masks), "needs_grad": bool(defense.needs_grad),
                             "describe": info}
            del defense
    return {"settings": {**asdict(settings), "max_fpr": cfg.max_fpr, "data": str(root), "library": cfg.library,
                         "defenses": list(results),
                         "sweep_defenses": cfg.sweep_defenses,
                         "placement": "random, per-frame generator seed*100000+frame",
                         "l_patch_hw": list(l_hw)},
            "env": describe(dev), "git_commit": git_commit(), "skipped": skipped,
            "conditions": {c.name: c.describe() for c in conds}, "results": results}


def resolve_task(model: Optional[str], task: Optional[str]) -> str:
    """``--task``, defaulting to the model's own; asking a segmenter for boxes (or the reverse) is an error."""
    if model is None or model not in list_models():
        return task or "segmentation"        # the chosen parser reports the missing / unknown model
    own = "detection" if model in list_models("detection") else "segmentation"
    if task is not None and task != own:
        raise ValueError(f"model {model!r} is a {own} model; --task {task} does not apply to it")
    return own


def csv_list(text: Optional[str]) -> Optional[List[str]]:
    """``a,b,,c`` -> ``['a', 'b', 'c']``; None or empty -> None (the option's default)."""
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def add_run_args(p: argparse.ArgumentParser, out_dir: Path, example_conditions: str) -> None:
    """Options every robustness run takes, whatever the task: frames, placement, device, outputs, resume."""
    p.add_argument("--data", default=None, help="CamVid root (else $REALTIME_DATA, else ../shared/datasets/camvid)")
    p.add_argument("--split", default="val", help="any split folder present in the data dir")
    p.add_argument("--conditions", default=None,
                   help=f"comma-separated, e.g. {example_conditions} (default: all in library)")
    p.add_argument("--limit", type=int, default=None, help="only the first N frames (after --every)")
    p.add_argument("--every", type=int, default=1, help="every k-th frame of the split (k=2: 51 of 101 val)")
    p.add_argument("--batch", type=int, default=1, help="frames per defense call (latency is per frame / batch)")
    p.add_argument("--seed", type=int, default=0, help="placement seed")
    p.add_argument("--capture", choices=CAPTURES, default="none", help="physical-capture simulation of the patch")
    p.add_argument("--max-fpr", type=float, default=0.01, help="FPR of the reported TPR")
    p.add_argument("--device", default="auto")
    p.add_argument("--library", default=str(LIBRARY), help="patch library folder")
    p.add_argument("--out-dir", default=str(out_dir))
    p.add_argument("--json", default=None, help="also write the JSON here")
    p.add_argument("--resume", action="store_true", help="reuse finished cells saved under --out-dir/partial")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_args(argv: Optional[List[str]] = None) -> RobustnessConfig:
    p = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help=f"one of: {', '.join(list_models())}, or torchvision:NAME / package.module:factory")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="default: the model's task; detection runs benchmarks.robustness_detection (its own options)")
    p.add_argument("--weights", default="default", help="model weights (a state-dict path for external specs)")
    p.add_argument("--calibration", default=None, help="Z-Mask artifact (default calibration/shipped/<model>.safetensors)")
    p.add_argument("--defenses", default=None, help="comma-separated (default: every registered defense)")
    p.add_argument("--sweep-defenses", default=None,
                   help="comma-separated defenses that also run the beta / defense-aware sweeps (default: all)")
    add_run_args(p, DEFAULT_DIR, "none,random_L,eot_S,eot_M,eot_L,beta0.5_L")
    a = p.parse_args(argv)
    return RobustnessConfig(model=a.model, data=a.data, split=a.split, weights=a.weights, calibration=a.calibration,
                            defenses=csv_list(a.defenses),
                            conditions=csv_list(a.conditions), sweep_defenses=csv_list(a.sweep_defenses),
                            limit=a.limit, every=a.every, batch=a.batch, seed=a.seed,
                            capture=a.capture, max_fpr=a.max_fpr, device=a.device, library=a.library,
                            out_dir=a.out_dir, json=a.json, resume=a.resume, progress=not a.quiet)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", choices=TASKS, default=None)
    pre.add_argument("--model", default=None)
    known, rest = pre.parse_known_args(argv)
    try:
        task = resolve_task(known.model, known.task)
    except ValueError as exc:
        return report_error(exc)
    if task == "detection":
        from .robustness_detection import main as detection_main
        return detection_main(rest + (["--model", known.model] if known.model else []))
    return run_and_write(parse_args(argv), run, write_outputs, model_markdown)


def run_and_write(cfg: Any, run_fn: Callable[[Any], Dict], write_fn: Callable[[Dict, Path], List[Path]],
                  markdown_fn: Callable[[Dict], str]) -> int:
    """Run one benchmark config and write its JSON (and the ``--json`` copy), plots and markdown; shared by
    the segmentation and detection benchmarks. Ctrl-C keeps the finished cells for ``--resume``."""
    try:
        res = run_fn(cfg)
    except USER_ERRORS as exc:
        return report_error(exc)
    except KeyboardInterrupt:
        print(f"interrupted: finished cells are in {Path(cfg.out_dir) / 'partial'}; rerun with --resume",
              file=sys.stderr)
        return 130
    out = Path(cfg.out_dir)
    path = write_json(out / f"robustness_{model_slug(cfg.model)}_{cfg.split}.json", res)
    if cfg.json:
        write_json(cfg.json, res)
    files = write_fn(res, out)
    print(markdown_fn(res))
    print("wrote " + ", ".join(str(f) for f in [path, *files]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
