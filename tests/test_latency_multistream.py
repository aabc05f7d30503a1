"""The latency suite's multi-stream entry (N streams batched into one step vs N x one stream) and the
``--kernels`` flag of the benchmarks and calibration.evaluate (no timing is asserted)."""
from __future__ import annotations

import json

from benchmarks.latency import config_from_args, main, parse_args


def test_multistream_entries_are_measured_and_reported(tmp_path):
    out = tmp_path / "lat.json"
    rc = main(["--frames", "2", "--warmup", "0", "--resolution", "64x96", "--pool", "2", "--synthetic",
               "--streams", "2", "--kernels", "reference", "--no-temporal", "--no-plot", "--json", str(out),
               "--quiet", "--threads", "1"])
    assert rc == 0
    (cfg,) = json.loads(out.read_text())["configs"]
    batched, serial = cfg["entries"]["zmask+temporal x2 batched"], cfg["entries"]["zmask+temporal x2 serial"]
    for e in (batched, serial):
        assert e["clean"]["latency_ms"]["n"] == 2 and e["clean"]["fps"] > 0
        assert {"preprocess", "backbone", "detect", "vote", "postprocess"} <= set(e["attacked"]["stages_ms"])
    ms = cfg["multistream"]
    assert ms["streams"] == 2 and set(ms["speedup"]) == {"clean", "attacked"}
    assert "Multi-stream throughput, 2 streams" in out.with_suffix(".md").read_text()


def test_kernels_flag_on_the_benchmark_and_calibration_evaluate():
    argv = ["--kernels", "fused", "--defense", "zmask"]
    assert config_from_args(parse_args(argv), argv).kernel == "fused"
    assert parse_args(["--kernel", "reference"]).kernel == "reference"        # the old spelling still works
    from calibration.evaluate import parse_args as eval_args
    assert eval_args(["--model", "ddrnet23_slim"]).kernels == "auto"
    assert eval_args(["--model", "ddrnet23_slim", "--kernels", "reference"]).kernels == "reference"
