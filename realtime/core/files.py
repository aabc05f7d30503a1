"""Writing artifacts: whole or not at all, with the permissions the user's umask gives."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import save as safetensors_bytes


def write_safetensors(path: str | Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> Path:
    """Save ``tensors`` + ``metadata`` at ``path`` through a sibling temp file renamed into place, so a reader
    never sees half a file and an interrupted write leaves the old one; the file gets the user's umask
    (safetensors' own ``save_file`` leaves it 0600, unreadable to the other accounts of a shared fleet)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = safetensors_bytes(tensors, metadata=metadata)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = ["write_safetensors"]
