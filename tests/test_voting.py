"""Temporal voting: k-of-n raise, m-to-clear hysteresis, mask propagation ring, CLI parsing."""
from __future__ import annotations

import pytest
import torch

from realtime.live.voting import TemporalVoter, VotingConfig, fit_evidence, simulate, window_means


def _mask(y0: int, x0: int, size: int = 4, hw=(32, 32)) -> torch.Tensor:
    m = torch.zeros(1, 1, *hw)
    m[..., y0:y0 + size, x0:x0 + size] = 1.0
    return m


@pytest.mark.parametrize("text,expect", [("3/5", (3, 5, 5, True)), ("2/4/7", (2, 4, 7, True)),
                                         ("off", (1, 1, 1, False)), (" 1/1 ", (1, 1, 5, True))])
def test_parse(text, expect):
    cfg = VotingConfig.parse(text)
    assert (cfg.k, cfg.n, cfg.m, cfg.enabled) == expect


def test_parse_clear_override_and_errors():
    assert VotingConfig.parse("3/5", clear=2).m == 2
    assert VotingConfig.parse("3/5/4", clear=9).m == 9
    for bad in ("3", "a/b", "6/5", "0/5", "1/2/3/4", "3/5/0"):
        with pytest.raises(ValueError):
            VotingConfig.parse(bad)


def test_raise_needs_k_of_last_n():
    cfg = VotingConfig(k=3, n=5, m=2, propagate=False)
    # 2 positives, then spread-out positives that never reach 3 within 5 frames: no alarm
    assert not any(simulate([1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0], cfg))
    alarms = simulate([1, 0, 1, 0, 1, 1], cfg)
    assert alarms == [False, False, False, False, True, True]     # 3rd positive within 5 frames


def test_hysteresis_clear_after_m_consecutive_negatives():
    cfg = VotingConfig(k=2, n=3, m=3, propagate=False)
    flags = [1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0]
    alarms = simulate(flags, cfg)
    # raised at frame 1; isolated negatives (2, 4-5) do not clear; three in a row (7-9) do
    assert alarms == [False, True, True, True, True, True, True, True, True, False, False]


def test_cleared_window_is_not_reused_for_a_new_alarm():
    cfg = VotingConfig(k=3, n=5, m=1, propagate=False)
    v = TemporalVoter(cfg)
    states = [v.update(bool(f)) for f in [1, 1, 1, 0, 1]]
    assert [s.alarm for s in states] == [False, False, True, False, False]
    assert states[2].raised and states[3].cleared and v.raises == 1
    assert v.update(True).alarm is False          # 2 fresh positives only
    assert v.update(True).alarm is True and v.raises == 2


def test_disabled_voting_is_per_frame():
    cfg = VotingConfig.parse("off")
    assert simulate([0, 1, 0, 1, 1, 0], cfg) == [False, True, False, True, True, False]


def test_no_propagation_before_the_alarm():
    v = TemporalVoter(VotingConfig(k=2, n=3, m=2, mask_window=2, dilate=0))
    v.update(True, _mask(0, 0))
    assert v.propagated() is None                 # a single detection never masks later frames
    v.update(True, _mask(10, 10))
    p = v.propagated()
    assert p is not None and p.shape == (1, 1, 32, 32)
    assert p[0, 0, 0, 0] == 1 and p[0, 0, 10, 10] == 1 and p.sum() == 32  # union of both masks


def test_propagated_mask_is_dilated_and_expires():
    v = TemporalVoter(VotingConfig(k=1, n=1, m=5, mask_window=2, dilate=2))
    v.update(True, _mask(10, 10))
    p = v.propagated()
    assert p.sum() == (4 + 4) ** 2 and p[0, 0, 8, 8] == 1 and p[0, 0, 7, 7] == 0
    s = v.update(False, None, carried=True)       # masked first pass was clean: carried, votes positive
    assert s.vote and s.alarm and v.propagated() is not None
    v.update(False, None, carried=True)           # the detection is now mask_window frames old
    assert v.propagated() is None


def test_carried_frames_hold_the_alarm_but_clean_frames_clear_it():
    v = TemporalVoter(VotingConfig(k=2, n=2, m=2, mask_window=1, dilate=0))
    v.update(True, _mask(0, 0))
    assert v.update(True, _mask(0, 0)).raised
    assert v.update(False, None, carried=True).alarm
    assert v.update(False).alarm                   # one clean frame: hysteresis holds
    s = v.update(False)
    assert s.cleared and not s.alarm and v.propagated() is None


def test_no_propagation_when_disabled():
    v = TemporalVoter(VotingConfig(k=1, n=1, m=1, propagate=False))
    v.update(True, _mask(0, 0))
    assert v.alarm and v.propagated() is None


def test_tune_ranks_quiet_fast_configs_first(tmp_path):
    from realtime.live.voting import evaluate, main, tune
    clean = [[0, 1, 0, 0, 1, 1, 0, 0, 0, 0] * 3]                  # pairs of stray detections
    patched = [([0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1], 3)]
    best, r = tune(clean, patched, max_n=4)[0]
    assert r["false_alarms_per_1000"] == 0 and (best.k, best.n) == (3, 3)
    assert r["frames_to_alarm_mean"] == 2
    loud = evaluate(clean, patched, VotingConfig(k=1, n=1, m=1))
    assert loud["false_alarms_per_1000"] == pytest.approx(1000 * 6 / 30) and loud["frames_to_alarm_mean"] == 0
    ev = tmp_path / "c.jsonl"
    ev.write_text("\n".join('{"type":"frame","flagged":%s,"score":0.1}' % ("true" if f else "false")
                            for f in clean[0]))
    pe = tmp_path / "p.jsonl"
    pe.write_text("\n".join('{"type":"frame","flagged":%s,"score":0.1,"gt_patch":%s}'
                            % ("true" if f else "false", "true" if i >= 3 else "false")
                            for i, f in enumerate(patched[0][0])))
    assert main(["--clean", str(ev), "--patched", str(pe), "--max-n", "3", "--top", "2"]) == 0


# --------------------------------------------------------------------------- motion compensation

def _texture(h: int = 120, w: int = 160, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    small = rng.random((h // 8, w // 8))
    import cv2
    return (cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255).astype("uint8")


def test_motion_estimate_recovers_a_shift_and_moves_the_mask():
    import numpy as np
    from realtime.live.motion import estimate_motion, warp_mask
    prev = _texture()
    cur = np.roll(prev, (3, 6), axis=(0, 1))                 # the scene moved 6 px right, 3 px down
    region = np.zeros(prev.shape, bool)
    region[40:70, 50:90] = True
    hom = estimate_motion(prev, cur, region)
    assert hom is not None and abs(hom[0, 2] - 6) < 0.5 and abs(hom[1, 2] - 3) < 0.5
    m = torch.from_numpy(region.astype("float32")).view(1, 1, *region.shape)
    moved = warp_mask(m, hom)[0, 0].numpy() > 0.5
    assert moved[43:73, 56:96].mean() > 0.95 and moved.sum() == pytest.approx(region.sum(), rel=0.05)
    assert estimate_motion(prev, np.zeros_like(prev), region) is None       # nothing to track: no motion


def test_step_moves_carried_masks_with_the_scene():
    """A flagged frame's mask is carried into the next frames and follows the scene when motion is on."""
    import numpy as np
    from realtime.defenses.base import Defense, DefenseResult
    from realtime.live.step import DefenseStep

    class Spot(Defense):
        name, masks, flags, accepts_prior = "spot", True, True, True

        def __init__(self):
            super().__init__(torch.nn.Identity())
            self.calls = 0

        def run(self, x, timer, prior=None):
            self.calls += 1
            flag = torch.tensor([self.calls <= 2])                      # detects on the first two frames only
            keep = torch.ones_like(x[:, :1])
            if bool(flag[0]):                                           # the spot moves with the scene
                shift = 4 * (self.calls - 1)
                keep[..., 40:70, 50 + shift:90 + shift] = 0
            if prior is not None:
                keep = torch.minimum(keep, prior)
            return DefenseResult(output=torch.cat([x[:, :1], 1 - x[:, :1]], 1), defended_input=x, mask=keep,
                                 flagged=flag, score=flag.float(), first_output=None)

    frames = [np.roll(_texture(), (0, 4 * k), axis=(0, 1)) for k in range(5)]
    def run(motion):
        step = DefenseStep(Spot(), VotingConfig(k=2, n=3, m=3, dilate=0, motion=motion), torch.device("cpu"))
        out = []
        for f in frames:
            x = torch.from_numpy(np.repeat(f[None], 3, 0)).float().div(255)[None]
            out.append(step.step(x))
        return out
    still, moving = run(False), run(True)
    assert still[2].carried and moving[2].carried
    cols = lambda r: (int(np.nonzero(r.masked)[1].min()), int(np.nonzero(r.masked)[1].max()))   # noqa: E731
    assert cols(still[3]) == (50, 93)                    # the two detections (50:90, 54:94) carried in place
    lo, hi = cols(moving[3])                             # both moved with the scene to where the spot is now
    assert abs(lo - 62) <= 1 and abs(hi - 101) <= 1


def test_evidence_window_raises_holds_and_clears():
    cfg = VotingConfig(k=3, n=5, m=2, evidence=4, evidence_ratio=0.8)
    ratios = [0.5] * 4 + [0.9] * 8 + [0.3] * 8
    alarms = simulate([False] * len(ratios), cfg, ratios)
    assert alarms[:7] == [False] * 7                   # the window mean passes 0.8 at the 4th 0.9 (frame 7)
    assert all(alarms[7:12]) and not any(alarms[12:])   # held while the mean stays high (no flag needed), then cleared
    assert not any(simulate([False] * 20, VotingConfig(k=3, n=5), ratios))          # evidence off: no alarm
    v = TemporalVoter(VotingConfig(evidence=2, evidence_ratio=0.8))
    assert v.update(False, ratio=0.9).evidence is None                              # window not full yet
    assert v.update(False, ratio=None).evidence is None                             # a masked frame adds nothing
    st = v.update(False, ratio=0.9)
    assert st.evidence == pytest.approx(0.9) and st.alarm and st.raised


def test_fit_evidence_and_parse():
    assert list(window_means([1.0, 2.0, 3.0, None, 4.0], 2)) == [1.5, 2.5, 3.5]
    assert window_means([1.0], 3).size == 0
    assert fit_evidence([[0.1, 0.5, 0.7, 0.2], [0.6, 0.6]], 2, margin=1.1) == pytest.approx(0.66)
    with pytest.raises(ValueError, match="scored frames"):
        fit_evidence([[0.1]], 3)
    assert VotingConfig.parse_evidence("8:0.75") == (8, 0.75) and VotingConfig.parse_evidence(None) == (0, 1.0)
    for bad in ("8", "a:b", "8:0.7:1"):
        with pytest.raises(ValueError, match="N:R"):
            VotingConfig.parse_evidence(bad)
    with pytest.raises(ValueError, match="evidence"):
        VotingConfig(evidence=4, evidence_ratio=0)
    assert "evidence" in VotingConfig(evidence=8, evidence_ratio=0.7).describe()
