"""Leave-one-sequence-out folds: measure a model on a drive it never saw.

CamVid's val split is sequence 0016E5, which also gives a third of the training frames, so a val figure
flatters a model. A fold pools the labelled splits (``train`` and ``val``; a val frame counts as its
sequence, 0016E5), trains on every sequence but one and scores the held-out one. The held-out test split
is never touched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from .camvid import CamVid

LOSO_SPLITS: Tuple[str, ...] = ("train", "val")


@dataclass(frozen=True)
class FoldFrames:
    """uint8 frames (N,3,H,W) and labels (N,H,W) of some sequences, with each frame's sequence name."""
    images: torch.Tensor
    labels: torch.Tensor
    sequences: Tuple[str, ...]

    def __len__(self) -> int:
        return len(self.sequences)

    def names(self) -> List[str]:
        """The sequences present, sorted."""
        return sorted(set(self.sequences))

    def of(self, sequence: str) -> "FoldFrames":
        """The frames of one sequence."""
        idx = [i for i, s in enumerate(self.sequences) if s == sequence]
        if not idx:
            raise KeyError(f"sequence '{sequence}' has no frames here (has {self.names()})")
        t = torch.tensor(idx)
        return FoldFrames(self.images[t], self.labels[t], tuple(self.sequences[i] for i in idx))


def pooled_sequences(data: Optional[str], splits: Sequence[str] = LOSO_SPLITS) -> List[str]:
    """Every sequence of ``splits``, sorted (the folds a leave-one-sequence-out run has)."""
    return sorted({s for split in splits for s in CamVid(data, split).sequences})


def load_frames(data: Optional[str], splits: Sequence[str] = LOSO_SPLITS, include: Optional[Iterable[str]] = None,
                exclude: Iterable[str] = (), limit: Optional[int] = None, progress: bool = False) -> FoldFrames:
    """Frames of ``splits`` whose sequence is in ``include`` (default: all) and not in ``exclude``.

    A name in ``include`` or ``exclude`` that no split has is an error (a typo would otherwise train on
    everything or score nothing). ``limit`` keeps the first N selected frames (smoke tests)."""
    sets = [CamVid(data, split) for split in splits]
    present = sorted({s for ds in sets for s in ds.sequences})
    inc = None if include is None else set(include)
    exc = set(exclude)
    unknown = sorted(((inc or set()) | exc) - set(present))
    if unknown:
        raise ValueError(f"sequence(s) {', '.join(unknown)} not in {'/'.join(splits)} (has {', '.join(present)})")
    images, labels, names = [], [], []
    for ds in sets:
        idx = [i for i, s in enumerate(ds.samples)
               if (inc is None or s.sequence in inc) and s.sequence not in exc]
        if limit is not None:
            idx = idx[:max(limit - len(names), 0)]
        if not idx:
            continue
        x, y = ds.to_tensors(idx, progress=progress)
        images.append(x)
        labels.append(y)
        names.extend(ds.samples[i].sequence for i in idx)
    if not names:
        raise ValueError(f"no frames left in {'/'.join(splits)} after selecting sequences "
                         f"(include {sorted(inc) if inc is not None else 'all'}, exclude {sorted(exc)})")
    shapes = {tuple(t.shape[-2:]) for t in images}
    if len(shapes) != 1:
        raise ValueError(f"frames of {'/'.join(splits)} differ in size: {sorted(shapes)}")
    return FoldFrames(torch.cat(images), torch.cat(labels), tuple(names))


__all__ = ["FoldFrames", "LOSO_SPLITS", "load_frames", "pooled_sequences"]
