"""Collect result JSONs into the markdown tables people read: undefended attack strength per model.

    python -m benchmarks.report

Reads ``benchmarks/results/attacks/<model>_eot_<S|M|L>.json`` (written by ``realtime.attacks.evaluate``)
and writes ``benchmarks/results/attacks.md``.
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results")
    a = p.parse_args(argv)
    res = Path(a.results)
    md = attacks_markdown(res)
    (res / "attacks.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
