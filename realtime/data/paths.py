"""Where the CamVid data lives: ``--data DIR``, then ``$REALTIME_DATA``, then ``../shared/datasets/camvid``.

``REALTIME_NO_DATA=1`` switches the lookup off (only an explicit ``--data`` still counts): the machine
then behaves like a fresh clone without the dataset, which is how the tests prove that path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

ENV_VAR = "REALTIME_DATA"
NO_DATA_VAR = "REALTIME_NO_DATA"
SHARED_REL = Path("..") / "shared" / "datasets" / "camvid"
_REPO_ROOT = Path(__file__).resolve().parents[2]


from realtime.core.errors import DataNotFoundError


def _looks_like_camvid(path: Path) -> bool:
    return path.is_dir() and any((path / s).is_dir() for s in ("train", "val", "test"))


def lookup_disabled() -> bool:
    """True when ``$REALTIME_NO_DATA`` is set to anything but empty/0/false/no."""
    return os.environ.get(NO_DATA_VAR, "").strip().lower() not in ("", "0", "false", "no")


def resolve_data_dir(data: Optional[str | os.PathLike] = None) -> Path:
    """Return the CamVid root, trying ``data``, then ``$REALTIME_DATA``, then ``../shared/datasets/camvid``.

    The shared default is looked up relative to the working directory and to the repository root,
    so commands work from either. An explicit ``data`` that does not exist is an error on its own
    (silently falling back would evaluate on the wrong data).
    """
    if data is not None:
        p = Path(data).expanduser()
        if _looks_like_camvid(p):
            return p.resolve()
        raise DataNotFoundError(
            f"--data {p} is not a CamVid directory (expected sub-folders such as train/ and trainannot/)")
    if lookup_disabled():
        raise DataNotFoundError(f"CamVid data not found: the lookup is switched off by ${NO_DATA_VAR}="
                                f"{os.environ[NO_DATA_VAR]} (pass --data DIR, or unset it)")
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if _looks_like_camvid(p):
            return p.resolve()
        raise DataNotFoundError(f"${ENV_VAR}={env} is not a CamVid directory (expected train/, val/ ...)")
    for base in (Path.cwd(), _REPO_ROOT):
        p = base / SHARED_REL
        if _looks_like_camvid(p):
            return p.resolve()
    raise DataNotFoundError(
        "CamVid data not found. Tried, in order: --data DIR (not given), "
        f"${ENV_VAR} (not set), and {SHARED_REL} relative to {Path.cwd()} and {_REPO_ROOT}. "
        "Pass --data /path/to/camvid or set REALTIME_DATA.")
