"""Where a live run writes (video, events, summary) and the checks made before any frame is processed.

Every output must be writable (its folder creatable, not a directory, a video extension PyAV can
mux), the outputs must be distinct files, and none may be one of the run's inputs (the source video,
an image of the source folder, the calibration, the weights, the patch): the input is never
overwritten. Each failure is a one-line ``UsageError`` (exit status 2).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from realtime.core.errors import UsageError

VIDEO_EXTS = (".mp4", ".mkv", ".mov", ".avi")
FLAGS = {"video": "--output", "events": "--events", "summary": "--summary"}


def output_paths(cfg, source_name: str, repo: Path) -> Dict[str, Optional[Path]]:
    """The video (None with ``--output none``), events and summary paths of a run of ``cfg``."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in source_name) or "run"
    default = repo / "runs" / "realtime" / f"{stem}.mp4"
    video = None if (cfg.output or "").lower() == "none" else Path(cfg.output or default)
    base = video if video is not None else default
    events = Path(cfg.events) if cfg.events else base.with_suffix(".events.jsonl")
    summary = Path(cfg.summary) if cfg.summary else base.with_suffix(".summary.json")
    return {"video": video, "events": events, "summary": summary}


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _check_writable(flag: str, p: Path) -> None:
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a directory; give a file path")
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {p} cannot be written: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK) and not p.exists():
        raise UsageError(f"{flag} {p} cannot be written: no permission to create files in {ancestor}")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{flag} {p} cannot be written: permission denied")


def check_outputs(paths: Dict[str, Optional[Path]], inputs: Iterable[Tuple[str, Path]]) -> None:
    """Refuse unwritable, clashing or input-overwriting outputs (``inputs``: (what, path) pairs)."""
    outs: List[Tuple[str, Path]] = [(FLAGS[k], p) for k, p in paths.items() if p is not None]
    for flag, p in outs:
        _check_writable(flag, p)
    video = paths.get("video")
    if video is not None and video.suffix.lower() not in VIDEO_EXTS:
        raise UsageError(f"--output {video}: unsupported video extension '{video.suffix or '(none)'}'; use "
                         f"{', '.join(VIDEO_EXTS)} (or --output none for no video)")
    files = [(f, p) for f, p in outs if not p.exists() or p.is_file()]   # /dev/null may be shared
    for i, (f1, p1) in enumerate(files):
        for f2, p2 in files[i + 1:]:
            if _same(p1, p2):
                raise UsageError(f"{f1} and {f2} are the same file {p1}; each output needs its own path")
    for what, src in inputs:
        for flag, p in files:
            if p.exists() and _same(p, src):
                raise UsageError(f"{flag} {p} is the {what}; refusing to overwrite an input")


def input_paths(cfg, source: object, weights: Optional[str], calibration: Optional[Path]
                ) -> List[Tuple[str, Path]]:
    """The files a run reads, which no output may overwrite."""
    found: List[Tuple[str, Path]] = []
    spec = Path(cfg.source)
    if spec.is_file():
        found.append(("input video (--source)" if spec.suffix.lower() not in (".png", ".jpg", ".jpeg") else
                      "input image (--source)", spec))
    found += [("input image (--source)", Path(f)) for f in getattr(source, "files", ())]
    for what, p in (("calibration", calibration), ("weights file", Path(weights) if weights else None),
                    ("patch image", Path(cfg.patch) if cfg.patch else None)):
        if p is not None and p.is_file():
            found.append((what, p))
    return found


__all__ = ["VIDEO_EXTS", "check_outputs", "input_paths", "output_paths"]
