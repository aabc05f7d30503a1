"""GrabCut mask refinement: a partial, spilling Z-Mask mask snaps to the patch's own region; unflagged frames
and implausible refinements leave the mask unchanged."""
import dataclasses

import numpy as np
import torch

from realtime.defenses.refine import RefineConfig, refine_keep, refine_one


def scene(seed: int = 0):
    """A 120x160 facade (smooth grey-beige gradient + mild noise) with a colourful 40x60 patch at (40, 50)."""
    rng = np.random.default_rng(seed)
    h, w = 120, 160
    base = np.stack([np.linspace(150, 170, w)[None].repeat(h, 0), np.full((h, w), 140.0), np.full((h, w), 120.0)], -1)
    img = base + rng.normal(0, 3, (h, w, 3))
    patch = rng.choice([[230, 20, 20], [20, 200, 40], [30, 40, 220], [240, 230, 30]], size=(10, 15))
    img[40:80, 50:110] = np.kron(patch, np.ones((4, 4, 1)))
    truth = np.zeros((h, w), bool)
    truth[40:80, 50:110] = True
    return np.clip(img, 0, 255).astype(np.uint8), truth


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_partial_mask_grows_to_the_patch_and_drops_the_spill():
    img, truth = scene()
    found = np.zeros_like(truth)
    found[44:78, 44:82] = True               # the near half of the patch, spilling 6 px onto the facade
    assert iou(found, truth) < 0.5
    new, used = refine_one(img, found)
    assert used and iou(new, truth) > 0.85
    assert (new & ~truth).sum() < (found & ~truth).sum()          # less of the facade masked


def test_keep_mask_only_changes_on_flagged_frames():
    imgs, keeps = [], []
    for s in (0, 1):
        img, truth = scene(s)
        found = np.zeros_like(truth)
        found[44:78, 44:82] = True
        imgs.append(torch.from_numpy(img).permute(2, 0, 1).float() / 255)
        keeps.append(torch.from_numpy(~found).float()[None])
    x, keep = torch.stack(imgs), torch.stack(keeps)
    out = refine_keep(x, keep, torch.tensor([True, False]))
    assert torch.equal(out[1], keep[1]) and not torch.equal(out[0], keep[0])
    assert iou(out[0, 0].numpy() < 0.5, scene(0)[1]) > 0.85
    assert torch.equal(refine_keep(x, keep, torch.tensor([False, False])), keep)


def test_implausible_or_empty_masks_are_kept():
    img, truth = scene()
    empty = np.zeros_like(truth)
    assert refine_one(img, empty) == (empty, False) or not refine_one(img, empty)[1]
    found = np.zeros_like(truth)
    found[44:78, 44:82] = True
    new, used = refine_one(img, found, RefineConfig(max_ratio=1.1))   # the full patch is 1.9x what was found
    assert not used and np.array_equal(new, found)


class _Taps:
    def __init__(self, owner):
        self.owner = owner
        self.model = torch.nn.Identity()

    def __call__(self, x):
        return x.mean(1, keepdim=True), {}

    def plain(self, x):
        self.owner.second_inputs.append(x.clone())
        return x.mean(1, keepdim=True)


class _HalfFinder:
    """A stand-in Z-Mask whose detection flags the frame and masks the near half of the patch only."""
    cfg = None

    def __init__(self, found: np.ndarray) -> None:
        self.found = found
        self.second_inputs = []
        self.taps = _Taps(self)

    def detect(self, taps, size, timer=None):
        from realtime.defenses import Detection
        keep = torch.from_numpy(~self.found).float()[None, None]
        one = torch.ones(1)
        return Detection(keep, keep, 1 - keep, one, torch.tensor([True]), keep)

    def shield(self, x, keep):
        return x * keep + 0.5 * (1 - keep)

    from realtime.defenses.zmask import ZMask as _Z
    second_pass = _Z.second_pass


def test_the_defense_masks_the_refined_region_before_the_second_pass():
    from realtime.defenses.zmask_defense import ZMaskDefense
    img, truth = scene()
    found = np.zeros_like(truth)
    found[44:78, 44:82] = True
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
    plain, refined = _HalfFinder(found), _HalfFinder(found)
    res_plain = ZMaskDefense(plain)(x)
    res_ref = ZMaskDefense(refined, RefineConfig())(x)
    assert iou(res_plain.mask[0, 0].numpy() < 0.5, truth) < 0.5
    assert iou(res_ref.mask[0, 0].numpy() < 0.5, truth) > 0.85
    shielded = refined.second_inputs[0][0]
    assert torch.allclose(shielded[:, 45:75, 85:105], torch.full((3, 30, 20), 0.5))   # the far half is masked too


def test_live_run_takes_the_refine_option():
    """``realtime.run --refine grabcut`` reaches the Z-Mask defense (and is recorded in the run's description)."""
    from realtime import run as cli
    from realtime.live.build import build
    from realtime.live.pipeline import PipelineConfig
    from realtime.live.voting import VotingConfig
    for defense in ("zmask", "zmask_cue"):
        args = cli.parse_args(["--source", "demo", "--defense", defense, "--refine", "grabcut", "--output", "none"])
        rt = build(cli.config_from_args(args), torch.device("cpu"),
                   PipelineConfig(imgsz=None, voting=VotingConfig.parse("3/5")))
        assert rt.step.defense.refine == RefineConfig()
        assert rt.description["refine"] == dataclasses.asdict(RefineConfig())
    plain = build(cli.config_from_args(cli.parse_args(["--source", "demo", "--output", "none"])), torch.device("cpu"),
                  PipelineConfig(imgsz=None, voting=VotingConfig.parse("3/5")))
    assert plain.step.defense.refine is None
