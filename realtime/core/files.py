"""Writing artifacts whole or not at all: a temporary file next to the target, renamed into place."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterator

import torch
from safetensors.torch import save as safetensors_bytes


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


def _umask() -> int:
    """The process umask, read without changing it (Linux ``/proc``), else the common 0o022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def write_safetensors(path: str | Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> Path:
    """Save ``tensors`` + ``metadata`` at ``path`` atomically, readable as the user's umask allows (safetensors'
    own ``save_file`` and ``mkstemp`` both leave 0600, unreadable to the other accounts of a shared fleet)."""
    path = Path(path)
    data = safetensors_bytes(tensors, metadata=metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o666 & ~_umask())
    return path


__all__ = ["atomic_path", "atomic_write_bytes", "write_safetensors"]
