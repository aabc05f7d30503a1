"""Markdown, JSON and plots of a physical-scene benchmark run, and the combined README table.

    python -m benchmarks.physical_report benchmarks/results/physical/*.json --markdown
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

from realtime.core.cli import write_json  # noqa: E402


def _f(v: Optional[float], pct: bool = False, digits: int = 0) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:.{digits}%}" if pct else f"{v:.3f}"


HEADER = ("| model | patch | calibration | clean | attacked | Z-Mask | live | oracle mask | damage undone (frame / live "
          "/ oracle) | flagged | alarm | frames to alarm (max) | mask IoU (frame / live) | clean FPR | clean alarms |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")


def table_row(result: Dict) -> str:
    c, t = result["config"], result["totals"]
    m = t["miou"]
    fta = t["frames_to_alarm"]
    delay = "never" if fta["max"] is None else str(fta["max"])
    return (f"| `{c['model']}` | {Path(c['patch_path']).stem} | {c['tag']} | {_f(m['clean'])} | {_f(m['attacked'])} "
            f"| {_f(m['defended'])} | {_f(m['live'])} | {_f(m['oracle'])} | {_f(t['damage_undone'], True)} / "
            f"{_f(t['damage_undone_live'], True)} / {_f(t['damage_undone_oracle'], True)} | {_f(t['flag_rate'], True)} | {_f(t['alarm_rate'], True)} | {delay} "
            f"| {_f(t['mask']['iou_pooled'])} / {_f(t['live_mask']['iou_pooled'])} | {_f(t['clean_fpr'], True, 1)} "
            f"| {t['clean_alarm_frames']} in {t['clean_sequences_with_alarm']} seq |\n")


def markdown(result: Dict) -> str:
    c, t = result["config"], result["totals"]
    lines = [f"# Physical-scene benchmark: `{c['model']}`, patch {Path(c['patch_path']).stem}, calibration {c['tag']}\n\n",
             f"Split {c['split']}, {t['runs']} runs ({c['seeds']} placements per sequence), {t['patched_frames']} "
             f"patched frames; clean false positives on every frame of {', '.join(c['clean_splits'])} "
             f"({t['clean_frames']} frames). Voting {result['identity']['vote']}. mIoU on pixels outside the poster "
             f"(CamVid labels). Device: {result['env'].get('device', result['env'])}; {result['seconds']} s.\n\n",
             HEADER, table_row(result), "\n## Per run\n\n",
             "| sequence | seed | poster scale | patched | clean | attacked | Z-Mask | live | oracle mask | flagged | alarm "
             "| to alarm | mask IoU (frame / live) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- |\n"]
    for r in result["runs"]:
        rt, m = r["totals"], r["totals"]["miou"]
        lines.append(f"| {r['sequence']} | {r['seed']} | {r['poster_scale']} | {rt['patched_frames']} | {_f(m['clean'])} "
                     f"| {_f(m['attacked'])} | {_f(m['defended'])} | {_f(m['live'])} | {_f(m['oracle'])} | {_f(rt['flag_rate'], True)} "
                     f"| {_f(rt['alarm_rate'], True)} | {rt['frames_to_alarm']['max']} "
                     f"| {_f(rt['mask']['iou_pooled'])} / {_f(rt['live_mask']['iou_pooled'])} |\n")
    lines.append("\n## Clean sequences\n\n| split | sequence | frames | flagged | alarm frames | max d |\n"
                 "| --- | --- | --- | --- | --- | --- |\n")
    for s in result["clean"]:
        lines.append(f"| {s['split']} | {s['sequence']} | {s['frames']} | {s['flagged']} | {s['alarm_frames']} "
                     f"| {_f(s['max_score'])} |\n")
    lines.append(f"\n![score traces]({Path(result['plots']['traces']).name})\n")
    return "".join(lines)


def plot_traces(result: Dict, path: Path) -> Path:
    """Per run: the single-frame score d over the frames, lambda0, the poster's frames and the live alarm."""
    runs = result["runs"]
    lam = result["zmask"].get("lambda0")
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 1.7 * len(runs) + 0.6), squeeze=False, sharex=False)
    for ax, r in zip(axes[:, 0], runs):
        tr = r["trace"]
        xs = list(range(len(tr["gt"])))
        for i, g in enumerate(tr["gt"]):
            if g:
                ax.axvspan(i - 0.5, i + 0.5, color="#f4c7c3", lw=0)
        ys = [s if s is not None else float("nan") for s in tr["scores"]]
        ax.plot(xs, ys, color="#1f4e79", lw=1.2, label="d (single frame)")
        if lam is not None:
            ax.axhline(lam, color="k", ls="--", lw=0.8, label="lambda0")
        top = max([y for y in ys if y == y] + [lam or 0.0, 1e-6])
        alarm = [i for i, v in enumerate(tr["live"]) if v == 2]
        ax.scatter(alarm, [top * 1.05] * len(alarm), s=6, color="#c00000", label="live alarm")
        ax.set_title(f"{r['sequence']} seed {r['seed']} (poster scale {r['poster_scale']})", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("frame (red band: poster visible)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: Dict, out_dir: Path, name: str) -> None:
    result["plots"] = {"traces": str(plot_traces(result, out_dir / f"{name}_traces.png"))}
    write_json(out_dir / f"{name}.json", result)
    (out_dir / f"{name}.md").write_text(markdown(result))


def combined(paths: Sequence[Path]) -> str:
    rows: List[str] = [json.loads(Path(p).read_text()) for p in paths]
    return HEADER + "".join(table_row(r) for r in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.physical_report", description=__doc__)
    p.add_argument("results", nargs="+", help="JSON files written by benchmarks.physical")
    a = p.parse_args(argv)
    print(combined([Path(r) for r in a.results]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
