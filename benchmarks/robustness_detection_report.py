"""Numbers, markdown tables and the mAP bar chart of the detection robustness benchmark.

Kept apart from the runner (``benchmarks.robustness_detection``) so the metric pieces (false detections on
the patch, per-cell summaries) are testable on hand-made detections without a model. mAP is
``realtime.core.box_metrics.coco_map`` (pycocotools) on the whole image against every ground-truth box;
detection AUC is ``benchmarks.robustness_metrics.detection_metrics`` with the same defense's clean-frame
scores as negatives, as in the segmentation benchmark.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from realtime.core.compat import import_torchvision  # noqa: E402
from realtime.core.box_metrics import coco_map  # noqa: E402

from .robustness_metrics import detection_metrics  # noqa: E402
from .robustness_report import _device, _f, save_figure  # noqa: E402
from .robustness_summary import _latency  # noqa: E402

DEFAULT_DET_DIR = Path("benchmarks") / "results" / "robustness_detection"


def false_detections_on_patch(boxes: Sequence[Sequence[float]], scores: Sequence[float],
                              patch_box: Optional[Sequence[float]], score_thr: float = 0.3,
                              iou_thr: float = 0.3) -> int:
    """Detections with score >= ``score_thr`` whose box has IoU >= ``iou_thr`` with the patch's box.

    What an APRICOT-style patch is made for: objects that are not there, on the patch itself.
    """
    if patch_box is None or not len(boxes):
        return 0
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    keep = torch.as_tensor(scores, dtype=torch.float32).reshape(-1) >= score_thr
    if not bool(keep.any()):
        return 0
    iou = import_torchvision().ops.box_iou(b[keep], torch.as_tensor([list(patch_box)], dtype=torch.float32))[:, 0]
    return int((iou >= iou_thr).sum())


def as_tensors(det: Dict[str, list]) -> Dict[str, torch.Tensor]:
    """Stored boxes / labels (and scores, for detections) as the tensors ``coco_map`` takes."""
    out = {"boxes": torch.as_tensor(det["boxes"], dtype=torch.float32).reshape(-1, 4),
           "labels": torch.as_tensor(det["labels"], dtype=torch.int64)}
    if "scores" in det:
        out["scores"] = torch.as_tensor(det["scores"], dtype=torch.float32)
    return out


def summarize_detection_cell(cell: Any, clean: Optional[Any], targets: Sequence[Dict[str, torch.Tensor]],
                             class_names: Sequence[str], image_hw: Sequence[int], max_fpr: float = 0.01,
                             score_thr: float = 0.3, iou_thr: float = 0.3) -> Dict:
    """Reported numbers of one cell; ``clean`` is the same defense's ``none`` cell (ROC negatives)."""
    m = coco_map([as_tensors(d) for d in cell.detections], targets, class_names, image_hw)
    per_frame = [false_detections_on_patch(d["boxes"], d["scores"], pb, score_thr, iou_thr)
                 for d, pb in zip(cell.detections, cell.patch_boxes)]
    out: Dict = {"frames": len(cell.latency_ms), "map": m["map"], "map_50": m["map_50"],
                 "ap50_per_class": m["ap50_per_class"], "detections": m["detections"], "gt_boxes": m["gt_boxes"],
                 "latency_ms": _latency(cell.latency_ms),
                 "patch_false_detections": {"total": int(sum(per_frame)),
                                            "per_frame": float(np.mean(per_frame)) if per_frame else None,
                                            "frames_with_any": int(sum(v > 0 for v in per_frame)),
                                            "at": "L place" if cell.condition == "none" else "patch"}}
    if cell.flagged is not None:
        out["flag_rate"] = float(np.mean(cell.flagged)) if len(cell.flagged) else None
    if cell.scores is not None:
        out["scores"] = [float(v) for v in cell.scores]
        out["mean_score"] = float(np.mean(cell.scores)) if len(cell.scores) else None
        if cell.condition != "none" and clean is not None and clean.scores is not None:
            out["detection"] = detection_metrics(clean.scores, cell.scores, max_fpr)
    return out


def summarize_detection_defense(cells: Dict[str, Any], targets: Sequence[Dict[str, torch.Tensor]],
                                class_names: Sequence[str], image_hw: Sequence[int], max_fpr: float = 0.01,
                                score_thr: float = 0.3, iou_thr: float = 0.3) -> Dict:
    """``{"conditions": {name: numbers}, "latency_ms": over every timed frame, "frames_timed": n}``."""
    clean = cells.get("none")
    lat = [v for c in cells.values() for v in c.latency_ms]
    return {"conditions": {name: summarize_detection_cell(c, clean, targets, class_names, image_hw, max_fpr,
                                                          score_thr, iou_thr) for name, c in cells.items()},
            "latency_ms": _latency(lat), "frames_timed": len(lat)}


def _cell(res: Dict, defense: str, cond: str) -> Dict:
    return res["results"].get(defense, {}).get("conditions", {}).get(cond) or {}


def _table(head: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _label(cond: str) -> str:
    return "clean" if cond == "none" else cond


def table_map(res: Dict) -> List[str]:
    """mAP@0.5 (mAP@[.5:.95]) per defense x condition, plus median latency."""
    conds = list(res["conditions"])
    rows = []
    for d, r in res["results"].items():
        cells = [f"{_f(_cell(res, d, c).get('map_50'))} ({_f(_cell(res, d, c).get('map'))})" for c in conds]
        rows.append([f"`{d}`", *cells, _f(r.get("latency_ms", {}).get("median"), 1)])
    return _table(["defense", *map(_label, conds), "latency ms (median)"], rows)


def table_auc(res: Dict) -> List[str]:
    """AUC / TPR at the max FPR / flag rate of each flagging defense, per patched condition."""
    flagging = [d for d, r in res["results"].items() if r.get("flags")]
    conds = [c for c in res["conditions"] if c != "none"]
    if not flagging or not conds:
        return []
    rows = []
    for d in flagging:
        row = [f"`{d}`", _f(_cell(res, d, "none").get("flag_rate"))]
        for c in conds:
            cell = _cell(res, d, c)
            det = cell.get("detection") or {}
            row.append(f"{_f(det.get('auc'))} / {_f(det.get('tpr_at_fpr'))} / {_f(cell.get('flag_rate'))}")
        rows.append(row)
    return _table(["defense", "flag rate clean", *conds], rows)


def table_false_detections(res: Dict) -> List[str]:
    """False detections on the patch: total (frames with any), clean column at the L place."""
    conds = list(res["conditions"])
    rows = []
    for d in res["results"]:
        row = [f"`{d}`"]
        for c in conds:
            fd = _cell(res, d, c).get("patch_false_detections") or {}
            row.append(f"{fd.get('total', '-')} ({fd.get('frames_with_any', '-')})")
        rows.append(row)
    return _table(["defense", *[("clean (L place)" if c == "none" else c) for c in conds]], rows)


def table_per_class(res: Dict, cond: str = "eot_L") -> List[str]:
    """Per-class AP@0.5 of every defense on ``cond`` (and clean, for reference)."""
    if cond not in res["conditions"]:
        return []
    names = res["settings"]["class_names"]
    rows = []
    for d in res["results"]:
        for c in ("none", cond):
            ap = _cell(res, d, c).get("ap50_per_class") or {}
            rows.append([f"`{d}`", _label(c), *[_f(ap.get(n)) for n in names]])
    return _table(["defense", "condition", *names], rows)


def model_markdown(res: Dict, level: int = 1) -> str:
    """Every table of one detector's results."""
    h = "#" * level
    s, env = res["settings"], res.get("env", {})
    fd = s.get("false_detection", {})
    parts = [f"{h} Detection robustness: `{s['model']}` on CamVid {s['split']}", "",
             f"{s['frames']} {s['split']} frames ({s.get('gt_boxes', '?')} ground-truth boxes), every "
             f"frame stride {s.get('every', 1)}, one placement per frame (seed {s['seed']}, same place for every "
             f"defense and condition), capture `{s['capture']}`, batch {s['batch']}; device {_device(res)}, torch "
             f"{env.get('torch', '?')}, torchvision {env.get('torchvision', '?')}, pycocotools "
             f"{env.get('pycocotools', '?')}; weights `{s.get('weights')}` (fingerprint `{s['fingerprint']}`), "
             f"commit `{(res.get('git_commit') or '?')[:12]}`.", "",
             f"{h}# COCO mAP@0.5 (mAP@[.5:.95]), whole image, all ground-truth boxes", "",
             "pycocotools over every frame; boxes hidden behind the patch still count (the paper's protocol). "
             "Latency: the defense call per frame, median over all its cells.", "", *table_map(res), ""]
    auc = table_auc(res)
    if auc:
        parts += [f"{h}# Attack detection: AUC / TPR at {s.get('max_fpr', 0.01):.0%} FPR / flag rate", "",
                  "ROC negatives: the same defense's scores on the clean frames; positives: the patched frames.",
                  "", *auc, ""]
    parts += [f"{h}# False detections on the patch: total (frames with any)", "",
              f"Detections with score >= {fd.get('score_thr', 0.3)} whose box has IoU >= {fd.get('iou_thr', 0.3)} "
              "with the patch's box; the clean column counts them where the L patch would be.", "",
              *table_false_detections(res), ""]
    pc = table_per_class(res)
    if pc:
        parts += [f"{h}# Per-class AP@0.5, clean and eot_L", "", *pc, ""]
    if res.get("skipped"):
        parts += ["Defenses not run: " + "; ".join(f"`{k}` ({v})" for k, v in res["skipped"].items()), ""]
    return "\n".join(parts)


def plot_map(res: Dict, path: Path) -> bool:
    """Grouped bars: mAP@0.5 per condition, one bar per defense; False when there is nothing to plot."""
    defenses, conds = list(res["results"]), list(res["conditions"])
    if not defenses or not conds:
        return False
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(conds) + 2), 3.6), dpi=110)
    width = 0.8 / len(defenses)
    for k, d in enumerate(defenses):
        vals = [_cell(res, d, c).get("map_50") for c in conds]
        ax.bar(np.arange(len(conds)) + (k - (len(defenses) - 1) / 2) * width,
               [v if v is not None else np.nan for v in vals], width, label=d)
    ax.set_xticks(np.arange(len(conds)), [_label(c) for c in conds], fontsize=8)
    ax.set_ylabel("COCO mAP@0.5 (whole image)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{res['settings']['model']}: mAP@0.5 per condition ({res['settings']['frames']} frames)", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_outputs(res: Dict, out_dir: Path) -> List[Path]:
    """``robustness_<model>_<split>.md`` and ``..._map50.png`` in ``out_dir``; returns the files written."""
    s = res["settings"]
    stem = Path(out_dir) / f"robustness_{s['model']}_{s['split']}"
    md = stem.with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(model_markdown(res))
    png = Path(f"{stem}_map50.png")
    return [md, png] if plot_map(res, png) else [md]


__all__ = ["DEFAULT_DET_DIR", "false_detections_on_patch", "model_markdown", "plot_map",
           "summarize_detection_cell", "summarize_detection_defense", "write_outputs"]
