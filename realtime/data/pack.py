"""Re-encode a CamVid directory compactly (JPEG frames, PNG labels) for carrying to a remote GPU.

    python -m realtime.data.pack --out .data/camvid --quality 95

The dataset reader accepts .jpg frames, so the packed folder is a drop-in ``--data`` directory.
Never pack into a tracked folder: shared data does not belong in the repository.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .paths import resolve_data_dir


def pack(src: Path, dst: Path, quality: int = 95) -> int:
    n = 0
    for split_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        out = dst / split_dir.name
        out.mkdir(parents=True, exist_ok=True)
        files = sorted(split_dir.glob("*.png"))
        for f in tqdm(files, desc=split_dir.name, unit="img"):
            if split_dir.name.endswith("annot"):
                shutil.copyfile(f, out / f.name)
            else:
                with Image.open(f) as im:
                    im.convert("RGB").save(out / (f.stem + ".jpg"), quality=quality)
            n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m realtime.data.pack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--quality", type=int, default=95)
    a = p.parse_args(argv)
    n = pack(resolve_data_dir(a.data), Path(a.out), a.quality)
    print(f"packed {n} files into {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
