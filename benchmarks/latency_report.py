"""Latency results out: environment record, JSON, markdown tables and a box plot (matplotlib Agg).

A result document is ``{"env": {...}, "settings": {...}, "configs": [config, ...]}``; a config is one
(model, engine, resolution, batch) cell of the matrix with ``entries[name][kind]`` summaries (from
``timing.summarize_samples``), raw per-frame totals in ``samples_ms[name][kind]`` and the overhead of
every entry against ``none`` in ``overhead[name][kind]``.
"""
from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from realtime.core.devices import describe

REPO = Path(__file__).resolve().parents[1]
VERSIONED = ("torch", "torchvision", "numpy", "opencv-python-headless", "onnx", "onnxruntime", "onnxruntime-gpu",
             "tensorrt", "torch-tensorrt", "triton", "matplotlib")


def git_commit(repo: Path = REPO) -> Optional[str]:
    """HEAD's commit read from ``.git`` (no git binary needed); None outside a checkout."""
    git = repo / ".git"
    try:
        if git.is_file():                                   # worktree: "gitdir: <path>"
            git = (repo / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(None, 1)[1]
        for base in (git, _common_dir(git)):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except (OSError, IndexError):
        return None
    return None


def _common_dir(git: Path) -> Path:
    common = git / "commondir"
    return (git / common.read_text().strip()).resolve() if common.is_file() else git


def nvidia_driver() -> Optional[str]:
    """The NVIDIA driver version from nvidia-smi, when there is one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=False)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> Dict[str, Any]:
    """Device, driver, library versions, CPU and git commit, for the results file."""
    env: Dict[str, Any] = dict(describe(device))
    versions = {}
    for pkg in VERSIONED:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    env["versions"] = versions
    env["platform"] = platform.platform()
    env["cpu_model"] = _cpu_model()
    env["cpu_count"] = _cpu_count()
    env["git_commit"] = git_commit()
    if device.type == "cuda":
        env["driver"] = nvidia_driver()
        env["cudnn"] = str(torch.backends.cudnn.version())
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gb"] = round(props.total_memory / 2 ** 30, 1)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count() -> int:
    import os
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_slug(device: torch.device) -> str:
    """Short file-name tag: ``cpu`` or the GPU's name (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


# ---------------------------------------------------------------- markdown
def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:+.1f} %"


def config_title(c: Dict[str, Any]) -> str:
    return f"{c['model']} / {c['engine']} / {c['resolution'][0]}x{c['resolution'][1]} / batch {c['batch']}"


def config_markdown(c: Dict[str, Any]) -> List[str]:
    """Latency table and stage-breakdown table of one config."""
    lines = [f"### {config_title(c)}", "", f"Frames: {c['frames']['source']}; attacked: {c['frames']['patch']}.",
             *([f"Screening: {c['frames']['screened']}."] if c['frames'].get('screened') else []),
             "Attacked frames: the patched twins of the clean frames (Z-Mask's second-pass path when screened).", "",
             "| defense | frames | n | median ms | p95 ms | p99 ms | FPS | overhead vs none | flagged | "
             "peak RSS MiB | peak dev MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    stage_names: List[str] = []
    for name, kinds in c["entries"].items():
        for kind, s in kinds.items():
            lat = s["latency_ms"]
            ov = c["overhead"].get(name, {}).get(kind)
            flag = "-" if s.get("flag_rate") is None else f"{100 * s['flag_rate']:.0f} %"
            dev = "-" if s.get("peak_device_mb") is None else f"{s['peak_device_mb']:.0f}"
            cost = "baseline" if name == "none" else (_pct(ov["overhead_pct"]) if ov else "-")
            lines.append(f"| `{name}` | {kind} | {lat['n']} | {lat['median']:.1f} | {lat['p95']:.1f} | "
                         f"{lat['p99']:.1f} | {s['fps']:.2f} | {cost} | {flag} | {s['peak_rss_mb']:.0f} | {dev} |")
            stage_names += [k for k in s["stages_ms"] if k not in stage_names]
    lines += ["", "Median per-stage ms (a stage a frame skipped counts as 0):", "",
              "| defense | frames | " + " | ".join(stage_names) + " |",
              "|---|---|" + "---|" * len(stage_names)]
    for name, kinds in c["entries"].items():
        for kind, s in kinds.items():
            lines.append(f"| `{name}` | {kind} | " + " | ".join(_ms(s['stages_ms'].get(k)) for k in stage_names)
                         + " |")
    paths = [(name, kind, s["paths"]) for name, kinds in c["entries"].items() for kind, s in kinds.items()
             if s.get("paths")]
    if paths:
        lines += ["", "Temporal mask-reuse path (live pipeline: voting + propagation), by what each frame did:", "",
                  "| entry | frames | path | n | median ms | p95 ms |", "|---|---|---|---|---|---|"]
        for name, kind, ps in paths:
            for tag, p in ps.items():
                lines.append(f"| `{name}` | {kind} | {tag} | {p['frames']} | {p['latency_ms']['median']:.1f} | "
                             f"{p['latency_ms']['p95']:.1f} |")
    ms = c.get("multistream")
    if ms:
        lines += ["", f"Multi-stream throughput, {ms['streams']} streams (FPS over all streams):", "",
                  "| frames | " + " | ".join(f"`{n}`" for n in ms["fps"]) + " | batched / serial |",
                  "|---|" + "---|" * (len(ms["fps"]) + 1)]
        for kind in next(iter(ms["fps"].values())):
            lines.append(f"| {kind} | " + " | ".join(f"{v[kind]:.2f}" for v in ms["fps"].values())
                         + f" | {ms['speedup'].get(kind, float('nan')):.2f}x |")
    for note in c.get("notes", []):
        lines += ["", f"Note: {note}"]
    return lines + [""]


def zmask_clean_overhead(c: Dict[str, Any], goal_pct: float = 5.0) -> Optional[str]:
    """One line: Z-Mask's clean-frame overhead over the backbone and which stages it goes to."""
    try:
        zm, base = c["entries"]["zmask"]["clean"], c["entries"]["none"]["clean"]
        ov = c["overhead"]["zmask"]["clean"]["overhead_pct"]
    except KeyError:
        return None
    zs, bs = zm["stages_ms"], base["stages_ms"]
    # a kernel path that runs the cascades and fusion inside "heatmaps" leaves no "fusion" stage: say so
    path = c.get("defenses", {}).get("zmask", {}).get("heatmaps")
    fused = "fusion" not in zs and "kernel" in str(path)
    parts = [f"{'heatmaps + fusion' if fused and k == 'heatmaps' else k} {zs[k]:.1f} ms"
             for k in ("heatmaps", "fusion", "mask", "second_pass") if zs.get(k)]
    parts.append(f"backbone with taps {zs.get('backbone', 0.0) - bs.get('backbone', 0.0):+.1f} ms vs bare")
    verdict = "meets" if ov <= goal_pct else "misses"
    return (f"Z-Mask on clean frames ({config_title(c)}{f', heatmaps: {path}' if path else ''}): "
            f"{ov:+.1f} % over the bare backbone "
            f"({zm['latency_ms']['median']:.1f} vs {base['latency_ms']['median']:.1f} ms median; {verdict} the "
            f"<= {goal_pct:.0f} % goal); stage medians: {', '.join(parts)}.")


def markdown(doc: Dict[str, Any]) -> str:
    """The whole results document as markdown."""
    env, st = doc["env"], doc["settings"]
    dev = env.get("gpu") or f"{env.get('cpu_model')} ({env.get('cpu_count')} cores, {env.get('threads')} threads)"
    vers = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    lines = ["# Latency benchmark", "", f"Device: {dev}; driver {env.get('driver') or '-'}; CUDA "
             f"{env.get('cuda') or '-'}; {vers}; commit {env.get('git_commit') or 'unknown'}.",
             f"Command: `{st['command']}`", "",
             f"Timing: {st['warmup']} warm-up rounds discarded, then {st['frames']} timed rounds; {st['interleave']}. "
             f"Latency = host time from the uint8 frame to the label map on the host ({st['timing']}). "
             f"Overhead = median(defense) / median(none) - 1 on the same kind of frame, same run. "
             f"Peak RSS: {st['rss_scope']}." + (f" Heap: {st['heap']}." if st.get("heap") else ""), ""]
    summary = [line for line in (zmask_clean_overhead(c) for c in doc["configs"]) if line]
    if summary:
        lines += ["## Z-Mask clean-frame overhead", ""] + [f"- {line}" for line in summary] + [""]
    for c in doc["configs"]:
        lines += config_markdown(c)
    for s in doc.get("skipped", []):
        lines.append(f"- skipped: {s}")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- plot
def plot(doc: Dict[str, Any], path: Path) -> Optional[Path]:
    """Box plot of per-frame latency, one panel per config, clean and attacked side by side."""
    configs = doc["configs"]
    if not configs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(configs)
    cols = min(2, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 4.2 * rows), squeeze=False)
    for ax, c in zip(axes.flat, configs):
        data, labels, colours = [], [], []
        for name, kinds in c["samples_ms"].items():
            for kind, vals in kinds.items():
                data.append(vals)
                labels.append(f"{name}\n{kind}")
                colours.append("#4c72b0" if kind == "clean" else "#dd8452")
        box = ax.boxplot(data, patch_artist=True, showfliers=True, whis=(5, 95))
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=60, ha="right", fontsize=7)
        for b, col in zip(box["boxes"], colours):
            b.set_facecolor(col)
            b.set_alpha(0.7)
        ax.set_ylabel("latency per batch (ms)")
        ax.set_title(config_title(c), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("blue: clean frames, orange: attacked frames; whiskers 5-95th percentile", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(doc: Dict[str, Any], json_path: Path, make_plot: bool = True) -> Dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` next to each other."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md = json_path.with_suffix(".md")
    md.write_text(markdown(doc))
    out = {"json": json_path, "md": md}
    if make_plot:
        png = plot(doc, json_path.with_suffix(".png"))
        if png is not None:
            out["png"] = png
    return out


__all__ = ["config_markdown", "device_slug", "environment", "git_commit", "markdown", "plot", "write_all"]
