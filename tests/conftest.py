"""Shared fixtures: the real CamVid directory (tests needing it skip, saying why, when absent) and a
tiny synthetic CamVid-layout directory for loader logic that must always be tested."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    from realtime.data import DataNotFoundError, resolve_data_dir
    try:
        return resolve_data_dir(None)
    except DataNotFoundError as exc:
        pytest.skip(f"real CamVid data not available: {exc}")


@pytest.fixture()
def tiny_camvid(tmp_path: Path) -> Path:
    """Two splits; frames deliberately written out of order; one label uses 255 (void)."""
    rng = np.random.default_rng(0)
    for split, names in {"train": ["SeqB_00030", "SeqA_00090", "SeqA_00010", "SeqA_00030"],
                         "val": ["SeqC_00001", "SeqC_00002"]}.items():
        (tmp_path / split).mkdir()
        (tmp_path / f"{split}annot").mkdir()
        for k, n in enumerate(names):
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(tmp_path / split / f"{n}.png")
            lab = np.full((12, 16), k % 11, np.uint8)
            lab[0, 0] = 255
            Image.fromarray(lab).save(tmp_path / f"{split}annot" / f"{n}.png")
    return tmp_path


@pytest.fixture()
def synthetic_camvid():
    """``make(root, train, val=2)``: random 120x160 frames and labels in the CamVid layout, one sequence,
    big enough for the models (unlike ``tiny_camvid``); returns ``root``."""
    def make(root: Path, train: int, val: int = 2) -> Path:
        rng = np.random.default_rng(0)
        for split, n in (("train", train), ("val", val)):
            (root / split).mkdir(parents=True)
            (root / f"{split}annot").mkdir()
            for k in range(n):
                name = f"0001TP_{k:06d}.png"
                Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(root / split / name)
                Image.fromarray(rng.integers(0, 11, (120, 160), dtype=np.uint8)).save(root / f"{split}annot" / name)
        return root
    return make
