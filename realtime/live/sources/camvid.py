"""``camvid:SEQ[@split]``: one CamVid sequence in frame order, with its labels (clean replay).

A CamVid sequence is known to hold no adversarial patch, so every frame carries an all-false
``gt_mask``: run summaries then report false alarms per 1000 frames directly.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

from realtime.data import CamVid, DataNotFoundError

from .base import Frame, Source, SourceError, check_rgb

CAMVID_VIDEO_FPS = 30.0            # CamVid frame numbers index the original 30 fps video
SPLIT_ORDER = ("val", "train", "test")


def parse_camvid_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``camvid:0016E5`` -> (``0016E5``, None); ``camvid:0016E5@train`` -> (``0016E5``, ``train``)."""
    body = spec.split(":", 1)[1] if ":" in spec else spec
    seq, _, split = body.partition("@")
    if not seq:
        raise SourceError(f"'{spec}': name a sequence, e.g. camvid:0016E5 or camvid:0016E5@train")
    return seq, split or None


def open_sequence(seq: str, split: Optional[str], data: Optional[str]):
    """The SequenceView of ``seq`` in ``split`` (default: the first of val, train, test that has it)."""
    try:
        splits = [split] if split else list(SPLIT_ORDER)
        found: list = []
        for s in splits:
            try:
                ds = CamVid(data, s)
            except DataNotFoundError:
                raise
            except FileNotFoundError:          # this split is absent: try the next one
                continue
            if seq in ds.sequences:
                return ds.sequence(seq), s
            found.extend(f"{n}@{s}" for n in ds.sequences)
    except DataNotFoundError as exc:
        raise SourceError(str(exc)) from None
    raise SourceError(f"CamVid sequence '{seq}' not found" + (f" in split '{split}'" if split else "")
                      + f"; available: {', '.join(found) or 'none'}")


class CamVidSource(Source):
    """Frames of one CamVid sequence; timestamps are frame_number / 30 s from the first frame."""

    def __init__(self, spec: str, data: Optional[str] = None) -> None:
        seq, split = parse_camvid_spec(spec)
        self.view, self.split = open_sequence(seq, split, data)
        self.sequence = seq
        self.name = f"camvid-{seq}-{self.split}"
        numbers = self.view.frames
        self.length = len(numbers)
        step = float(np.median(np.diff(numbers))) if len(numbers) > 1 else CAMVID_VIDEO_FPS
        self.fps = CAMVID_VIDEO_FPS / max(step, 1.0)
        self._first = numbers[0]

    def __iter__(self) -> Iterator[Frame]:
        for k, (number, img, lab) in enumerate(self.view):
            yield Frame(index=k, image=check_rgb(img, f"{self.name} frame {number}"),
                        timestamp=(number - self._first) / CAMVID_VIDEO_FPS, label=lab,
                        gt_mask=np.zeros(lab.shape, bool),
                        meta={"camvid_frame": int(number)})
