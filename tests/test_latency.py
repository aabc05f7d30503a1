"""The latency harness: stage timers, percentiles, interleaving, overhead ratios, clean/attacked split,
report writing, and a tiny CLI run. Fake stages advance a fake clock by known amounts, so the
expected numbers are exact; one test uses real sleeps and checks only lower bounds and ordering."""
from __future__ import annotations

import json
import time
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch

from benchmarks import latency_report as report
from benchmarks.latency_entries import probe, stack_batches, to_input
from benchmarks.latency_frames import FrameSet, centre_place, paste, screen_attacked, synthetic_frames
from benchmarks.timing import Entry, FrameTimer, Outcome, measure, overhead, stage_medians, summarize, summarize_samples


class FakeClock:
    """Seconds that only move when a fake stage says so."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep_ms(self, ms: float) -> None:
        self.t += ms / 1000.0


def fake_entry(name: str, clock: FakeClock, stages: Dict[str, float], attacked_extra: float = 0.0,
               flags: bool = False, first_call_ms: float = 0.0, log: Optional[List[str]] = None) -> Entry:
    """Stages sleep known times; attacked frames add a ``second_pass`` of ``attacked_extra`` ms."""
    calls = {"n": 0}

    def run(kind: str, index: int, timer: FrameTimer) -> Outcome:
        if log is not None:
            log.append(f"{name}:{kind}")
        calls["n"] += 1
        if calls["n"] == 1:
            clock.sleep_ms(first_call_ms)               # a slow first call (warm-up must hide it)
        for stage, ms in stages.items():
            with timer(stage):
                clock.sleep_ms(ms + index % 2)          # frames alternate +0 / +1 ms
        if kind == "attacked" and attacked_extra:
            with timer("second_pass"):
                clock.sleep_ms(attacked_extra)
        return Outcome(flagged=(kind == "attacked") if flags else None)

    return Entry(name, run)


def test_frame_timer_orders_and_accumulates_stages():
    clock = FakeClock()
    t = FrameTimer(clock=clock)
    for stage, ms in [("preprocess", 1), ("backbone", 10), ("heatmaps", 3), ("backbone", 5), ("postprocess", 2)]:
        with t(stage):
            clock.sleep_ms(ms)
    t.add("vote", 0.5)
    st = t.stages()
    assert list(st) == ["preprocess", "backbone", "heatmaps", "postprocess", "vote"]
    assert st == pytest.approx({"preprocess": 1, "backbone": 15, "heatmaps": 3, "postprocess": 2, "vote": 0.5})


def test_frame_timer_records_a_stage_that_raises():
    clock = FakeClock()
    t = FrameTimer(clock=clock)
    with pytest.raises(ZeroDivisionError):
        with t("backbone"):
            clock.sleep_ms(4)
            1 / 0
    assert t.stages() == pytest.approx({"backbone": 4})


def test_real_sleeps_measure_at_least_the_sleep_and_keep_their_order():
    t = FrameTimer()
    with t("long"):
        time.sleep(0.03)
    with t("short"):
        time.sleep(0.002)
    st = t.stages()
    assert list(st) == ["long", "short"]
    assert st["long"] >= 30.0 and st["short"] >= 2.0
    assert st["long"] > st["short"]


def test_percentiles_on_a_known_distribution():
    s = summarize(list(range(1, 101)))            # 1..100, numpy linear interpolation
    assert s["n"] == 100 and s["min"] == 1 and s["max"] == 100
    assert s["median"] == pytest.approx(50.5)
    assert s["p95"] == pytest.approx(95.05)
    assert s["p99"] == pytest.approx(99.01)
    assert s["mean"] == pytest.approx(50.5)
    with pytest.raises(ValueError):
        summarize([])


def test_overhead_ratio_of_medians_and_paired():
    ov = overhead([12.0, 12.0, 24.0], [10.0, 10.0, 10.0])
    assert ov["ratio"] == pytest.approx(1.2)
    assert ov["overhead_pct"] == pytest.approx(20.0)
    assert ov["paired_ratio"] == pytest.approx(1.2)
    ov = overhead([11.0, 30.0, 22.0], [10.0, 20.0, 20.0])   # paired: 1.1, 1.5, 1.1 -> 1.1
    assert ov["paired_ratio"] == pytest.approx(1.1)
    assert ov["ratio"] == pytest.approx(22.0 / 20.0)


def test_measure_separates_clean_and_attacked_and_gives_exact_overheads():
    clock = FakeClock()
    entries = [fake_entry("none", clock, {"backbone": 10}, first_call_ms=500),
               fake_entry("zm", clock, {"backbone": 10, "heatmaps": 2}, attacked_extra=10, flags=True,
                          first_call_ms=500)]
    out = measure(entries, rounds=4, warmup=1, clock=clock)
    none, zm = out["none"], out["zm"]
    # warm-up (with the 500 ms first call) is excluded; frames alternate +0/+1 ms per stage
    assert none["clean"].total_ms == pytest.approx([10, 11, 10, 11])
    assert none["attacked"].total_ms == pytest.approx([10, 11, 10, 11])
    assert zm["clean"].total_ms == pytest.approx([12, 14, 12, 14])
    assert zm["attacked"].total_ms == pytest.approx([22, 24, 22, 24])
    assert zm["attacked"].rounds == [0, 1, 2, 3]
    clean = summarize_samples(zm["clean"])
    att = summarize_samples(zm["attacked"])
    assert clean["flag_rate"] == 0.0 and att["flag_rate"] == 1.0
    assert att["stages_ms"] == pytest.approx({"backbone": 10.5, "heatmaps": 2.5, "second_pass": 10.0})
    assert "second_pass" not in clean["stages_ms"]
    assert att["flagged_latency_ms"]["median"] == pytest.approx(23.0)
    assert summarize_samples(none["clean"])["flag_rate"] is None
    assert overhead(zm["clean"].total_ms, none["clean"].total_ms)["overhead_pct"] == pytest.approx(
        100 * (13.0 / 10.5 - 1))
    assert overhead(zm["attacked"].total_ms, none["attacked"].total_ms)["ratio"] == pytest.approx(23.0 / 10.5)
    assert summarize_samples(none["clean"])["fps"] == pytest.approx(1000 / 10.5)
    assert summarize_samples(none["clean"], batch=4)["fps"] == pytest.approx(4000 / 10.5)


def test_measure_interleaves_frame_by_frame_and_rotates_the_order():
    clock, log = FakeClock(), []
    entries = [fake_entry(n, clock, {"backbone": 1}, log=log) for n in ("a", "b", "c")]
    measure(entries, rounds=3, warmup=0, clock=clock)
    rounds = [log[i:i + 6] for i in range(0, 18, 6)]
    assert rounds[0] == ["a:clean", "a:attacked", "b:clean", "b:attacked", "c:clean", "c:attacked"]
    assert rounds[1][0] == "b:clean" and rounds[2][0] == "c:clean"
    assert all(sorted(r) == sorted(rounds[0]) for r in rounds)
    log.clear()
    measure(entries, rounds=2, warmup=0, clock=clock, rotate=False)
    assert log[0] == log[6] == "a:clean"


def test_measure_rejects_bad_arguments():
    clock = FakeClock()
    e = fake_entry("x", clock, {"backbone": 1})
    with pytest.raises(ValueError):
        measure([e], rounds=0, warmup=0, clock=clock)
    with pytest.raises(ValueError):
        measure([e, fake_entry("x", clock, {})], rounds=1, warmup=0, clock=clock)


def test_temporal_tags_are_summarised_per_path():
    clock = FakeClock()
    tags = ["plain", "second_pass", "reuse", "reuse", "second_pass", "reuse"]
    cost = {"plain": 10, "second_pass": 20, "reuse": 11}

    def run(kind: str, index: int, timer: FrameTimer) -> Outcome:
        tag = tags[index]
        with timer("backbone"):
            clock.sleep_ms(cost[tag])
        return Outcome(flagged=tag == "second_pass", tag=tag)

    s = measure([Entry("t", run, ("attacked",))], rounds=6, warmup=0, clock=clock)["t"]["attacked"]
    summ = summarize_samples(s)
    assert summ["paths"]["reuse"]["frames"] == 3
    assert summ["paths"]["reuse"]["latency_ms"]["median"] == pytest.approx(11)
    assert summ["paths"]["second_pass"]["latency_ms"]["median"] == pytest.approx(20)
    assert summ["paths"]["plain"]["frames"] == 1
    assert summ["flag_rate"] == pytest.approx(2 / 6)


def test_stage_medians_count_missing_stages_as_zero():
    assert stage_medians([{"a": 1.0}, {"a": 3.0, "b": 4.0}, {"a": 2.0}]) == {"a": 2.0, "b": 0.0}


def test_probe_reports_a_failing_entry():
    def bad(kind: str, index: int, timer: FrameTimer) -> Outcome:
        raise RuntimeError("no   kernel\nhere")
    assert probe(Entry("bad", bad)) == "RuntimeError: no kernel here"
    assert probe(Entry("ok", lambda k, i, t: Outcome())) is None


def test_frames_batches_and_input_conversion():
    frames = synthetic_frames(3, (40, 50))
    assert len(frames) == 3 and frames[0].shape == (40, 50, 3) and frames[0].dtype == np.uint8
    b = stack_batches(frames, batch=2, count=3)
    assert [x.shape for x in b] == [(2, 40, 50, 3)] * 3
    assert np.array_equal(b[1][1], frames[0])          # frames cycle: batch 1 = frames 2, 0
    x = to_input(b[0], torch.device("cpu"))
    assert x.shape == (2, 3, 40, 50) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.allclose(x[0, :, 3, 4] * 255, torch.from_numpy(frames[0][3, 4]).float())
    patch = np.full((10, 12, 3), 7, np.uint8)
    where = centre_place((40, 50), (10, 12))
    out = paste(frames[0], patch, where)
    assert (out[where[0]:where[0] + 10, where[1]:where[1] + 12] == 7).all()
    assert np.array_equal(frames[0], synthetic_frames(1, (40, 50))[0])    # the original is untouched
    with pytest.raises(ValueError):
        paste(frames[0], patch, (35, 0))


def test_screening_keeps_flagged_frames_in_order():
    clean = [np.full((4, 4, 3), i, np.uint8) for i in range(6)]
    att = [c + 100 for c in clean]
    fs = FrameSet(clean, att, "test", "patch")
    kept = screen_attacked(fs, lambda a: int(a[0, 0, 0]) % 2 == 1, keep=2)
    assert [int(a[0, 0, 0]) for a in kept.attacked] == [101, 103]
    assert [int(c[0, 0, 0]) for c in kept.clean] == [1, 3]
    assert "3 of 6" in kept.screened
    none = screen_attacked(fs, lambda a: False, keep=4)
    assert len(none.attacked) == 4 and "NOT second-pass" in none.screened


def fake_doc() -> Dict:
    clock = FakeClock()
    entries = [fake_entry("none", clock, {"backbone": 10}),
               fake_entry("zmask", clock, {"backbone": 10, "heatmaps": 2}, attacked_extra=10, flags=True)]
    samples = measure(entries, rounds=5, warmup=1, clock=clock)
    cfg = {"model": "m", "engine": "torch", "precision": "fp32", "resolution": [64, 96], "batch": 1,
           "frames": {"source": "synthetic", "patch": "p", "screened": None}, "notes": ["a note"],
           "entries": {n: {k: summarize_samples(s) for k, s in ks.items()} for n, ks in samples.items()},
           "samples_ms": {n: {k: s.total_ms for k, s in ks.items()} for n, ks in samples.items()},
           "overhead": {n: {k: overhead(s.total_ms, samples["none"][k].total_ms) for k, s in ks.items()}
                        for n, ks in samples.items()}}
    return {"env": report.environment(torch.device("cpu")), "configs": [cfg], "skipped": ["x/y: why"],
            "settings": {"command": "python -m benchmarks.latency", "frames": 5, "warmup": 1,
                         "interleave": "interleaved", "timing": "perf_counter", "rss_scope": "per-call"}}


def test_report_writes_json_markdown_and_plot(tmp_path):
    doc = fake_doc()
    written = report.write_all(doc, tmp_path / "sub" / "latency_test.json")
    assert set(written) == {"json", "md", "png"} and all(p.is_file() for p in written.values())
    back = json.loads(written["json"].read_text())
    assert back["configs"][0]["entries"]["zmask"]["attacked"]["latency_ms"]["median"] == pytest.approx(22.0)
    md = written["md"].read_text()
    assert "| `zmask` | clean | 5 | 12.0 |" in md          # totals 12, 14, 12, 14, 12
    assert "| `zmask` | attacked | 5 | 22.0 |" in md
    assert "+20.0 %" in md and "+120.0 %" in md           # against none's median of 10 ms
    assert "| `none` | clean | 5 | 10.0 |" in md and "baseline" in md
    assert "+20.0 % over the bare backbone (12.0 vs 10.0 ms median; misses the <= 5 % goal)" in md
    assert "heatmaps 2.0 ms" in md
    assert "second_pass" in md and "skipped: x/y: why" in md and "Note: a note" in md
    assert written["png"].read_bytes()[:4] == b"\x89PNG"


def test_git_commit_reads_refs_and_packed_refs(tmp_path):
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text("a" * 40 + "\n")
    assert report.git_commit(tmp_path) == "a" * 40
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text("# pack-refs\n" + "b" * 40 + " refs/heads/main\n")
    assert report.git_commit(tmp_path) == "b" * 40
    assert report.git_commit(tmp_path / "nowhere") is None


def test_cli_rejects_bad_input(capsys):
    from benchmarks.latency import main
    assert main(["--resolution", "12x", "--quiet"]) == 2
    assert "resolution" in capsys.readouterr().err
    assert main(["--defense", "nonsense", "--quiet"]) == 2
    assert "unknown defense" in capsys.readouterr().err


def test_cli_smoke_run_writes_results(tmp_path):
    from benchmarks.latency import main
    out = tmp_path / "lat.json"
    rc = main(["--frames", "3", "--warmup", "1", "--resolution", "64x96", "--pool", "2", "--synthetic",
               "--json", str(out), "--quiet"])
    assert rc == 0
    doc = json.loads(out.read_text())
    (cfg,) = doc["configs"]
    assert cfg["resolution"] == [64, 96] and cfg["frames"]["source"].startswith("synthetic")
    assert {"none", "zmask", "zmask+temporal"} <= set(cfg["entries"])
    for name in ("none", "zmask"):
        for kind in ("clean", "attacked"):
            s = cfg["entries"][name][kind]
            assert s["latency_ms"]["n"] == 3 and s["latency_ms"]["median"] > 0
            assert s["stages_ms"]["backbone"] > 0 and "preprocess" in s["stages_ms"]
    stages = set(cfg["entries"]["zmask"]["clean"]["stages_ms"])
    assert {"heatmaps", "mask", "second_pass"} <= stages
    # the CPU kernel runs the cascades and the fusion block inside "heatmaps"; the reference times them apart
    path = cfg["defenses"]["zmask"]["heatmaps"]
    assert ("fusion" in stages) == (path == "reference"), (path, stages)
    assert doc["settings"]["heap"].startswith(("steady heap", "default malloc"))
    temporal = cfg["entries"]["zmask+temporal"]["attacked"]
    assert {"backbone", "detect", "propagate"} <= set(temporal["stages_ms"])
    assert sum(p["frames"] for p in temporal["paths"].values()) == 3
    assert cfg["overhead"]["none"]["clean"]["ratio"] == pytest.approx(1.0)
    assert doc["env"]["torch"] == torch.__version__
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()


def test_suite_arguments_expand_to_the_standard_matrix():
    from benchmarks.latency import SUITE_MODELS, config_from_args, engine_status, known_defenses, parse_args
    argv = ["--suite", "--device", "cpu", "--resolutions", "360x480"]
    cfg = config_from_args(parse_args(argv), argv)
    assert cfg.models == SUITE_MODELS and cfg.resolutions == ((360, 480),)
    assert set(cfg.defenses) == set(known_defenses())
    usable = {e for e, (ok, _why) in engine_status().items() if ok}
    assert "torch" in cfg.engines and set(cfg.engines) == usable
    assert cfg.command.endswith("--suite --device cpu --resolutions 360x480")
    full = config_from_args(parse_args(["--suite", "--device", "cpu"]), [])
    assert full.resolutions == ((360, 480), (720, 960), (1024, 2048))
    one = config_from_args(parse_args(["--defense", "zmask", "--engine", "torch", "nonexistent"]), [])
    assert one.engines == ("torch",) and any("nonexistent" in s for s in one.skipped)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_events_time_gpu_stages_in_order():
    dev = torch.device("cuda")
    a = torch.randn(2048, 2048, device=dev)
    t = FrameTimer(dev)
    with t("big"):
        for _ in range(20):
            a = a @ a / 2048
    with t("small"):
        a = a + 1
    st = t.stages()
    assert list(st) == ["big", "small"] and st["big"] > st["small"] > 0
