"""Score evidence over frames against the adaptive frontier (``--evidence N:R`` of the live pipeline).

    python -m benchmarks.evidence --model ddrnet23_slim
    python -m benchmarks.evidence --model bisenetv1 --defense zmask_cue --windows 5,8,12 --margin 1.1

A defense-aware patch that keeps Z-Mask's score d just under lambda0 is flagged on few frames, yet its
scores stay above clean ones frame after frame (the frontier's beta 0.8 points: AUC 1.00, 21-61 % flagged).
The live voter's evidence window averages ``d / lambda0`` over N unmasked frames and raises the alarm
above a ratio R. This benchmark fits R on clean TRAINING sequences only (the largest N-frame mean seen,
times ``--margin``) and replays recorded per-frame scores -- nothing is re-run:

* clean: every clean frame of train and val, from a physical-benchmark run with the same defense
  (``benchmarks/results/physical/parts/<run>/clean_*.json``); val is the held-out check;
* attacked: every adaptive-frontier patch on the val frames, in frame order, from the adaptive benchmark's
  cells (``benchmarks/results/adaptive/<model>[_zmask_cue]/cells/<defense>__<patch>.json``).

Reported per window: R, clean alarms (evidence alone and with the 3/5 voter, train and val), and per
patch the per-frame flag rate, the evidence alarm's coverage (frames with the alarm on, once the window is
full) and the frontier's damage kept -- the evidence only alarms; it masks nothing.
Writes ``benchmarks/results/adaptive/evidence_<model>_<defense>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from realtime.core.cli import USER_ERRORS, report_error, write_json
from realtime.live.voting import VotingConfig, fit_evidence, simulate, window_means

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PHYSICAL_RUN = {("ddrnet23_slim", "zmask"): "ddrnet23_slim_physeot_L_shipped_nomotion",
                ("ddrnet23_slim", "zmask_cue"): "ddrnet23_slim_physeot_L_shipped_cue_nomotion",
                ("bisenetv1", "zmask"): "bisenetv1_physeot_L_shipped_nomotion",
                ("bisenetv1", "zmask_cue"): "bisenetv1_physeot_L_shipped_cue_nomotion"}
IGNORED = ("heatmaps",)       # describe() keys that do not change a score (which kernel computed it)


@dataclass
class EvidenceConfig:
    """One analysis: which recorded runs, which windows, how much headroom over the clean fit."""
    model: str = "ddrnet23_slim"
    defense: str = "zmask"
    physical: Optional[str] = None           # physical-benchmark result JSON (its parts hold the clean scores)
    adaptive: Optional[str] = None           # adaptive-benchmark result JSON (its cells hold the patched scores)
    windows: Tuple[int, ...] = (5, 8, 12)
    margin: float = 1.0
    fit_splits: Tuple[str, ...] = ("train",)
    out_dir: str = str(RESULTS / "adaptive")


def _defense_key(desc: Dict) -> Dict:
    return {k: v for k, v in desc.items() if k not in IGNORED}


def clean_sequences(physical: Path) -> Tuple[Dict, List[Dict]]:
    """(the run's defense description, [{split, sequence, scores}]) from a physical-benchmark result."""
    run = json.loads(physical.read_text())
    parts = physical.parent / "parts" / physical.stem
    seqs = []
    for c in run["clean"]:
        part = parts / f"clean_{c['split']}_{c['sequence']}.json"
        if not part.is_file():
            raise FileNotFoundError(f"{part} not found: re-run the physical benchmark that wrote {physical.name}")
        seqs.append({"split": c["split"], "sequence": c["sequence"], "scores": json.loads(part.read_text())["value"]["scores"]})
    return run["zmask"], seqs


def adaptive_cells(adaptive: Path, defense: str) -> Tuple[Optional[Dict], Dict[str, Dict]]:
    """(the cells' defense description, {patch: {scores, flagged, point}}) for one defense of an adaptive run."""
    run = json.loads(adaptive.read_text())
    tag = run["settings"].get("tag") or adaptive.stem.replace("adaptive_", "")
    cells = adaptive.parent / tag / "cells"
    points = run["points"] if run["settings"]["defense"] == defense else run.get("also_measured", {}).get(defense, {})
    desc, out = None, {}
    for name, point in points.items():
        path = cells / f"{defense}__{name}.json"
        if not path.is_file():
            continue
        cell = json.loads(path.read_text())
        desc = cell["signature"]["defense"]
        out[name] = {"scores": cell["scores"], "flagged": cell["flagged"], "point": point}
    return desc, out


def analyse(cfg: EvidenceConfig) -> Dict:
    physical = Path(cfg.physical) if cfg.physical else RESULTS / "physical" / f"{PHYSICAL_RUN[(cfg.model, cfg.defense)]}.json"
    slug = "" if cfg.defense == "zmask" else "_zmask_cue"
    adaptive = Path(cfg.adaptive) if cfg.adaptive else RESULTS / "adaptive" / f"adaptive_{cfg.model}.json"
    own = RESULTS / "adaptive" / f"adaptive_{cfg.model}{slug}.json"
    sources = [adaptive] + ([own] if slug and own.is_file() and not cfg.adaptive else [])
    desc_c, clean = clean_sequences(physical)
    lam = float(desc_c["lambda0"])
    patches: Dict[str, Dict] = {}
    for src in sources:
        desc_a, cells = adaptive_cells(src, cfg.defense)
        if desc_a is not None and _defense_key(desc_a) != _defense_key(desc_c):
            raise ValueError(f"{src.name} measured {cfg.defense} with other settings than {physical.name}: "
                             "their scores are not comparable")
        origin = "crafted against it" if json.loads(src.read_text())["settings"]["defense"] == cfg.defense else "transfer"
        for name, c in cells.items():
            patches[name if origin == "crafted against it" else f"{name} (transfer)"] = {**c, "origin": origin}
    fit = [[s / lam for s in c["scores"]] for c in clean if c["split"] in cfg.fit_splits]
    rows = []
    for n in cfg.windows:
        ratio = fit_evidence(fit, n, cfg.margin)
        vote = VotingConfig(k=3, n=5, evidence=n, evidence_ratio=ratio)     # fed no flags: the evidence alone
        clean_rows = []
        for c in clean:
            r = [s / lam for s in c["scores"]]
            clean_rows.append({"split": c["split"], "sequence": c["sequence"], "frames": len(r),
                               "max_window_mean": float(window_means(r, n).max()) if len(r) >= n else None,
                               "evidence_alarm_frames": int(sum(simulate([False] * len(r), vote, r))),
                               "alarm_frames_with_voter": int(sum(simulate([s > lam for s in c["scores"]], vote, r)))})
        pts = {}
        for name, p in patches.items():
            r = [s / lam for s in p["scores"]]
            alarms = simulate([False] * len(r), vote, r)[n - 1:]
            pts[name] = {"origin": p["origin"], "flag_rate": float(np.mean(p["flagged"])),
                         "evidence_coverage": float(np.mean(alarms)) if alarms else 0.0,
                         "mean_ratio": float(np.mean(r)), "damage_kept_defended": p["point"].get("damage_kept_defended"),
                         "damage_undone": p["point"].get("damage_undone"), "why": p["point"].get("why")}
        rows.append({"window": n, "ratio": ratio, "clean": clean_rows, "patches": pts})
    return {"config": {**cfg.__dict__, "windows": list(cfg.windows), "fit_splits": list(cfg.fit_splits)},
            "physical_run": str(physical.relative_to(REPO)) if physical.is_relative_to(REPO) else str(physical),
            "adaptive_runs": [str(s.relative_to(REPO)) if s.is_relative_to(REPO) else str(s) for s in sources],
            "lambda0": lam, "defense": desc_c, "windows": rows}


def markdown(res: Dict) -> str:
    c = res["config"]
    out = [f"# Score evidence over frames: `{c['model']}`, `{c['defense']}`", "",
           f"Replayed from recorded per-frame scores (nothing re-run): clean frames from `{res['physical_run']}`'s parts, "
           f"patched val frames from {', '.join(f'`{a}`' for a in res['adaptive_runs'])}. lambda0 = {res['lambda0']:.4f}. "
           f"R = the largest N-frame mean of d / lambda0 on clean {'+'.join(c['fit_splits'])} sequences x {c['margin']:g}. "
           "Coverage = frames with the evidence alarm on once the window is full; the evidence masks nothing, so "
           "damage kept is the frontier's (defended, per frame).", ""]
    for w in res["windows"]:
        fa = ", ".join(f"{r['split']} {r['sequence']} {r['evidence_alarm_frames']}/{r['frames']}" for r in w["clean"])
        vv = sum(r["alarm_frames_with_voter"] for r in w["clean"])
        out += [f"## N = {w['window']}, R = {w['ratio']:.3f}", "",
                f"Clean evidence alarm frames: {fa}; with the 3/5 voter as well: {vv} alarm frames in all.", "",
                "| patch | origin | flagged per frame | evidence alarm | mean d / lambda0 | damage kept (defended) | frontier verdict |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, p in w["patches"].items():
            kept = "-" if p["damage_kept_defended"] is None else f"{p['damage_kept_defended']:.0%}"
            out.append(f"| {name} | {p['origin']} | {p['flag_rate']:.0%} | {p['evidence_coverage']:.0%} | "
                       f"{p['mean_ratio']:.2f} | {kept} | {p['why'] or '-'} |")
        out.append("")
    return "\n".join(out)


def parse_args(argv: Optional[Sequence[str]] = None) -> EvidenceConfig:
    p = argparse.ArgumentParser(prog="python -m benchmarks.evidence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ddrnet23_slim")
    p.add_argument("--defense", default="zmask", choices=("zmask", "zmask_cue"))
    p.add_argument("--physical", default=None, help="physical-benchmark result JSON with the clean scores")
    p.add_argument("--adaptive", default=None, help="adaptive-benchmark result JSON with the patched scores")
    p.add_argument("--windows", default="5,8,12")
    p.add_argument("--margin", type=float, default=1.0)
    p.add_argument("--fit-splits", default="train")
    p.add_argument("--out-dir", default=str(RESULTS / "adaptive"))
    a = p.parse_args(argv)
    try:
        windows = tuple(int(v) for v in a.windows.split(",") if v)
    except ValueError:
        p.error(f"--windows expects comma-separated integers, got {a.windows!r}")
    if not windows or min(windows) < 1 or a.margin <= 0:
        p.error("--windows must be >= 1 and --margin > 0")
    if a.physical is None and (a.model, a.defense) not in PHYSICAL_RUN:
        p.error(f"no recorded physical run for {a.model} / {a.defense}: pass --physical")
    return EvidenceConfig(a.model, a.defense, a.physical, a.adaptive, windows, a.margin,
                          tuple(s for s in a.fit_splits.split(",") if s), a.out_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_args(argv)
    try:
        res = analyse(cfg)
    except USER_ERRORS as exc:
        return report_error(exc)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"evidence_{cfg.model}_{cfg.defense}"
    write_json(out / f"{stem}.json", res)
    (out / f"{stem}.md").write_text(markdown(res) + "\n")
    print(f"wrote {out / stem}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
