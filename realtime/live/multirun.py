"""A multi-stream live run: ``run_multi(cfg, specs) -> (exit status, summary)``.

Every source gets its own outputs: an annotated video and an events file (each line tagged with
``stream``, the source's index), named after the single-stream ones with ``.s<i>`` before the
extension (``--output out.mp4`` -> ``out.s0.mp4``, ``out.s0.events.jsonl``, ...; ``--events ev.jsonl``
-> ``ev.s0.jsonl``). One summary JSON (``--summary``, default next to ``--output``, else
``runs/realtime/streams.summary.json``) holds the run's totals and, under ``streams``, each stream's
summary as a single-stream run writes it. ``--max-frames`` counts per stream.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from realtime.core import signals
from realtime.core.devices import describe
from realtime.core.errors import UsageError, one_line

from .build import REPO, RunConfig, build, calibration_path, weights_arg
from .multistream import StreamsConfig, run_streams
from .paths import check_outputs, input_paths
from .paths import output_paths as paths_for
from .pipeline import RunInfo
from .report import print_summary, run_status, write_summary
from .runner import Outputs, prepare
from .sources import open_source, source_kind


def _tag(p: Path, i: int) -> Path:
    return p.with_name(f"{p.stem}.s{i}{p.suffix}")


def stream_paths(cfg: RunConfig, names: Sequence[str], repo: Path = REPO
                 ) -> Tuple[List[Dict[str, Optional[Path]]], Path]:
    """Each stream's video / events paths (``summary`` None: the run has one) and the run's summary path."""
    per = []
    for i, name in enumerate(names):
        one = paths_for(dataclasses.replace(cfg, events=None, summary=None), name, repo)
        default = paths_for(dataclasses.replace(cfg, output=None, events=None, summary=None), name, repo)["video"]
        video = _tag(one["video"], i) if one["video"] is not None else None
        base = video if video is not None else _tag(default, i)
        events = _tag(Path(cfg.events), i) if cfg.events else base.with_suffix(".events.jsonl")
        per.append({"video": video, "events": events, "summary": None})
    if cfg.summary:
        summary = Path(cfg.summary)
    elif cfg.output and cfg.output.lower() != "none":
        summary = Path(cfg.output).with_suffix(".summary.json")
    else:
        summary = repo / "runs" / "realtime" / "streams.summary.json"
    return per, summary


def _check_paths(per: List[Dict[str, Optional[Path]]], summary: Path, inputs: List[Tuple[str, Path]]) -> None:
    everything = {"summary": summary}
    check_outputs(everything, inputs)
    seen = {summary.resolve(): "--summary"}
    for d in per:
        check_outputs(d, inputs)
        for k, p in d.items():
            if p is None:
                continue
            if p.resolve() in seen and not str(p).startswith("/dev/"):
                raise UsageError(f"two outputs of this run are the same file {p}; give each its own path")
            seen[p.resolve()] = k


def run_multi(cfg: RunConfig, specs: Sequence[str], scfg: StreamsConfig = StreamsConfig()
              ) -> Tuple[int, Dict[str, Any]]:
    """A whole multi-stream run (see the module doc); problems before the first frame raise UsageError."""
    if cfg.show:
        raise UsageError("--show shows one stream; drop it for a multi-stream run (each stream has its video)")
    device, pcfg, opts, heap = prepare(cfg)
    seen = signals.mark()
    sources: List[Any] = []
    outs: List[Outputs] = []
    info = RunInfo()
    try:
        for spec in specs:
            sources.append(open_source(spec, opts))
        per, summary_path = stream_paths(cfg, [s.name for s in sources])
        cal = calibration_path(cfg) if cfg.defense == "zmask" else None
        weights = weights_arg(cfg.weights) if cfg.weights != "default" else None
        inputs = [x for spec, src in zip(specs, sources)
                  for x in input_paths(dataclasses.replace(cfg, source=spec), src, weights, cal)]
        _check_paths(per, summary_path, inputs)
        rt = build(cfg, device, pcfg)
        pcfg = dataclasses.replace(pcfg, imgsz=rt.imgsz)
        desc = rt.description
        head = {"sources": list(specs), "streams_count": len(specs), "model": cfg.model, **desc,
                "imgsz": list(rt.imgsz), "device": describe(device), "heap": heap}
        for i, (spec, src) in enumerate(zip(specs, sources)):
            total = min(x for x in (src.length, cfg.max_frames) if x is not None) \
                if (src.length or cfg.max_frames) else None
            o = Outputs(dataclasses.replace(cfg, source=spec, quiet=True), src, per[i], cfg.defense != "none",
                        src.live or cfg.realtime, total, desc.get("class_names"), stream=i)
            outs.append(o)
        try:
            write_summary(summary_path, {**head, "status": "running", "frames": 0})
        except OSError as exc:
            raise UsageError(f"--summary {summary_path} cannot be written: {one_line(exc)}") from None
        streams = run_streams(sources, rt.step, lambda i, w, r: outs[i].handle(w, r), pcfg, device, scfg,
                              info=info)
    except BaseException:
        with signals.deferred():
            for o in outs:
                o.close()
            for s in sources:
                s.close()
        raise
    with signals.deferred():
        errors = [o.close() for o in outs]
        for st in streams:
            if not st.info.reader_alive:     # never close a container another thread is still reading
                st.source.close()
    info.sink_error = info.sink_error or next((e for e in errors if e), None)
    late = signals.since(seen)
    if late and not info.interrupted:
        info.interrupted, info.signal, info.stopped = True, late[0], signals.signal_name(late[0])
    per_stream = []
    for st, o, spec, paths in zip(streams, outs, specs, per):
        si = st.info
        s = {"stream": st.index, "source": spec, "kind": source_kind(spec),
             **({"source_info": st.source.info} if getattr(st.source, "info", None) else {}),
             **o.stats.summary(info.wall_s, si.read, si.dropped), "stopped": si.stopped,
             "source_error": si.source_error, "reconnects": o.reconnects,
             "outputs": {k: str(v) if v else None for k, v in paths.items() if k != "summary"}}
        if o.video is not None and o.video.frames == 0:
            s["outputs"]["video"] = None
        per_stream.append(s)
    frames = sum(s["frames"] for s in per_stream)
    died = [st for st in streams if st.info.source_error]
    agg = RunInfo(read=sum(st.info.read for st in streams), processed=frames, wall_s=info.wall_s,
                  interrupted=info.interrupted, signal=info.signal, sink_error=info.sink_error,
                  source_error="; ".join(f"stream {st.index}: {st.info.source_error}" for st in died) or None,
                  source_died=any(st.info.source_died for st in died))
    summary: Dict[str, Any] = {
        **head, "frames": frames, "read": agg.read, "dropped": sum(s["dropped"] for s in per_stream),
        "wall_s": round(info.wall_s, 2), "fps": round(frames / info.wall_s, 2) if info.wall_s > 0 else None,
        "batches": info.processed, "mean_batch": round(frames / info.processed, 3) if info.processed else None,
        "push_timeout_s": scfg.push_timeout, "fail_closed": cfg.fail_closed,
        "defense_errors": sum(s["defense_errors"] for s in per_stream),
        "defense_error": next((s["defense_error"] for s in per_stream if s["defense_error"]), None),
        "stopped": info.stopped if (info.interrupted or info.sink_error) else "end of every source",
        "interrupted": info.interrupted, "signal": signals.signal_name(info.signal) if info.signal else None,
        "streams": per_stream, "outputs": {"summary": str(summary_path)}}
    summary["status"] = "interrupted" if info.interrupted else ("failed" if agg.source_error or agg.sink_error
                                                                  else "complete")
    with signals.deferred():
        try:
            write_summary(summary_path, summary)
        except OSError as exc:
            agg.sink_error = agg.sink_error or f"--summary {summary_path}: {one_line(exc)}"
        for s in per_stream:
            print(f"stream {s['stream']} ({s['source']}):")
            print_summary(s)
        print(f"streams: {len(per_stream)}, {frames} frames in {summary['batches']} batches "
              f"(mean batch {summary['mean_batch']}), {summary['fps']} FPS over all streams; wrote {summary_path}")
    return run_status(agg, summary, cfg.fail_closed), summary


__all__ = ["run_multi", "stream_paths"]
