"""Detection robustness benchmark: false detections on the patch, task dispatch, and a tiny real run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.robustness import main as robustness_main
from benchmarks.robustness import resolve_task
from benchmarks.robustness_conditions import library_conditions, load_condition
from benchmarks.robustness_detection import mask_box
from benchmarks.robustness_detection_report import false_detections_on_patch
from realtime.attacks.apply import save_patch_png


def test_false_detection_counter_counts_only_confident_boxes_on_the_patch():
    patch = [100.0, 100.0, 250.0, 250.0]
    boxes = [[110, 105, 240, 245],          # on the patch, confident: counted
             [300, 20, 360, 90],            # elsewhere: ignored
             [100, 100, 250, 250],          # on the patch but below the score threshold: ignored
             [200, 200, 400, 400]]          # overlaps the patch a little (IoU ~0.11): ignored
    scores = [0.9, 0.95, 0.2, 0.8]
    assert false_detections_on_patch(boxes, scores, patch) == 1
    assert false_detections_on_patch(boxes, scores, patch, score_thr=0.1) == 2
    assert false_detections_on_patch(boxes, scores, None) == 0            # no patch: nothing is "on" it
    assert false_detections_on_patch([], [], patch) == 0


def test_mask_box_is_the_exclusive_xyxy_box_of_the_patch():
    m = torch.zeros(1, 10, 12)
    m[0, 2:5, 3:9] = 1
    assert mask_box(m) == [3.0, 2.0, 9.0, 5.0]
    assert mask_box(torch.zeros(1, 4, 4)) is None


def test_apricot_condition_is_discovered_after_table4(tmp_path):
    for name in ("apricot_L", "eot_L", "random_L"):
        save_patch_png(torch.rand(3, 6, 6), tmp_path / f"det_{name}.png", {"kind": name.split("_")[0]})
    assert library_conditions("det", tmp_path) == ["none", "random_L", "eot_L", "apricot_L"]
    assert load_condition("det", "apricot_L", tmp_path).kind == "apricot"


def test_task_defaults_to_the_models_and_rejects_a_mismatch(capsys):
    assert resolve_task("fcos_ddrnet", None) == "detection"
    assert resolve_task("ddrnet23_slim", None) == "segmentation"
    with pytest.raises(ValueError, match="segmentation model"):
        resolve_task("ddrnet23_slim", "detection")
    assert robustness_main(["--model", "fcos_ddrnet", "--task", "segmentation", "--quiet"]) == 2
    assert "is a detection model" in capsys.readouterr().err


def _toy_detector_calibration(model, path: Path) -> Path:
    """A Z-Mask artifact for ``model`` with made-up channel statistics (shapes from one forward pass)."""
    from realtime.defenses.artifact import Calibration
    from realtime.defenses import ChannelStats, FusionBlock, SPRConfig, ZMaskConfig
    from realtime.models import fingerprint

    spec = model.layers()
    names = sorted(set(spec.shallow) | set(spec.deep))
    mods = dict(model.named_modules())
    chans, hooks = {}, []
    for n in names:
        hooks.append(mods[n].register_forward_hook(lambda m, i, o, n=n: chans.__setitem__(n, o.shape[1])))
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(0)
    stats = ChannelStats({n: torch.rand(chans[n], generator=g) for n in names},
                         {n: torch.rand(chans[n], generator=g) + 0.5 for n in names})
    cfg = ZMaskConfig(shallow=tuple(spec.shallow), deep=tuple(spec.deep),
                      spr=SPRConfig.for_input(360, 480, task="detection"), lambda0=0.25)
    cal = Calibration(model_name="fcos_ddrnet", fingerprint=fingerprint(model), input_size=(360, 480), config=cfg,
                      stats=stats, fusion=FusionBlock(w1=2.0).to_dict(), extra={"note": "toy"})
    return cal.save(path)


def test_end_to_end_tiny_detection_run(tmp_path):
    from realtime.data import CamVid, DataNotFoundError
    from realtime.models import build_model, fingerprint
    from realtime.models.registry import save_weights
    try:
        CamVid(None, "val")
    except DataNotFoundError as exc:
        pytest.skip(f"CamVid data not found: {exc}")
    torch.manual_seed(0)
    weights = save_weights(build_model("fcos_ddrnet", weights=None), tmp_path / "fcos.pt")
    model = build_model("fcos_ddrnet", weights=weights)           # what the benchmark will load
    cal = _toy_detector_calibration(model, tmp_path / "cal.safetensors")
    lib = tmp_path / "lib"
    save_patch_png(torch.rand(3, 150, 150, generator=torch.Generator().manual_seed(1)),
                   lib / "fcos_ddrnet_eot_L.png",             # random pixels under the eot_L name
                   {"kind": "eot", "task": "detection", "size": "L", "fingerprint": fingerprint(model)})
    out = tmp_path / "out"
    # lgs left out to stay well under 90 s on a loaded 2-core CPU (it is a plain image preprocessor here)
    args = ["--model", "fcos_ddrnet", "--weights", str(weights), "--calibration", str(cal), "--limit", "2",
            "--defenses", "none,zmask",
            "--library", str(lib), "--out-dir", str(out), "--device", "cpu", "--quiet"]
    assert robustness_main(args) == 0
    res = json.loads((out / "robustness_fcos_ddrnet_val.json").read_text())
    assert res["task"] == "detection" and res["settings"]["frames"] == 2
    assert list(res["results"]) == ["none", "zmask"] and list(res["conditions"]) == ["none", "eot_L"]
    for d, r in res["results"].items():
        for c in ("none", "eot_L"):
            cell = r["conditions"][c]
            assert 0 <= cell["map_50"] <= 1 and 0 <= cell["map"] <= 1, (d, c)
            assert set(cell["ap50_per_class"]) == {"car", "pedestrian", "bicyclist", "sign/symbol"}
            assert cell["latency_ms"]["median"] > 0 and "patch_false_detections" in cell
    z = res["results"]["zmask"]["conditions"]
    assert 0 <= z["eot_L"]["detection"]["auc"] <= 1 and len(z["none"]["scores"]) == 2
    assert "detection" not in res["results"]["none"]["conditions"]["eot_L"]
    md = (out / "robustness_fcos_ddrnet_val.md").read_text()
    assert md.count("| `zmask` |") >= 3 and "| `none` | clean |" in md and "Attack detection: AUC" in md
    assert (out / "robustness_fcos_ddrnet_val_map50.png").stat().st_size > 1000
    cell_file = out / "partial" / "fcos_ddrnet_val" / "zmask__eot_L.json"
    before = cell_file.stat().st_mtime_ns
    assert robustness_main(args + ["--resume"]) == 0
    assert cell_file.stat().st_mtime_ns == before                    # reused, not recomputed
