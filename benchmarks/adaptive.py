"""The adaptive frontier: how much damage can a patch still do while it evades Z-Mask (issue 22)?

    python -m benchmarks.adaptive --model ddrnet23_slim --betas 1,0.7,0.5,0.3,0.1 --steps 150 --resume
    python -m benchmarks.adaptive --model bisenetv1 --points full_b1,full_b0.5,zscore_b0.5 --steps 60
    python -m benchmarks.adaptive --model ddrnet23_slim --defense zmask_cue --also-measure zmask --resume

For each attacker family and trade-off weight beta, a universal L patch is crafted white-box against the
calibrated Z-Mask (``realtime.attacks.whitebox``), warm-started from the library's plain EOT L patch:

* ``full``: L_adv on the *defended* output (first pass, Z-Mask's own detect, second pass on the shielded
  input of flagged frames; flags and masks BPDA) plus the evasion terms (mean |z| of every hooked layer
  under the patch, a hinge on d below lambda0/2, the soft mask under the patch);
* ``zscore``: L_adv on the first pass plus the mean |z| under the patch only (the attack of issue 22).

Each patch is then measured exactly as the digital robustness table (``benchmarks.robustness``: every
frame of the split, one seeded placement per frame, digital paste) with no defense and with Z-Mask:
mIoU outside the patch undefended / defended, flag rate, detection AUC against the clean frames' scores,
mask IoU, and the damage kept relative to the plain EOT patch's undefended damage. A point passes when
it is flagged on >= 90 % of frames with >= 70 % of its own damage undone, or when the damage left after
the defense is <= 30 % of the plain patch's.

Patches, checkpoints and measured cells go to ``<out-dir>/<model>[_<calibration>]/``; ``--resume``
continues an interrupted craft and reuses finished cells. Outputs: ``adaptive_<tag>.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from realtime.attacks.apply import load_patch_png, save_patch_png
from realtime.attacks.eot import EOTConfig, craft_universal_patch
from realtime.attacks.whitebox import DefendedForward, EvasionLoss, WhiteBoxConfig
from realtime.core.cli import USER_ERRORS, report_error, write_json
from realtime.core.devices import describe, pick_device
from realtime.data import CamVid, resolve_data_dir
from realtime.defenses.artifact import load_calibration
from realtime.defenses.registry import ZMASK_VARIANTS, DefenseContext
from realtime.models import build_model, fingerprint, model_slug

from .adaptive_report import frontier_markdown, plot_frontier, summarize_point
from .robustness import git_commit, isolated_hooks, make_defense
from .robustness_conditions import LIBRARY, Condition, patch_sha256
from .robustness_runner import CellSettings, cell_signature, load_cell, run_cell, save_cell, warm_up

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / "benchmarks" / "results" / "adaptive"
ATTACKERS: Dict[str, WhiteBoxConfig] = {
    "full": WhiteBoxConfig(),
    "zscore": WhiteBoxConfig(score_weight=0.0, mask_weight=0.0, second_pass=False),
}


@dataclass
class AdaptiveConfig:
    """One frontier run: the model and defense attacked, the attacker sweep, and where frames come from."""
    model: str
    data: Optional[str] = None
    calibration: Optional[str] = None           # default calibration/shipped/<model>.safetensors
    defense: str = "zmask"                      # the registered Z-Mask variant attacked and measured
    also_measure: List[str] = field(default_factory=list)   # other defenses the same patches are measured on
    attackers: List[str] = field(default_factory=lambda: ["full"])
    betas: List[float] = field(default_factory=lambda: [1.0, 0.7, 0.5, 0.3, 0.1])
    points: Optional[List[str]] = None          # explicit "<attacker>_b<beta>" names instead of attackers x betas
    steps: int = 150
    batch_size: int = 4
    lr: float = 0.01
    craft_split: str = "train"
    craft_limit: Optional[int] = None
    split: str = "val"
    limit: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    library: str = str(LIBRARY)
    out_dir: str = str(DEFAULT_DIR)
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.points:
            parsed = [parse_point(p) for p in self.points]
            self.attackers = list(dict.fromkeys(a for a, _ in parsed))
        unknown = [a for a in self.attackers if a not in ATTACKERS]
        if unknown:
            raise KeyError(f"unknown attacker(s) {unknown}; available: {', '.join(ATTACKERS)}")
        if any(not 0.0 <= b <= 1.0 for b in self.betas) or not self.betas:
            raise ValueError(f"betas must be in [0, 1], got {self.betas}")
        if self.defense not in ZMASK_VARIANTS or any(d not in ZMASK_VARIANTS for d in self.also_measure):
            raise KeyError(f"the frontier attacks a Z-Mask variant: {', '.join(ZMASK_VARIANTS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("--steps and --batch-size must be positive")


def calibration_path(cfg: AdaptiveConfig) -> Path:
    """The Z-Mask artifact attacked (and defending): the explicit one or the model's shipped one."""
    if cfg.calibration:
        return Path(cfg.calibration)
    return REPO / "calibration" / "shipped" / f"{model_slug(cfg.model)}.safetensors"


def run_tag(cfg: AdaptiveConfig) -> str:
    """``<model>[_<artifact stem>][_<defense>]``: the shipped calibration and plain ``zmask`` add nothing."""
    slug = model_slug(cfg.model)
    stem = calibration_path(cfg).stem
    tag = slug if stem == slug else f"{slug}_{stem}"
    return tag if cfg.defense == "zmask" else f"{tag}_{cfg.defense}"


def point_name(attacker: str, beta: float) -> str:
    return f"{attacker}_b{beta:g}"


def parse_point(name: str) -> Tuple[str, float]:
    """``full_b0.5`` -> ``('full', 0.5)``; a clear error for anything else."""
    attacker, sep, beta = name.rpartition("_b")
    try:
        value = float(beta)
    except ValueError:
        value = None
    if not sep or value is None or not 0.0 <= value <= 1.0:
        raise ValueError(f"frontier point {name!r} is not <attacker>_b<beta in [0, 1]>, e.g. full_b0.5")
    return attacker, value


def frontier_points(cfg: "AdaptiveConfig") -> List[Tuple[str, float]]:
    """The (attacker, beta) pairs of the run, in order."""
    if cfg.points:
        return [parse_point(p) for p in cfg.points]
    return [(a, b) for a in cfg.attackers for b in cfg.betas]


def craft_point(model: torch.nn.Module, ctx: DefenseContext, images: torch.Tensor, labels: torch.Tensor, init: torch.Tensor,
                attacker: str, beta: float, cfg: AdaptiveConfig, folder: Path, dev: torch.device) -> Path:
    """Craft (or resume, or reuse) one frontier patch; returns its PNG."""
    png = folder / "patches" / f"{point_name(attacker, beta)}.png"
    spec = {"attacker": attacker, "whitebox": asdict(ATTACKERS[attacker]), "beta": beta, "steps": cfg.steps,
            "calibration": str(calibration_path(cfg)), "fingerprint": fingerprint(model)}
    if cfg.defense != "zmask":
        spec["defense"] = cfg.defense
    if png.is_file() and cfg.resume and load_patch_png(png)[1].get("spec") == spec:
        return png
    ckpt = png.with_name(png.stem + ".ckpt.pt")
    spec_file = png.with_name(png.stem + ".spec.json")
    same = spec_file.is_file() and json.loads(spec_file.read_text()) == {k: v for k, v in spec.items() if k != "steps"}
    if ckpt.exists() and not (cfg.resume and same):
        ckpt.unlink()                                  # a different attack, or a fresh run: start over
    png.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps({k: v for k, v in spec.items() if k != "steps"}) + "\n")
    eot = EOTConfig(hw=tuple(init.shape[1:]), steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, beta=beta,
                    seed=cfg.seed, checkpoint_every=10)
    with isolated_hooks(model):
        zm = make_defense(cfg.defense, ctx).zm           # the defense's own Z-Mask (with its cue, if any)
        fwd = DefendedForward(zm, second_pass=ATTACKERS[attacker].second_pass)
        extra = EvasionLoss(fwd, ATTACKERS[attacker])
        patch, history = craft_universal_patch(fwd, images, labels, eot, dev, progress=cfg.progress,
                                               checkpoint=ckpt, extra_loss=extra if beta < 1 else None, init=init)
        zm.taps.remove()
    tail = history[-10:]
    save_patch_png(patch, png, {"kind": f"adaptive-{attacker}", "model": cfg.model, "spec": spec,
                                "init": "library eot_L", "craft_split": cfg.craft_split, "frames": len(images),
                                "final_adv_loss": sum(h["adv"] for h in tail) / max(len(tail), 1),
                                "final_extra_loss": sum(h["extra"] for h in tail) / max(len(tail), 1),
                                "history": history[::max(1, len(history) // 100)]})
    return png


def measure(model, defense_name: str, cond: Condition, images, labels, settings: CellSettings,
            ctx: DefenseContext, partial: Path, cfg: AdaptiveConfig, dev: torch.device, l_hw: tuple):
    """One (defense, patch) cell over the evaluation frames, reused from ``partial`` when finished."""
    with isolated_hooks(model):
        defense = make_defense(defense_name, ctx)
        sig = cell_signature(settings, defense.describe(), cond)
        cell = load_cell(partial, defense_name, cond.name, sig) if cfg.resume else None
        if cell is None:
            warm_up(defense, images, dev, 1)
            cell = run_cell(defense, cond, images, labels, settings, sig, dev, None,
                            l_patch_hw=l_hw if cond.patch is None else None, progress=cfg.progress)
            save_cell(cell, partial)
        del defense
    return cell


def run(cfg: AdaptiveConfig) -> Dict:
    """Craft every frontier point, measure it with and without Z-Mask, and summarise."""
    root = resolve_data_dir(cfg.data)
    dev = pick_device(cfg.device)
    model = build_model(cfg.model, weights="default", device=dev).eval()
    cal_path = calibration_path(cfg)
    if not cal_path.is_file():
        raise FileNotFoundError(f"no Z-Mask calibration {cal_path}; fit one with python -m calibration.fit")
    load_calibration(cal_path, model)                   # refuses an artifact made for other weights, early
    ctx = DefenseContext(model, cfg.model, device=dev, data=str(root), calibration=cal_path)
    plain_png = Path(cfg.library) / f"{model_slug(cfg.model)}_eot_L.png"
    if not plain_png.is_file():
        raise FileNotFoundError(f"no plain EOT L patch {plain_png} to warm-start from and compare with; "
                                f"craft it with python -m realtime.attacks.craft --size L --out {plain_png}")
    init = load_patch_png(plain_png)[0]
    folder = Path(cfg.out_dir) / run_tag(cfg)
    train = CamVid(root, cfg.craft_split)
    cidx = range(min(len(train), cfg.craft_limit)) if cfg.craft_limit else None
    c_images, c_labels = train.to_tensors(cidx, progress=cfg.progress)
    pngs = {point_name(a, b): craft_point(model, ctx, c_images, c_labels, init, a, b, cfg, folder, dev)
            for a, b in tqdm(frontier_points(cfg), desc="frontier", unit="point", disable=not cfg.progress)}
    del c_images, c_labels
    ds = CamVid(root, cfg.split)
    idx = list(range(len(ds)))[:cfg.limit]
    images, labels = ds.to_tensors(idx, progress=cfg.progress)
    settings = CellSettings(cfg.model, fingerprint(model), cfg.split, len(idx), cfg.seed, "none", 1, str(dev), 1)
    conds = {"none": Condition("none", "clean"),
             "eot_L": Condition("eot_L", "eot", init, str(plain_png), sha256=patch_sha256(plain_png))}
    for name, png in pngs.items():
        conds[name] = Condition(name, "adaptive", load_patch_png(png)[0], str(png), sha256=patch_sha256(png))
    partial = folder / "cells"
    cells = {(d, n): measure(model, d, c, images, labels, settings, ctx, partial, cfg, dev,
                             tuple(init.shape[1:]))
             for n, c in conds.items() for d in ("none", cfg.defense, *cfg.also_measure)}
    points = {n: summarize_point(cells, n, cfg.defense) for n in conds if n != "none"}
    also = {d: {n: summarize_point(cells, n, d) for n in conds if n != "none"} for d in cfg.also_measure}
    return {"settings": {**asdict(cfg), "calibration": str(cal_path), "tag": run_tag(cfg),
                         "attacker_configs": {a: asdict(ATTACKERS[a]) for a in cfg.attackers},
                         "eval": "every frame of the split, digital paste, seeded placement seed*100000+i "
                                 "(benchmarks.robustness protocol)"},
            "env": describe(dev), "git_commit": git_commit(), "points": points, "also_measured": also}


def parse_args(argv: Optional[List[str]] = None) -> AdaptiveConfig:
    p = argparse.ArgumentParser(prog="python -m benchmarks.adaptive", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=None, help="CamVid root (else $REALTIME_DATA, else ../shared/datasets/camvid)")
    p.add_argument("--calibration", default=None, help="Z-Mask artifact attacked and defending (default: shipped)")
    p.add_argument("--defense", default="zmask", help="Z-Mask variant attacked and measured: zmask or zmask_cue")
    p.add_argument("--also-measure", default="", help="comma-separated defenses the same patches are also measured on")
    p.add_argument("--attackers", default="full", help=f"comma-separated: {', '.join(ATTACKERS)}")
    p.add_argument("--betas", default="1,0.7,0.5,0.3,0.1", help="weights of L_adv against evasion (1: pure damage)")
    p.add_argument("--points", default=None, help="explicit points instead of attackers x betas, e.g. full_b1,zscore_b0.5")
    p.add_argument("--steps", type=int, default=150, help="crafting steps per point (from the plain EOT L patch)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--craft-split", default="train")
    p.add_argument("--craft-limit", type=int, default=None, help="only the first N crafting frames")
    p.add_argument("--split", default="val", help="frames the frontier is measured on")
    p.add_argument("--limit", type=int, default=None, help="only the first N evaluation frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--library", default=str(LIBRARY))
    p.add_argument("--out-dir", default=str(DEFAULT_DIR))
    p.add_argument("--resume", action="store_true", help="continue crafts from checkpoints, reuse finished cells")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        betas = [float(b) for b in a.betas.split(",") if b.strip()]
    except ValueError:
        p.error(f"--betas must be comma-separated numbers, got {a.betas!r}")
    return AdaptiveConfig(model=a.model, data=a.data, calibration=a.calibration, defense=a.defense,
                          also_measure=[s.strip() for s in a.also_measure.split(",") if s.strip()],
                          attackers=[s.strip() for s in a.attackers.split(",") if s.strip()], betas=betas,
                          points=[s.strip() for s in a.points.split(",") if s.strip()] if a.points else None,
                          steps=a.steps, batch_size=a.batch_size, lr=a.lr, craft_split=a.craft_split,
                          craft_limit=a.craft_limit, split=a.split, limit=a.limit, seed=a.seed, device=a.device,
                          library=a.library, out_dir=a.out_dir, resume=a.resume, progress=not a.quiet)


def main(argv: Optional[List[str]] = None) -> int:
    try:
        cfg = parse_args(argv)
        res = run(cfg)
    except USER_ERRORS as exc:
        return report_error(exc)
    except KeyboardInterrupt:
        print("interrupted: checkpoints and finished cells are kept; rerun with --resume", file=sys.stderr)
        return 130
    out = Path(cfg.out_dir)
    tag = res["settings"]["tag"]
    path = write_json(out / f"adaptive_{tag}.json", res)
    md = frontier_markdown(res)
    (out / f"adaptive_{tag}.md").write_text(md)
    png = plot_frontier(res, out / f"adaptive_{tag}.png")
    print(md)
    print(f"wrote {path}, {out / f'adaptive_{tag}.md'}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
