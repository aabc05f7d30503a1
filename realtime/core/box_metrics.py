"""COCO-style detection metrics through pycocotools (the reference implementation, not a re-derivation).

``coco_map(preds, targets)`` returns mAP@[.5:.95], mAP@0.5 and per-class AP@0.5 over all area ranges
and 100 detections per image, the numbers the paper reports for detectors.
"""
from __future__ import annotations

import contextlib
import io
from typing import Dict, List, Sequence

import numpy as np
import torch


def _xywh(boxes: torch.Tensor) -> np.ndarray:
    b = boxes.detach().float().cpu().numpy().reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def coco_map(preds: Sequence[Dict[str, torch.Tensor]], targets: Sequence[Dict[str, torch.Tensor]],
             class_names: Sequence[str], image_hw: Sequence[int] = (360, 480)) -> Dict:
    """mAP of ``preds`` (boxes/scores/labels per image) against ``targets`` (boxes/labels), labels 1..K."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
    cats = [{"id": i, "name": n} for i, n in enumerate(class_names, start=1)]
    images, anns, dets = [], [], []
    for img_id, (p, t) in enumerate(zip(preds, targets)):
        images.append({"id": img_id, "height": int(image_hw[0]), "width": int(image_hw[1])})
        for box, lab in zip(_xywh(t["boxes"]), t["labels"].tolist()):
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(lab), "bbox": box.tolist(),
                         "area": float(box[2] * box[3]), "iscrowd": 0})
        for box, score, lab in zip(_xywh(p["boxes"]), p["scores"].tolist(), p["labels"].tolist()):
            dets.append([img_id, *box.tolist(), float(score), int(lab)])
    result = {"map": 0.0, "map_50": 0.0, "ap50_per_class": {n: 0.0 for n in class_names},
              "images": len(images), "gt_boxes": len(anns), "detections": len(dets)}
    if not anns:
        raise ValueError("no ground-truth boxes: mAP is undefined")
    if not dets:
        return result
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": cats}
        gt.createIndex()
        dt = gt.loadRes(np.asarray(dets, dtype=np.float64))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    result["map"], result["map_50"] = float(max(ev.stats[0], 0.0)), float(max(ev.stats[1], 0.0))
    prec = ev.eval["precision"]          # [iou thr, recall, class, area range, max dets]
    for k, name in enumerate(class_names):
        p = prec[0, :, k, 0, -1]
        p = p[p > -1]
        result["ap50_per_class"][name] = float(p.mean()) if p.size else float("nan")
    return result


def predictions_to_cpu(outputs: List[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
    return [{k: v.detach().cpu() for k, v in o.items()} for o in outputs]
