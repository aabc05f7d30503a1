"""On-disk engine cache: content keys and atomic writes.

A cached file is named by a hash of everything that shapes it (model fingerprint, tapped layers, input
shape, precision, exporter/runtime versions ...), so any change gives a new name and the old file is
simply not used again. Files are written to a temporary name in the same folder and renamed into
place, so a crash or a concurrent run never leaves a half-written file under the final name.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from realtime.core.files import atomic_path, atomic_write_bytes  # noqa: F401  (the engines' writers)


def cache_key(parts: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the JSON of ``parts`` (sorted keys): same parts, same key."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def safe_name(text: str) -> str:
    """``text`` reduced to characters safe in a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "x"
