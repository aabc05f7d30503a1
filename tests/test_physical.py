"""Physical rendering (facade posters, occlusion, EOT through the scene), Z-Mask mask growing, and the
physical-scene benchmark's metrics and (with CamVid) its end-to-end run."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.physical_metrics import MaskSums, RunSums, confusion, damage_undone, miou, totals
from calibration.patched_set import PatchSource, patch_frames
from realtime.attacks import CaptureConfig, EOTConfig, craft_universal_patch
from realtime.attacks.scene import (BUILDING, ROAD, SceneConfig, SceneSampler, convex, occluders, place_poster,
                                    poster_candidate, quad_fill)
from realtime.data import NUM_CLASSES
from realtime.defenses import ChannelStats, SPRConfig, ZMask, ZMaskConfig
from realtime.defenses.artifact import Calibration, load_calibration


def street(h: int = 90, w: int = 120, pole: bool = True) -> np.ndarray:
    """A synthetic label map: sky on top, buildings on the left, road converging to the centre, a pole."""
    lab = np.zeros((h, w), np.int64)                     # 0 = sky
    lab[10:70, : w // 2 - 10] = BUILDING
    for y in range(40, h):                               # a road widening towards the camera
        half = int((y - 40) * 1.2) + 2
        lab[y, max(w // 2 - half, 0): w // 2 + half] = ROAD
    if pole:
        lab[20:70, 20:23] = 2                            # pole: an occluder
    return lab


def test_poster_lies_on_the_facade_in_perspective():
    lab = street()
    quad = place_poster(lab, 0.8)
    assert quad is not None and convex(quad)
    inside = quad_fill(quad, lab.shape)
    assert (lab[inside] == BUILDING).mean() >= 0.5
    left_h, right_h = quad[3, 1] - quad[0, 1], quad[2, 1] - quad[1, 1]
    assert right_h < left_h                              # the far edge (towards the VP) is shorter
    assert place_poster(np.zeros((90, 120), np.int64), 0.8) is None      # no facade, no poster
    assert poster_candidate(lab, 0.8, 0.18, left=False) is None          # no building on the right


def test_scene_sampler_renders_occluded_posters_and_falls_back():
    labels = torch.from_numpy(np.stack([street(), np.zeros((90, 120), np.int64)])).to(torch.uint8)
    sampler = SceneSampler(labels, SceneConfig(candidates=4), seed=1)
    assert sampler.coverage() == 0.5 and len(sampler.quads[0]) > 0 and sampler.quads[1] == []
    images = torch.full((2, 3, 90, 120), 0.5)
    patch = torch.rand(3, 10, 12, requires_grad=True)
    out, mask = sampler.apply(images, patch, [0, 1], CaptureConfig.none(), torch.Generator().manual_seed(0))
    occ = occluders(labels)
    assert mask.sum() > 0 and not bool((mask.bool() & occ).any())       # the pole hides the poster
    changed = (out - images).abs().sum(1, keepdim=True) > 1e-6
    assert not bool((changed & ~mask.bool()).any())                      # nothing changes outside the mask
    assert mask[1].sum() > 0                                             # no facade: random placement
    out.sum().backward()
    assert patch.grad is not None and patch.grad.abs().sum() > 0


class TinySeg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, NUM_CLASSES, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_eot_through_the_scene_is_seeded_and_differs_from_digital():
    labels = torch.from_numpy(np.stack([street()] * 3)).to(torch.uint8)
    images = (torch.rand(3, 3, 90, 120, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    cfg = EOTConfig(hw=(8, 10), steps=2, batch_size=2, seed=3, scene=SceneConfig(candidates=3))
    a, _ = craft_universal_patch(TinySeg().eval(), images, labels, cfg, "cpu", progress=False)
    b, _ = craft_universal_patch(TinySeg().eval(), images, labels, cfg, "cpu", progress=False)
    c, _ = craft_universal_patch(TinySeg().eval(), images, labels, dataclasses.replace(cfg, scene=None), "cpu",
                                 progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert cfg.identity() != dataclasses.replace(cfg, scene=None).identity()   # no cross-resume


def test_patched_set_placements():
    labels = torch.from_numpy(np.stack([street()] * 4)).to(torch.uint8)
    images = torch.full((4, 3, 90, 120), 128, dtype=torch.uint8)
    src = [PatchSource("p", "crafted", torch.rand(3, 10, 12))]
    with pytest.raises(ValueError, match="SceneSampler"):
        patch_frames(images, src, placement="scene")
    sampler = SceneSampler(labels, seed=0)
    _, masks, names = patch_frames(images, src, scene=sampler, placement="mixed")
    assert names == ["p", "p@scene", "p", "p@scene"]
    occ = occluders(labels)
    assert all(not bool((masks[i].bool() & occ[i]).any()) for i in (1, 3))


# --------------------------------------------------------------------------- mask growing

class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Identity()
        self.b = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _grow_zmask(threshold):
    cfg = ZMaskConfig(shallow=("a",), deep=("b",), spr=SPRConfig((12, 12), ((1, 1),), ((1, 1),)), lambda0=-1e9,
                      grow_threshold=threshold, grow_steps=24)
    stats = ChannelStats({k: torch.zeros(3) for k in "ab"}, {k: torch.ones(3) for k in "ab"})
    return ZMask(Stem(), cfg, stats)


def test_grow_fills_the_connected_over_activated_region_only():
    zm = _grow_zmask(0.5)
    soft = torch.zeros(1, 1, 12, 12)
    soft[0, 0, 3, 3] = 0.9                       # the detected hot spot
    fine = torch.zeros(1, 1, 12, 12)
    fine[0, 0, 2:7, 2:9] = 1.0                   # the whole poster over-activates
    fine[0, 0, 10:12, 10:12] = 1.0               # an unconnected hot region: not masked
    grown = zm.grow(soft, fine) > zm.cfg.mask_threshold
    assert int(grown.sum()) == 5 * 7 and bool(grown[0, 0, 2:7, 2:9].all()) and not bool(grown[0, 0, 10:, 10:].any())
    x = torch.zeros(1, 3, 12, 12)
    x[:, :, 2:7, 2:9] = 2.0
    x[:, :, 3, 3] = 5.0
    res_grow, res_plain = zm.analyse(x), _grow_zmask(None).analyse(x)
    assert int((res_grow.mask < 0.5).sum()) >= int((res_plain.mask < 0.5).sum())
    assert torch.equal(res_grow.soft_mask, res_plain.soft_mask)      # the soft mask itself is not changed


def test_grow_settings_round_trip_and_are_validated(tmp_path):
    zm = _grow_zmask(0.25)
    cal = Calibration(model_name="stem", fingerprint="x", input_size=(12, 12), config=zm.cfg, stats=zm.stats,
                      fusion=zm.fusion.to_dict(), roc={}, extra={})
    path = cal.save(tmp_path / "g.safetensors")
    back = load_calibration(path)
    assert back.config.grow_threshold == 0.25 and back.config.grow_steps == 24
    plain = dataclasses.replace(cal, config=dataclasses.replace(zm.cfg, grow_threshold=None))
    assert load_calibration(plain.save(tmp_path / "p.safetensors")).config.grow_threshold is None
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["zmask"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header["grow"] = {"threshold": "high", "steps": 3}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"zmask": json.dumps(header)})
    with pytest.raises(ValueError, match="grow.threshold"):
        load_calibration(tmp_path / "bad.safetensors")


# --------------------------------------------------------------------------- benchmark metrics

def test_metrics_add_up():
    lab = np.array([[0, 1], [1, 11]])
    cm = confusion(np.array([[0, 1], [0, 0]]), lab, np.ones((2, 2), bool))
    assert cm.sum() == 3 and cm[1, 0] == 1                      # the void pixel (11) is not counted
    assert miou(cm) == pytest.approx((0.5 + 0.5) / 2)
    assert damage_undone(0.7, 0.5, 0.6) == pytest.approx(0.5) and damage_undone(0.7, 0.7, 0.7) is None
    m = MaskSums()
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    pred = np.zeros((4, 4), bool)
    pred[:2, :1] = True
    m.add(pred, gt)
    m.add(None, gt)
    s = m.summary()
    assert s["iou_pooled"] == pytest.approx(2 / 8) and s["precision"] == 1.0 and s["masked_frames"] == 1
    r = RunSums(frames=3, patched=2, flagged=1, frames_to_alarm=2)
    t = totals([r, RunSums.from_dict(json.loads(json.dumps(r.to_dict())))], [[False, True]], [[False, False]])
    assert t["flag_rate"] == 0.5 and t["clean_fpr"] == 0.5 and t["frames_to_alarm"]["max"] == 2


def test_physical_benchmark_end_to_end(tmp_path, camvid_root):
    from benchmarks.physical import main
    out = tmp_path / "phys"
    args = ["--model", "ddrnet23_slim", "--patch", "eot_L", "--seeds", "1", "--limit", "8", "--clean-splits", "val",
            "--data", str(camvid_root), "--out-dir", str(out), "--quiet"]
    assert main(args) == 0
    res = json.loads((out / "ddrnet23_slim_eot_L_shipped.json").read_text())
    t = res["totals"]
    assert t["patched_frames"] == 4 and t["clean_frames"] == 8
    assert 0 <= t["miou"]["attacked"] <= 1 and (out / "ddrnet23_slim_eot_L_shipped_traces.png").is_file()
    assert main(args + ["--resume"]) == 0                       # finished runs are read back
    assert json.loads((out / "ddrnet23_slim_eot_L_shipped.json").read_text())["totals"] == t


def test_physical_cue_option_reaches_the_defense_and_the_run_identity(tmp_path):
    from benchmarks.physical import Bench, parse_args
    from realtime.defenses.cue import cue_path, load_cue
    own = tmp_path / "my_cue.safetensors"
    own.write_bytes(cue_path("ddrnet23_slim").read_bytes())
    cfg = parse_args(["--model", "ddrnet23_slim", "--defense", "zmask_cue", "--cue", str(own)])
    assert cfg.cue == str(own)
    bench = Bench(cfg)
    assert bench.defense.zm.cue.frame_threshold == load_cue(own).frame_threshold
    assert "cue" in bench.identity and "cue" not in Bench(parse_args(["--defense", "zmask_cue"])).identity
