"""On-disk engine cache: content keys and atomic writes.

A cached file is named by a hash of everything that shapes it (model fingerprint, tapped layers, input
shape, precision, exporter/runtime versions ...), so any change gives a new name and the old file is
simply not used again. Files are written to a temporary name in the same folder and renamed into
place, so a crash or a concurrent run never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping


def cache_key(parts: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the JSON of ``parts`` (sorted keys): same parts, same key."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically, else is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if not tmp_path.is_file() or tmp_path.stat().st_size == 0:
            raise OSError(f"nothing was written for {path}")
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def safe_name(text: str) -> str:
    """``text`` reduced to characters safe in a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "x"
