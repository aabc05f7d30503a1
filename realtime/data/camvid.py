"""CamVid (11 classes, 480x360, SegNet layout): frames, labels and per-sequence video views."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .paths import resolve_data_dir

CLASSES: Tuple[str, ...] = ("sky", "building", "pole", "road", "pavement", "tree", "sign/symbol",
                            "fence", "car", "pedestrian", "bicyclist")
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 11  # 'void' in the SegNet release; every label >= 11 is treated as void
# Display colours (the usual CamVid palette), one per class, void black.
PALETTE = np.array([[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
                    [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0],
                    [0, 128, 192], [0, 0, 0]], dtype=np.uint8)

_NAME_RE = re.compile(r"^(?P<seq>.+?)_f?(?P<frame>\d+)$")  # 0016E5_07959, 0006R0_f00930


@dataclass(frozen=True)
class Sample:
    """One frame on disk: its sequence, frame number and image/label paths (label may be absent)."""
    sequence: str
    frame: int
    image: Path
    label: Optional[Path]


def read_image(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB; grayscale or RGBA files are converted, unreadable files raise a clear error."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except Exception as exc:  # PIL raises several unrelated types for bad files
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def read_label(path: Path) -> np.ndarray:
    """HxW int64 class map with every value outside 0..10 mapped to IGNORE_INDEX."""
    with Image.open(path) as im:
        lab = np.array(im)
    if lab.ndim != 2:
        raise ValueError(f"label {path} has shape {lab.shape}; expected a single-channel index map")
    lab = lab.astype(np.int64)
    lab[(lab < 0) | (lab >= NUM_CLASSES)] = IGNORE_INDEX
    return lab


class CamVid(torch.utils.data.Dataset):
    """CamVid split as ``(image float[3,H,W] in [0,1], label int64[H,W])`` pairs, sorted by sequence and frame.

    ``root`` is resolved through :func:`resolve_data_dir` (``--data`` / ``$REALTIME_DATA`` / shared).
    Any split folder present is accepted (``train``, ``val``, a held-out ``test`` elsewhere ...);
    its labels are read from ``<split>annot``.
    """

    def __init__(self, root: Optional[str | os.PathLike] = None, split: str = "train") -> None:
        self.root = resolve_data_dir(root)
        self.split = split
        img_dir = self.root / split
        if not img_dir.is_dir():
            present = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.endswith("annot"))
            raise FileNotFoundError(f"split '{split}' not found in {self.root}; present: {present}")
        lab_dir = self.root / f"{split}annot"
        samples: List[Sample] = []
        for p in img_dir.iterdir():
            if p.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                continue
            m = _NAME_RE.match(p.stem)
            seq, frame = (m["seq"], int(m["frame"])) if m else (p.stem, 0)
            lab = lab_dir / (p.stem + ".png")
            samples.append(Sample(seq, frame, p, lab if lab.is_file() else None))
        if not samples:
            raise FileNotFoundError(f"no images in {img_dir}")
        samples.sort(key=lambda s: (s.sequence, s.frame, s.image.name))
        self.samples: List[Sample] = samples

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def sequences(self) -> List[str]:
        """Sequence names present in this split, sorted."""
        return sorted({s.sequence for s in self.samples})

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """Raw ``(HxWx3 uint8, HxW int64)``; a missing label is all IGNORE_INDEX."""
        s = self.samples[index]
        img = read_image(s.image)
        if s.label is None:
            lab = np.full(img.shape[:2], IGNORE_INDEX, dtype=np.int64)
        else:
            lab = read_label(s.label)
            if lab.shape != img.shape[:2]:
                raise ValueError(f"label {s.label} is {lab.shape}, image {s.image} is {img.shape[:2]}")
        return img, lab

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img, lab = self.load(index)
        x = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
        return x, torch.from_numpy(lab)

    def sequence(self, name: str) -> "SequenceView":
        """Frames of one video sequence, in frame order."""
        idx = [i for i, s in enumerate(self.samples) if s.sequence == name]
        if not idx:
            raise KeyError(f"sequence '{name}' not in split '{self.split}' (has {self.sequences})")
        return SequenceView(self, idx)

    def to_tensors(self, indices: Optional[Sequence[int]] = None, progress: bool = False
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Whole split as ``(uint8[N,3,H,W], uint8[N,H,W])`` for device-resident training/evaluation."""
        indices = list(range(len(self))) if indices is None else list(indices)
        it = indices
        if progress:
            from tqdm import tqdm
            it = tqdm(indices, desc=f"load {self.split}", unit="img")
        imgs, labs = [], []
        for i in it:
            img, lab = self.load(i)
            imgs.append(torch.from_numpy(img).permute(2, 0, 1))
            labs.append(torch.from_numpy(lab.astype(np.uint8)))
        shapes = {tuple(t.shape) for t in imgs}
        if len(shapes) != 1:
            raise ValueError(f"frames of split '{self.split}' differ in size: {sorted(shapes)}")
        return torch.stack(imgs), torch.stack(labs)


class SequenceView:
    """Ordered view of one sequence: iterating yields ``(frame_number, image uint8 HxWx3, label)``."""

    def __init__(self, dataset: CamVid, indices: List[int]) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def frames(self) -> List[int]:
        return [self.dataset.samples[i].frame for i in self.indices]

    def __iter__(self) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        for i in self.indices:
            img, lab = self.dataset.load(i)
            yield self.dataset.samples[i].frame, img, lab


def colorize(label: np.ndarray) -> np.ndarray:
    """HxW class map -> HxWx3 uint8 colour image (void black)."""
    return PALETTE[np.clip(label, 0, IGNORE_INDEX)]
