"""Defended real-time segmentation or detection: ``python -m realtime.run --source SOURCE``.

Sources (Ultralytics-style): camera0 | video.mp4 | rtsp://host/stream | frames/ | 'frames/*.png' |
camvid:0016E5[@train] | demo (default: a CamVid drive with a crafted patch on a facade).

examples:
  python -m realtime.run                                   # the demo, outputs under runs/realtime/
  python -m realtime.run --source demo --max-frames 100 --output out.mp4 --events ev.jsonl
  python -m realtime.run --source camera0 --show           # live camera, drop-oldest under overload
  python -m realtime.run --source drive.mp4 --realtime     # replay paced at the file's fps
  python -m realtime.run --source rtsp://10.0.0.5/live --vote 3/5 --clear 5 --fail-closed
  python -m realtime.run --source camvid:0006R0@train --defense none
  python -m realtime.run --source camera0 --source rtsp://10.0.0.5/live   # two streams, one batched forward
  python -m realtime.run --source cams.streams --output out.mp4  # one source per line -> out.s0.mp4, out.s1.mp4, ...
  python -m realtime.run --engine onnxruntime              # same defense, backbone in onnxruntime
  python -m realtime.run --device cuda --engine tensorrt --precision fp16
  python -m realtime.run --model fcos_ddrnet --defense none --box-threshold 0.5   # a detector: boxes out

detectors (--model from realtime.models.list_models("detection")) run on --engine torch in fp32; the
video shows boxes scoring >= --box-threshold and each frame event lists them under "boxes".

defaults: --vote 3/5 --clear 5 --mask-window 3 --dilate 16, chosen on replayed CamVid sequences
(benchmarks/results/realtime_cpu.md). Propagation masks a frame before the backbone only while the
alarm is on. --fail-closed: a frame whose defense errors gets no segmentation (event "unsafe": true)
instead of the undefended output (the default, event "error" set).

live sources (cameraN, rtsp://, http://): when the stream drops the run reconnects with back-off
(0.5 s doubling to 8 s, --reconnect N attempts per drop, default 5; 0 = never); each gap is a
"reconnect" line in the events and counted in the summary. Files and folders never reconnect.

exit status: 0 done; 1 writing the outputs failed mid-run; 2 bad arguments, source, model,
calibration or output path (all checked before the first frame); 3 the source died mid-stream, or
a live source stayed down through every reconnect attempt (the output video is still complete and
playable); 4 --fail-closed and the defense failed on some frames (marked unsafe); 130 SIGINT
(Ctrl-C), 143 SIGTERM, 129 SIGHUP: stopped with the outputs finalised (playable video, valid
events, a summary with the frame count and the reason). The input is never overwritten.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from typing import Any, Dict, List, Optional, Tuple

# Before torch loads OpenMP: idle OpenMP workers must sleep, not spin, or they starve this
# pipeline's own decode/sink threads (measured on 2 cores: a 64x96 backbone pass went from
# ~1.5 s to ~16 ms under load). An explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from realtime.core import signals  # noqa: E402  (standard library only: torch is imported in main)


def run(cfg: Any) -> Tuple[int, Dict[str, Any]]:
    """``realtime.live.runner.run`` (imported on first use, after the stop signals are handled)."""
    from realtime.live.runner import run as run_live
    return run_live(cfg)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from engines import PRECISIONS, list_engines
    from kernels.backend import BACKENDS
    from realtime.defenses.registry import list_defenses
    from realtime.live.voting import VotingConfig
    from realtime.models import list_models, model_arg

    p = argparse.ArgumentParser(prog="python -m realtime.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", default=None,
                   help="cameraN, file, URL, folder, glob, camvid:SEQ or demo (default); give it several times, "
                        "or a .streams file (one source per line), for one batched multi-stream run")
    p.add_argument("--model", default="ddrnet23_slim", type=model_arg,
                   help="a registered name ({}) or torchvision:NAME / package.module:factory".format(", ".join(list_models())))
    p.add_argument("--weights", default="default",
                   help="checkpoint path (default: the shipped CamVid weights; 'none': random init, for testing)")
    p.add_argument("--defense", default="zmask", choices=list_defenses(),
                   help="zmask (default), none, or a baseline: lgs, slgs, wlgs, patchzero, taintradar, fpda, hn")
    p.add_argument("--calibration", default=None, help="Z-Mask artifact (default calibration/shipped/<model>.safetensors)")
    p.add_argument("--threshold", type=float, default=None,
                   help="per-frame detection threshold on the Z-Mask score (default: the calibration's lambda0)")
    p.add_argument("--engine", default="torch", choices=list_engines(),
                   help="backbone runtime (exported engines are cached under $REALTIME_ENGINE_CACHE, "
                        "default ~/.cache/zmask-realtime/engines)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="compute precision of the engine (outputs and Z-Mask stay float32)")
    p.add_argument("--kernels", default="auto", choices=BACKENDS,
                   help="Z-Mask heatmaps: auto (the fused CUDA kernels on CUDA, the C kernel on CPU, each after a "
                        "one-time parity self-check, else the plain-torch reference), fused (a kernel or "
                        "an error), reference")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--output", default=None, help="annotated video (default runs/realtime/<source>.mp4; 'none' to skip)")
    p.add_argument("--events", default=None, help="JSON-lines events (default: next to the video)")
    p.add_argument("--summary", default=None, help="run summary JSON (default: next to the video)")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--vote", default="3/5", help="k/n: alarm when k of the last n frames detect; k/n/m; or off")
    p.add_argument("--clear", type=int, default=None, help="m: consecutive clean frames that clear the alarm (default 5)")
    p.add_argument("--mask-window", type=int, default=VotingConfig.mask_window,
                   help="frames a detected mask is propagated while the alarm is on")
    p.add_argument("--dilate", type=int, default=VotingConfig.dilate, help="pixels of motion margin on a propagated mask")
    p.add_argument("--no-propagate", action="store_true", help="never mask a frame before its first pass")
    p.add_argument("--motion", action="store_true",
                   help="move a propagated mask with the scene's motion (a tracked homography) instead of carrying it "
                        "in place; try it with --dilate 6")
    p.add_argument("--evidence", default=None, metavar="N:R",
                   help="also raise the alarm when the mean Z-Mask score over the last N unmasked frames exceeds R "
                        "lambda0 (a patch held just under the per-frame threshold); alarm only, no masking. "
                        "Fitted values per model: README, 'Adaptive attackers'")
    p.add_argument("--refine", default="none", choices=("none", "grabcut"),
                   help="snap each flagged frame's mask to the patch's edges in the image (measured with --motion --dilate 0) "
                        "(GrabCut seeded by the Z-Mask mask; a few hundred ms per masked frame on a CPU)")
    p.add_argument("--fail-closed", action="store_true",
                   help="a frame whose defense fails gets NO output (marked unsafe) instead of an undefended one")
    p.add_argument("--box-threshold", type=float, default=0.4,
                   help="detectors: boxes scoring at least this are drawn and logged (default 0.4)")
    p.add_argument("--show", action="store_true", help="on-screen window when a display exists")
    p.add_argument("--realtime", action="store_true", help="pace file/folder replays at their fps (drops frames)")
    p.add_argument("--imgsz", default=None, help="model input HxW (default: the calibration's, else 360x480)")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate of image folders")
    p.add_argument("--data", default=None, help="CamVid root for camvid:/demo sources")
    p.add_argument("--patch", default=None, help="demo: patch PNG (default: the library patch for --model)")
    p.add_argument("--patch-start", type=int, default=None, help="demo: first patched frame (default 30)")
    p.add_argument("--patch-frames", type=int, default=None, help="demo: patched frames, 0 = to the end (default 55)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a network stream (> 0)")
    p.add_argument("--reconnect", type=int, default=None, metavar="N",
                   help="live sources: reconnect attempts per dropped stream, with back-off 0.5 s doubling to 8 s "
                        "(default 5; 0 = never); files never reconnect")
    p.add_argument("--audit", action="store_true",
                   help="measurement: also analyse the unmasked frame when propagation masked it")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's adaptive malloc thresholds alone (default: fixed, so the frame loop does not "
                        "page-fault its activations in again every frame)")
    p.add_argument("--quiet", action="store_true", help="no progress bar / FPS line")
    args = p.parse_args(argv)
    specs = args.source or ["demo"]
    args.source, args.sources = specs[0], tuple(specs) if len(specs) > 1 else ()
    return args


def config_from_args(args: argparse.Namespace) -> Any:
    """The flags as the library's ``RunConfig`` (one field per flag, same names)."""
    from realtime.live.build import RunConfig
    return RunConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)})


def main(argv: Optional[List[str]] = None) -> int:
    """Stop signals are handled from here on (imports included): a signal before the first frame
    ends with one ``interrupted`` line; during the run the outputs are finalised first."""
    with signals.handled(restore=argv is not None):     # the command line: stay quiet until the exit
        try:
            return _main(argv)
        except KeyboardInterrupt as exc:
            sig = signals.signum_of(exc)
            print(f"interrupted ({signals.signal_name(sig)}) before the first frame; nothing was written",
                  file=sys.stderr)
            return 128 + sig


def _main(argv: Optional[List[str]]) -> int:
    from realtime.core.errors import UsageError, one_line
    from realtime.live.sources import SourceError

    args = parse_args(argv)
    try:
        code, _ = run(config_from_args(args))
        return code
    except (UsageError, SourceError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # last resort: one line, unless debugging
        if os.environ.get("REALTIME_DEBUG"):
            traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())} "
              "(set REALTIME_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
