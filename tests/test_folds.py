"""Leave-one-sequence-out folds: frame selection, the accuracy benchmark's per-sequence scores, and a
training fold that never sees its held-out drive (synthetic CamVid layout: runs without the dataset)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import accuracy
from realtime.data.folds import load_frames, pooled_sequences
from realtime.train import TrainConfig, Trainer


def two_drives(root: Path) -> Path:
    """train: drive AAA (3 frames) and BBB (2); val: BBB (2). 120x160, random content."""
    rng = np.random.default_rng(1)
    for split, names in {"train": ["AAA_000001", "AAA_000002", "AAA_000003", "BBB_000010", "BBB_000020"],
                         "val": ["BBB_000030", "BBB_000040"]}.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for n in names:
            Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(root / split / f"{n}.png")
            Image.fromarray(rng.integers(0, 11, (120, 160), dtype=np.uint8)).save(root / f"{split}annot" / f"{n}.png")
    return root


def test_frames_are_selected_by_sequence_across_splits(tmp_path):
    root = two_drives(tmp_path / "cv")
    assert pooled_sequences(str(root)) == ["AAA", "BBB"]
    held = load_frames(str(root), include=["BBB"])
    assert held.sequences == ("BBB",) * 4 and held.images.shape == (4, 3, 120, 160)   # 2 train + 2 val frames
    rest = load_frames(str(root), exclude=["BBB"])
    assert rest.names() == ["AAA"] and len(rest) == 3
    assert len(held.of("BBB")) == 4
    assert len(load_frames(str(root), limit=4)) == 4
    with pytest.raises(ValueError, match="CCC"):
        load_frames(str(root), exclude=["CCC"])                  # a typo must not silently train on everything
    with pytest.raises(ValueError, match="no frames"):
        load_frames(str(root), include=["AAA"], exclude=["AAA"])
    with pytest.raises(KeyError):
        held.of("AAA")


def test_accuracy_scores_a_drive_and_each_sequence(tmp_path, capsys):
    root = two_drives(tmp_path / "cv")
    out = tmp_path / "acc.json"
    rc = accuracy.main(["--model", "ddrnet23_slim", "--weights", "none", "--data", str(root), "--split", "train,val",
                        "--per-sequence", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["frames"] == 7 and res["sequences"] == ["AAA", "BBB"]
    assert {k: v["frames"] for k, v in res["per_sequence"].items()} == {"AAA": 3, "BBB": 4}
    rc = accuracy.main(["--model", "ddrnet23_slim", "--weights", "none", "--data", str(root), "--split", "train,val",
                        "--sequence", "BBB", "--device", "cpu", "--json", str(out)])
    assert rc == 0 and json.loads(out.read_text())["frames"] == 4
    assert accuracy.main(["--model", "ddrnet23_slim", "--data", str(root), "--sequence", "ZZZ", "--device", "cpu"]) == 2
    assert "ZZZ" in capsys.readouterr().err


def test_a_fold_trains_without_its_drive_and_scores_only_it(tmp_path):
    root = two_drives(tmp_path / "cv")
    cfg = TrainConfig(model="ddrnet23_slim", data=str(root), out=str(tmp_path / "fold"), epochs=1, batch_size=2,
                      crop=(96, 128), base_scale=0.5, eval_every=1, amp=False, device="cpu", hold_out="AAA")
    tr = Trainer(cfg)
    assert len(tr.train_x) == 4 and len(tr.val_x) == 3            # BBB's 2 train + 2 val frames; AAA's 3
    a = load_frames(str(root), include=["AAA"])
    assert torch.equal(tr.val_x, a.images)
    tr.fit()
    assert (tmp_path / "fold" / "best.pt").is_file()
    with pytest.raises(ValueError, match="hold-out"):               # resuming a fold as another fold is refused
        Trainer(TrainConfig(**{**cfg.__dict__, "hold_out": "BBB"}))
