"""Collect result JSONs into the markdown tables people read: undefended attack strength per model.

    python -m benchmarks.report

Reads ``benchmarks/results/attacks/<model>_eot_<S|M|L>.json`` (written by ``realtime.attacks.evaluate``)
and writes ``benchmarks/results/attacks.md``; reads ``benchmarks/results/calibration/<model>/val.json``
(``calibration.evaluate``) and writes ``benchmarks/results/zmask_val.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict


def attacks_markdown(results: Path) -> str:
    by_model: Dict[str, Dict[str, Dict]] = {}
    for f in sorted((results / "attacks").glob("*_eot_*.json")):
        d = json.loads(f.read_text())
        by_model.setdefault(d["model"], {})[f.stem.rsplit("_", 1)[-1]] = d
    lines = ["# Undefended models under universal EOT patches (CamVid val)", "",
             "mIoU on the pixels outside the patch (patch pixels and void ignored in clean and patched alike).",
             "Each frame gets the patch at seeded random places (`--placements` per frame, no capture",
             "transforms at test time); the random control is a uniform-noise patch of the L size.", "",
             "| model | clean | random L | EOT S | EOT M | EOT L | frames x placements | device |",
             "|---|---|---|---|---|---|---|---|"]
    for model, sizes in by_model.items():
        if not {"S", "M", "L"} <= set(sizes):
            continue
        L = sizes["L"]
        ctrl = L.get("control", {}).get("patched_miou")
        lines.append(f"| `{model}` | {L['clean_miou']:.4f} | {ctrl:.4f} | {sizes['S']['patched_miou']:.4f} | "
                     f"{sizes['M']['patched_miou']:.4f} | {L['patched_miou']:.4f} | {L['frames']} x {L['placements']} | "
                     f"{L['env'].get('gpu', L['env']['device'] + ' (' + L['env']['threads'] + ' threads)')} |")
    lines += ["", "Patches: `realtime/attacks/library/<model>_eot_<size>.png` (1500 steps, batch 12, EOT with the",
              "physical-capture simulation, crafted on an NVIDIA H100 with `scripts/craft_library_gpu.sh`).", ""]
    return "\n".join(lines)


def zmask_markdown(results: Path, subdir: str = "calibration", title: str = "the shipped calibrations") -> str:
    lines = [f"# Z-Mask detection and masking with {title} (CamVid val)", "",
             "`python -m calibration.evaluate --model NAME --split val`: every val frame clean, and again with each",
             "patch at a seeded random place through the physical-capture simulation. AUC: score d of patched vs",
             "clean frames. TPR / FPR at the calibrated lambda0 (chosen for <= 1 % FPR on clean *train* frames).",
             "Mask IoU: Z-Mask's binary mask vs the true patch, on flagged frames. Gate: mean of the learned",
             "region-of-interest gate g inside / outside the patch (the authors' block learned g ~ 1 everywhere).", "",
             "| model | S / D layers | lambda0 | clean FPR | patch | AUC | TPR | mask IoU | gate in / out |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in sorted((results / subdir).glob("*/val.json")):
        d = json.loads(f.read_text())
        layers = f"{', '.join(d['shallow'])} / {', '.join(d['deep'])}"
        for i, (name, c) in enumerate(d["conditions"].items()):
            iou = "-" if c["mask_iou_flagged"] is None else f"{c['mask_iou_flagged']:.3f}"
            head = (f"| `{d['model']}` | {layers} | {d['lambda0']:.4g} | {d['clean_fpr']:.3f} " if i == 0
                    else "| | | | ")
            lines.append(head + f"| {name.replace(d['model'] + '_', '')} | {c['auc']:.3f} | {c['tpr_at_lambda0']:.3f} | "
                         f"{iou} | {c['gate_mean_inside_patch']:.2f} / {c['gate_mean_outside_patch']:.2f} |")
        env = d["env"]
        lines.append(f"| | {d['frames']} frames, {env.get('gpu', env['device'] + ' ' + env['threads'] + ' threads')} "
                     "| | | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results")
    a = p.parse_args(argv)
    res = Path(a.results)
    tables = [("attacks.md", attacks_markdown(res)), ("zmask_val.md", zmask_markdown(res))]
    if (res / "calibration_simple").is_dir():
        tables.append(("zmask_val_simple.md", zmask_markdown(
            res, "calibration_simple", "the 'simple' calibrations (fusion trained on noise + EOT patches)")))
    for name, md in tables:
        (res / name).write_text(md)
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
