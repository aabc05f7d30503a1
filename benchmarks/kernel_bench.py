"""Micro-benchmark of the fused Z-Mask kernels against the plain-torch reference, on a GPU.

    python -m benchmarks.kernel_bench [--iters 200] [--warmup 20] [--batch 1 4] [--dtype fp32 fp16]

For each scenario (the shipped DDRNet-23-slim calibration at CamVid's 360x480, and the paper's
Cityscapes 1024x2048 setting with DDRNet's tap shapes there) it times ``ZMask.detect`` on the same
taps with the reference heatmaps and with the fused kernels: CUDA events around each call, warm-up
excluded, median (and p90) of ``--iters`` calls. Bandwidth: the compulsory traffic (every tap read
once, every output written once) divided by the median time, next to the device-to-device copy
bandwidth measured here with a 256 MiB ``copy_``; the fused path also moves its working buffers
(chunk sums, pooled maps, global SATs on large grids), so this is a lower bound on what it moves.
Writes benchmarks/results/kernels_<device>.{json,md}. Exits with a message (status 2) without CUDA.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def time_cuda(fn: Callable[[], Any], iters: int, warmup: int) -> Dict[str, float]:
    """Median/p10/p90 milliseconds of ``fn`` over ``iters`` calls, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    ms = np.array([s.elapsed_time(e) for s, e in pairs])
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "iters": iters}


def copy_bandwidth(nbytes: int = 256 << 20, iters: int = 50) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), iters, 5)
    return 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9


def scenarios(batch: int, dtype: torch.dtype) -> List[Tuple[str, Any, Dict[str, torch.Tensor], Tuple[int, int]]]:
    """(name, ZMask, taps, input size): shipped CamVid calibration, and the paper's Cityscapes setting."""
    from realtime.defenses.artifact import load_calibration
    from realtime.defenses import ChannelStats, SPRConfig, ZMask, ZMaskConfig
    from realtime.models import build_model
    model = build_model("ddrnet23_slim", device="cuda")
    zm = load_calibration("calibration/shipped/ddrnet23_slim.safetensors", model).build_zmask(model)
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for name, size in (("camvid-360x480", (360, 480)), ("cityscapes-1024x2048", (1024, 2048))):
        x = torch.rand(batch, 3, *size, device="cuda", generator=g) * 0.4 + 0.3
        x[:, :, size[0] // 4:size[0] // 2, size[1] // 3:size[1] // 2] = torch.rand(
            batch, 3, size[0] // 2 - size[0] // 4, size[1] // 2 - size[1] // 3, device="cuda", generator=g)
        with torch.inference_mode():
            _, taps = zm.taps(x)
        taps = {k: v.to(dtype) for k, v in taps.items()}
        if size == (360, 480):
            out.append((name, zm, taps, size))
            continue
        cfg = ZMaskConfig(zm.cfg.shallow, zm.cfg.deep, SPRConfig.for_input(*size), zm.cfg.lambda0)
        stats = ChannelStats({k: v.float().mean(dim=(0, 2, 3)) for k, v in taps.items()},
                             {k: v.float().std(dim=(0, 2, 3)) + 1e-3 for k, v in taps.items()})
        out.append((name, ZMask(zm.taps, cfg, stats, zm.fusion), taps, size))
    return out


def run_scenario(name: str, zm: Any, taps: Dict[str, torch.Tensor], size: Tuple[int, int], iters: int,
                 warmup: int) -> Dict[str, Any]:
    import kernels
    from kernels.backend import rel_err
    engine = kernels.engine_for(zm.cfg, zm.stats)
    with torch.inference_mode():
        ref = zm.detect(taps, size)
        got = kernels.fused_detect(zm, taps, size)
        t_ref = time_cuda(lambda: zm.detect(taps, size), iters, warmup)
        t_fused = time_cuda(lambda: kernels.fused_detect(zm, taps, size), iters, warmup)
    n = next(iter(taps.values())).shape[0]
    hr, wr = zm.cfg.spr.work_size
    outputs = 3 * n * hr * wr * 4 + n * size[0] * size[1] * 4 + n * 5
    compulsory = sum(t.numel() * t.element_size() for t in taps.values()) + outputs
    plans = engine.plans(n, kernels.runtime.device_limits(torch.device("cuda")))
    return {
        "scenario": name, "batch": n, "dtype": str(next(iter(taps.values())).dtype).replace("torch.", ""),
        "work_size": [hr, wr], "input_size": list(size),
        "taps": {k: list(v.shape) for k, v in taps.items()},
        "reference": t_ref, "fused": t_fused, "speedup": t_ref["median_ms"] / t_fused["median_ms"],
        "compulsory_bytes": compulsory,
        "fused_GBps": compulsory / (t_fused["median_ms"] * 1e-3) / 1e9,
        "reference_GBps": compulsory / (t_ref["median_ms"] * 1e-3) / 1e9,
        "sat_in_shared_memory": [p.use_shared for p in plans],
        "rel_err": {k: rel_err(getattr(got, k), getattr(ref, k)) for k in ("h_s", "h_d", "soft_mask", "score")},
        "flags_equal": bool(torch.equal(got.flagged, ref.flagged)),
    }


def markdown(res: Dict[str, Any]) -> str:
    lines = [f"# Fused Z-Mask kernels vs reference — {res['device']}", "",
             f"torch {res['torch']}, CUDA {res['cuda']}, backend {res['backend']}; device-to-device copy "
             f"bandwidth {res['copy_GBps']:.0f} GB/s; CUDA-event medians over {res['iters']} calls after "
             f"{res['warmup']} warm-up calls; `ZMask.detect` from taps (heatmaps, fusion, score, mask).", "",
             "| scenario | batch | dtype | reference ms | fused ms | speed-up | fused GB/s (compulsory) | "
             "% of copy bw | max rel err | SAT in smem |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["runs"]:
        lines.append(f"| {r['scenario']} | {r['batch']} | {r['dtype']} | {r['reference']['median_ms']:.3f} | "
                     f"{r['fused']['median_ms']:.3f} | {r['speedup']:.1f}x | {r['fused_GBps']:.0f} | "
                     f"{100 * r['fused_GBps'] / res['copy_GBps']:.1f}% | {max(r['rel_err'].values()):.1e} | "
                     f"{'yes' if all(r['sat_in_shared_memory']) else 'no'} |")
    lines += ["", "Compulsory bytes = taps read once + outputs written once; the fused path's own buffers "
              "are not counted, so the GB/s column is a lower bound of what it moves."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--dtype", nargs="+", default=["fp32", "fp16"], choices=("fp32", "fp16"))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)
        return 2
    import kernels
    ok, why = kernels.available()
    if not ok:
        print(f"fused kernels unavailable: {why}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    res: Dict[str, Any] = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                           "backend": why, "iters": args.iters, "warmup": args.warmup,
                           "copy_GBps": copy_bandwidth(), "runs": []}
    for dt in args.dtype:
        for b in args.batch:
            for scen in scenarios(b, torch.float16 if dt == "fp16" else torch.float32):
                r = run_scenario(*scen, args.iters, args.warmup)
                res["runs"].append(r)
                print(f"{r['scenario']:>22} b={b} {dt}: reference {r['reference']['median_ms']:.3f} ms, "
                      f"fused {r['fused']['median_ms']:.3f} ms ({r['speedup']:.1f}x), "
                      f"max rel err {max(r['rel_err'].values()):.1e}", flush=True)
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"kernels_{slug}.json").write_text(json.dumps(res, indent=2))
    (args.out / f"kernels_{slug}.md").write_text(markdown(res))
    print(f"wrote {args.out / f'kernels_{slug}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
