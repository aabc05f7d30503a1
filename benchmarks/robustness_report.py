"""Markdown tables and plots of the robustness benchmark, per model and combined.

    python -m benchmarks.robustness_report                       # every robustness_<model>_val.json
    python -m benchmarks.robustness_report --split val --results-dir benchmarks/results/robustness \
        --out benchmarks/results/robustness.md

Per model (written by ``benchmarks.robustness``): a table shaped like the paper's Table 4 (rows =
defenses, columns = conditions, mIoU outside the patch), detection and masking tables, the beta /
alpha sweeps, ROC curves on eot_L and sweep plots. The combined file has one section per model and
a note slot comparing Z-Mask with LGS on the L patch (its numbers are filled from the JSONs).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .robustness_conditions import TABLE4  # noqa: E402
from realtime.models.registry import model_slug

DEFAULT_DIR = Path("benchmarks") / "results" / "robustness"


def _f(v: Optional[float], digits: int = 3) -> str:
    return "-" if v is None or v != v else f"{v:.{digits}f}"


def _cond_names(res: Dict) -> List[str]:
    return list(res["conditions"])


def _cell(res: Dict, defense: str, cond: str) -> Optional[Dict]:
    return res["results"].get(defense, {}).get("conditions", {}).get(cond)


def _device(res: Dict) -> str:
    env = res.get("env", {})
    return env.get("gpu") or f"{env.get('device', '?')} ({env.get('threads', '?')} threads)"


def _header(res: Dict) -> List[str]:
    s = res["settings"]
    return [f"{s['frames']} {s['split']} frames, one placement per frame (seed {s['seed']}, same place for every "
            f"defense and condition), capture `{s['capture']}`, batch {s['batch']}; device {_device(res)}, torch "
            f"{res.get('env', {}).get('torch', '?')}; model fingerprint `{s['fingerprint']}`, commit "
            f"`{(res.get('git_commit') or '?')[:12]}`."]


def table_miou(res: Dict) -> List[str]:
    """Table 4 layout: mIoU outside the patch, plus the clean mIoU outside the L place and latency."""
    conds = [c for c in TABLE4 if c in res["conditions"]]
    head = ["defense"] + [("clean" if c == "none" else c) for c in conds]
    if "none" in conds:
        head.insert(2, "clean, outside L place")
    head.append("latency ms (median / p90)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d, r in res["results"].items():
        row = [f"`{d}`"]
        for c in conds:
            cell = _cell(res, d, c) or {}
            row.append(_f(cell.get("miou"), 4))
            if c == "none":
                row.append(_f(cell.get("miou_outside_l_place"), 4))
        lat = r.get("latency_ms", {})
        row.append(f"{_f(lat.get('median'), 1)} / {_f(lat.get('p90'), 1)}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def table_detection(res: Dict, conds: Sequence[str]) -> List[str]:
    """AUC / TPR at the max FPR / flag rate, for defenses that flag."""
    rows = [d for d, r in res["results"].items() if r.get("flags")]
    if not rows or not conds:
        return []
    head = ["defense", "flag rate clean"] + list(conds)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in rows:
        row = [f"`{d}`", _f((_cell(res, d, "none") or {}).get("flag_rate"))]
        for c in conds:
            cell = _cell(res, d, c) or {}
            det = cell.get("detection") or {}
            row.append(f"{_f(det.get('auc'))} / {_f(det.get('tpr_at_fpr'))} / {_f(cell.get('flag_rate'))}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def table_mask(res: Dict, conds: Sequence[str]) -> List[str]:
    """Mask IoU all frames / flagged frames (precision, recall over all frames), for masking defenses."""
    rows = [d for d, r in res["results"].items() if r.get("masks")]
    if not rows or not conds:
        return []
    head = ["defense", "masked fraction clean"] + list(conds)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in rows:
        clean = ((_cell(res, d, "none") or {}).get("mask") or {})
        row = [f"`{d}`", _f(clean.get("masked_fraction"), 4)]
        for c in conds:
            cell = _cell(res, d, c) or {}
            m, g = cell.get("mask") or {}, cell.get("mask_gated") or {}
            row.append(f"{_f(m.get('iou'))} / {_f(g.get('iou'))} (P {_f(m.get('precision'), 2)}, "
                       f"R {_f(m.get('recall'), 2)})")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def table_sweep(res: Dict, conds: Sequence[str]) -> List[str]:
    """mIoU / detection AUC for the beta and defense-aware conditions."""
    if not conds:
        return []
    head = ["defense"] + list(conds)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in res["results"]:
        row = [f"`{d}`"]
        for c in conds:
            cell = _cell(res, d, c) or {}
            row.append(f"{_f(cell.get('miou'))} / {_f((cell.get('detection') or {}).get('auc'))}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def model_markdown(res: Dict, level: int = 1) -> str:
    """Every table of one model's results."""
    h = "#" * level
    s = res["settings"]
    patched4 = [c for c in TABLE4 if c in res["conditions"] and c != "none"]
    sweep = [c for c in _cond_names(res) if c not in TABLE4]
    max_fpr = s.get("max_fpr", 0.01)
    parts = [f"{h} Robustness: `{s['model']}` on CamVid {s['split']}", "", *_header(res), "",
             f"{h}# mIoU outside the patch (paper Table 4 layout)", "",
             "Patch pixels and void are ignored; `clean` is scored on the whole frame, `clean, outside L place` on the "
             "pixels the L patch leaves (the pixel set of the `eot_L` column). Latency: the defense call per frame.",
             "", *table_miou(res), ""]
    det = table_detection(res, patched4)
    if det:
        parts += [f"{h}# Detection: AUC / TPR at {max_fpr:.0%} FPR / flag rate", "",
                  "ROC negatives: the same defense's scores on the clean frames; positives: the patched frames. "
                  "Flag rate: frames flagged at the defense's own threshold.", "", *det, ""]
    msk = table_mask(res, patched4)
    if msk:
        parts += [f"{h}# Masking: mask IoU all frames / flagged frames (precision, recall, all frames)", "",
                  "Pixel counts of the masked region (keep-mask < 0.5; soft masks are cut there) against the true "
                  "patch mask, summed over frames; `-`: undefined (nothing masked or no flagged frame).", "", *msk, ""]
    sw = table_sweep(res, sweep)
    if sw:
        parts += [f"{h}# Beta sweep and defense-aware patches: mIoU / detection AUC", "", *sw, ""]
    if res.get("skipped"):
        parts += ["Defenses not run: " + "; ".join(f"`{k}` ({v})" for k, v in res["skipped"].items()), ""]
    return "\n".join(parts)


def plot_roc(res: Dict, path: Path, condition: str = "eot_L") -> bool:
    """ROC curves of every flagging defense on ``condition``; False when there is nothing to plot."""
    curves = [(d, _cell(res, d, condition)["detection"]) for d in res["results"]
              if (_cell(res, d, condition) or {}).get("detection")]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(4.2, 4), dpi=110)
    for d, det in curves:
        ax.plot(det["roc_fpr"], det["roc_tpr"], drawstyle="steps-post", label=f"{d} (AUC {det['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false-positive rate (clean frames)")
    ax.set_ylabel("true-positive rate (patched frames)")
    ax.set_title(f"{res['settings']['model']}: ROC on {condition} ({res['settings']['frames']} frames)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def _sweep_points(res: Dict, kind: str) -> Dict[str, List[tuple]]:
    """{series: [(x, condition)]}: beta (eot_L as beta = 1) or alpha (one series per adv kind)."""
    series: Dict[str, List[tuple]] = {}
    for name, c in res["conditions"].items():
        if kind == "beta" and c["kind"] == "beta":
            series.setdefault("beta", []).append((c["beta"], name))
        elif kind == "alpha" and c["kind"].startswith("adv-"):
            series.setdefault(c["kind"], []).append((c["alpha"], name))
    if kind == "beta" and series and "eot_L" in res["conditions"]:
        series["beta"].append((1.0, "eot_L"))
    return {k: sorted(v) for k, v in series.items()}


def plot_sweep(res: Dict, path: Path, kind: str) -> bool:
    """Detection AUC and mIoU versus beta (or alpha), one line per defense; False if no such patches."""
    series = _sweep_points(res, kind)
    if not series:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), dpi=110)
    styles = ["o-", "s--", "^-.", "d:"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, d in enumerate(res["results"]):
        color = colors[j % len(colors)]                    # one colour per defense in both panels
        for k, (sname, pts) in enumerate(series.items()):
            xs = [x for x, _ in pts]
            lab = d if len(series) == 1 else f"{d} {sname}"
            auc = [((_cell(res, d, c) or {}).get("detection") or {}).get("auc") for _, c in pts]
            if any(a is not None for a in auc):
                axes[0].plot(xs, [a if a is not None else float("nan") for a in auc], styles[k % 4],
                             color=color, label=lab)
            miou = [(_cell(res, d, c) or {}).get("miou") for _, c in pts]
            if any(m is not None for m in miou):                # defenses not run on the sweep: no line
                axes[1].plot(xs, [m if m is not None else float("nan") for m in miou], styles[k % 4],
                             color=color, label=lab)
    axes[0].set_title("detection AUC", fontsize=9)
    axes[1].set_title("mIoU outside the patch", fontsize=9)
    for ax in axes:
        ax.set_xlabel("beta (1.0 = eot_L)" if kind == "beta" else "alpha")
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))   # outside: lines stay visible
    fig.suptitle(f"{res['settings']['model']}: L patches vs {kind} ({res['settings']['frames']} frames)", fontsize=10)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> bool:
    """Lay out, write and close a figure (the report's PNGs)."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def write_outputs(res: Dict, out_dir: Path) -> List[Path]:
    """``robustness_<model>_<split>.md`` and its PNGs in ``out_dir``; returns the files written."""
    s = res["settings"]
    stem = Path(out_dir) / f"robustness_{model_slug(s['model'])}_{s['split']}"
    md = stem.with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(model_markdown(res))
    written = [md]
    for path, ok in ((Path(f"{stem}_roc_eot_L.png"), lambda p: plot_roc(res, p)),
                     (Path(f"{stem}_beta.png"), lambda p: plot_sweep(res, p, "beta")),
                     (Path(f"{stem}_alpha.png"), lambda p: plot_sweep(res, p, "alpha"))):
        if ok(path):
            written.append(path)
    return written


def zmask_vs_lgs(res: Dict, condition: str = "eot_L") -> str:
    """The measured numbers for the note comparing Z-Mask and LGS on ``condition``."""
    get = lambda d: (_cell(res, d, condition) or {}).get("miou")  # noqa: E731
    have = {d: get(d) for d in ("none", "zmask", "lgs")}
    if have["zmask"] is None or have["lgs"] is None:
        missing = [d for d in ("zmask", "lgs") if have[d] is None]
        return f"not measured for {condition}: {', '.join(missing)} missing from this run."
    return (f"{condition}: undefended {_f(have['none'], 4)}, Z-Mask {_f(have['zmask'], 4)}, LGS {_f(have['lgs'], 4)} "
            f"(Z-Mask - LGS = {have['zmask'] - have['lgs']:+.4f} mIoU).")


def combine(results_dir: Path, split: str, notes_file: Optional[Path] = None) -> str:
    """One markdown document with a section per model found in ``results_dir``.

    ``notes_file``: the analysts' reading of the numbers (markdown), kept in its own file so that
    regenerating the tables never loses it."""
    files = sorted(Path(results_dir).glob(f"robustness_*_{split}.json"))
    if not files:
        raise FileNotFoundError(f"no robustness_<model>_{split}.json in {results_dir}; run "
                                "`python -m benchmarks.robustness --model NAME` first")
    parts = ["# Defenses under adversarial patches on CamVid", "",
             "Written by `python -m benchmarks.robustness_report` from the JSONs of `python -m benchmarks.robustness`.",
             ""]
    notes = []
    for f in files:
        res = json.loads(f.read_text())
        parts += [model_markdown(res, level=2), ""]
        notes.append(f"- `{res['settings']['model']}` ({res['settings']['frames']} frames, {_device(res)}): "
                     f"{zmask_vs_lgs(res)}")
    reading = (Path(notes_file).read_text().strip() if notes_file is not None and Path(notes_file).is_file()
               else "<!-- interpretation: write it in benchmarks/results/robustness_notes.md -->")
    parts += ["## Z-Mask vs LGS on L", "", *notes, "", reading, ""]
    return "\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.robustness_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=str(DEFAULT_DIR))
    p.add_argument("--split", default="val")
    p.add_argument("--out", default=str(Path("benchmarks") / "results" / "robustness.md"))
    p.add_argument("--notes", default=str(Path("benchmarks") / "results" / "robustness_notes.md"),
                   help="markdown inserted after the Z-Mask vs LGS numbers (skipped when missing)")
    args = p.parse_args(argv)
    try:
        text = combine(Path(args.results_dir), args.split, Path(args.notes))
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
