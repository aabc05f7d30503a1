"""Numbers, markdown table and frontier plot of an adaptive-attack run (``benchmarks.adaptive``)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from realtime.data import CLASSES, IGNORE_INDEX

from .robustness_metrics import detection_metrics, miou_from_confusion, sum_counts
from .robustness_runner import Cell

FLAG_BAR, UNDONE_BAR, KEPT_BAR = 0.90, 0.70, 0.30      # issue 22's pass rule for one frontier point


def _miou(rows) -> float:
    return float(miou_from_confusion(rows, CLASSES, IGNORE_INDEX)["miou"])


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den > 1e-9 else None


def summarize_point(cells: Dict[Tuple[str, str], Cell], name: str, defense: str = "zmask") -> Dict:
    """One frontier point: damage with and without Z-Mask, relative to the plain EOT patch, and detection.

    Clean mIoU is scored outside the L patch's place (the same pixels as the patched columns); damage
    kept = (clean - mIoU) / (clean - plain EOT undefended mIoU); undone = the part of the point's own
    undefended damage the defense removes."""
    clean_cell = cells[("none", "none")]
    clean = _miou(clean_cell.confusion_outside_l or clean_cell.confusion)
    undef = _miou(cells[("none", name)].confusion)
    zcell = cells[(defense, name)]
    defended = _miou(zcell.confusion)
    plain = clean - _miou(cells[("none", "eot_L")].confusion)
    flagged = np.asarray(zcell.flagged, dtype=bool)
    det = detection_metrics(cells[(defense, "none")].scores, zcell.scores)
    clean_flags = np.asarray(cells[(defense, "none")].flagged, dtype=bool)
    mask = sum_counts(np.asarray(zcell.mask_counts), zcell.pixels_per_frame).summary()
    kept_def = _ratio(clean - defended, plain)
    undone = _ratio(defended - undef, clean - undef)
    flag_rate = float(flagged.mean())
    caught = flag_rate >= FLAG_BAR and (undone is None or undone >= UNDONE_BAR)
    harmless = kept_def is not None and kept_def <= KEPT_BAR
    return {"clean": clean, "undefended": undef, "defended": defended,
            "damage_kept_undefended": _ratio(clean - undef, plain), "damage_kept_defended": kept_def,
            "damage_undone": undone, "flag_rate": flag_rate, "clean_fpr": float(clean_flags.mean()),
            "auc": det["auc"], "tpr_at_1pct_fpr": det["tpr_at_fpr"], "mask_iou": mask["iou"],
            "mean_score": float(np.mean(zcell.scores)), "passes": bool(caught or harmless),
            "why": "flagged and undone" if caught else "harmless" if harmless else
                   "flagged, too little undone" if flag_rate >= FLAG_BAR else "evades with damage"}


def _f(v: Optional[float], pct: bool = False) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:.0%}" if pct else f"{v:.3f}"


def _table(pts: Dict[str, Dict]) -> list:
    lines = ["| patch | undefended | defended | damage kept (undefended / defended) | undone | flagged | AUC | "
             "TPR@1%FPR | mask IoU | passes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, p in pts.items():
        lines.append(f"| {name} | {_f(p['undefended'])} | {_f(p['defended'])} | {_f(p['damage_kept_undefended'], True)}"
                     f" / {_f(p['damage_kept_defended'], True)} | {_f(p['damage_undone'], True)} | "
                     f"{_f(p['flag_rate'], True)} | {_f(p['auc'])} | {_f(p['tpr_at_1pct_fpr'], True)} | "
                     f"{_f(p['mask_iou'])} | {'yes' if p['passes'] else 'no'} ({p['why']}) |")
    if pts:
        first = next(iter(pts.values()))
        lines += ["", f"Clean mIoU (outside the L place) {_f(first['clean'])}; clean frames flagged "
                      f"{first['clean_fpr']:.1%}."]
    return lines


def frontier_markdown(res: Dict) -> str:
    """The frontier as a table, one row per patch, plain EOT first (and the same patches on other defenses)."""
    s = res["settings"]
    defense = s.get("defense", "zmask")
    lines = [f"# Adaptive frontier: `{s['model']}`, `{defense}`, calibration `{Path(s['calibration']).name}`", "",
             f"White-box patches against `{defense}` (L, warm-started from the library EOT L patch, {s['steps']} "
             f"steps x batch {s['batch_size']} on {s['craft_split']}), measured on {s['split']} ({s['eval']}). "
             f"Device: {res['env'].get('device', res['env'])}.", "",
             "Damage kept is relative to the plain EOT L patch's undefended damage. A point passes when it is "
             f"flagged on >= {FLAG_BAR:.0%} of frames with >= {UNDONE_BAR:.0%} of its damage undone, or keeps "
             f"<= {KEPT_BAR:.0%} of the damage after the defense.", "", *_table(res["points"])]
    for other, pts in (res.get("also_measured") or {}).items():
        lines += ["", f"## The same patches measured on `{other}` (crafted against `{defense}`: transfer, "
                      "not an adaptive attack on it)", "", *_table(pts)]
    return "\n".join(lines) + "\n"


def _series(points: Dict[str, Dict]) -> Dict[str, list]:
    """{attacker family: [(beta, point), ...] sorted by beta}; the plain EOT patch is beta 1 of 'plain'."""
    fam: Dict[str, list] = {}
    for name, p in points.items():
        attacker, sep, beta = name.rpartition("_b")
        if sep:
            fam.setdefault(attacker, []).append((float(beta), p))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in fam.items()}


def plot_frontier(res: Dict, path: Path) -> Optional[Path]:
    """Damage kept (with and without the defense) and flag rate against the attacker's weight beta, per
    attacker family and per measured defense (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    s = res["settings"]
    main = s.get("defense", "zmask")
    measured = {main: res["points"], **(res.get("also_measured") or {})}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.axhspan(0, KEPT_BAR, color="tab:green", alpha=0.12, label=f"harmless (<= {KEPT_BAR:.0%} kept)")
    ax2.axhspan(FLAG_BAR, 1.02, color="tab:blue", alpha=0.10, label=f"flagged >= {FLAG_BAR:.0%}")
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    plain = res["points"].get("eot_L")
    for defense, pts in measured.items():
        for family, series in _series(pts).items():
            c = next(colors)
            b = [t[0] for t in series]
            label = f"{family} vs {main}" + ("" if defense == main else f", on {defense}")
            ax1.plot(b, [t[1]["damage_kept_defended"] for t in series], "-o", color=c, label=f"{label}: defended")
            if defense == main:
                ax1.plot(b, [t[1]["damage_kept_undefended"] for t in series], "--", color=c, alpha=0.5,
                         label=f"{family}: undefended")
            ax2.plot(b, [t[1]["flag_rate"] for t in series], "-o", color=c, label=label)
    if plain is not None:
        ax1.axhline(plain["damage_kept_defended"], color="k", lw=0.8, ls=":", label=f"plain EOT L on {main}")
    ax1.set_xlabel("attacker's weight on damage (beta; 1 = no evasion term)")
    ax1.set_ylabel("damage kept vs plain EOT L (undefended)")
    ax2.set_xlabel("beta")
    ax2.set_ylabel("frames flagged")
    ax2.set_ylim(-0.02, 1.02)
    ax1.legend(fontsize=6)
    ax2.legend(fontsize=6)
    fig.suptitle(f"adaptive frontier: {s['model']}, {main} ({Path(s['calibration']).stem}), {s['split']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
