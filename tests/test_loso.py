"""benchmarks.loso: the leave-one-sequence-out runner's orchestration, with a stand-in interpreter.

The stand-in answers ``-m realtime.train`` (fails for the fold named in $FAIL_SEQ) and ``-m benchmarks.accuracy``
(writes an mIoU that encodes model, recipe and drive), so the test checks which runs happen, in what order,
what resumes, and the table, without training anything."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from benchmarks import loso

FAKE = r"""#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
log = os.environ["LOSO_LOG"]
with open(log, "a") as f:
    f.write(" ".join(args[:2]) + " " + args[args.index("--hold-out") + 1 if "--hold-out" in args else -1] + "\n")
if args[1] == "realtime.train":
    seq = args[args.index("--hold-out") + 1]
    sys.exit(3 if seq == os.environ.get("FAIL_SEQ") else 0)
out = args[args.index("--json") + 1]
seq = args[args.index("--sequence") + 1]
recipe = out.split(os.sep)[-3]
value = {"0001TP": 0.5, "0006R0": 0.6, "0016E5": 0.7}[seq] + (0.01 if recipe == "capture" else 0.0)
json.dump({"miou": value}, open(out, "w"))
"""


@pytest.fixture
def fake_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    exe = tmp_path / "python"
    exe.write_text(FAKE)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("LOSO_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setattr(loso.time, "sleep", lambda _s: None)
    return exe


def test_commands_train_then_score_the_held_out_drive(tmp_path: Path) -> None:
    cfg = loso.LosoConfig(out=tmp_path, epochs=7, train_args=loso.CPU_ARGS, data="/d")
    (job,) = [j for j in loso.jobs(cfg) if j.recipe == "capture" and j.seq == "0006R0"]
    train, score = loso.commands(cfg, job)
    assert train[1:3] == ["-m", "realtime.train"] and "--hold-out" in train and train[train.index("--hold-out") + 1] == "0006R0"
    assert "--jpeg" in train and "--base-scale" in train and train[train.index("--epochs") + 1] == "7"
    assert score[1:3] == ["-m", "benchmarks.accuracy"] and score[score.index("--sequence") + 1] == "0006R0"
    assert score[score.index("--weights") + 1] == str(job.dir / "best.pt") and "train,val" in score
    (job.dir).mkdir(parents=True)
    (job.dir / "done.json").write_text("{}")
    assert [c[2] for c in loso.commands(cfg, job)] == ["benchmarks.accuracy"]     # finished training: score only


def test_run_all_builds_the_table_records_a_failure_and_resumes(tmp_path: Path, fake_python: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAIL_SEQ", "0016E5")
    cfg = loso.LosoConfig(models=("m",), out=tmp_path / "runs", parallel=2, python=str(fake_python))
    doc = loso.run_all(cfg)
    rows = doc["rows"]["m"]
    assert rows["base"] == {"0001TP": 0.5, "0006R0": 0.6} and rows["capture"]["0006R0"] == pytest.approx(0.61)
    assert set(doc["failed"]) == {"m/base/0016E5", "m/capture/0016E5"}
    md = loso.markdown(doc)
    assert "| `m` | base | 0.500 | 0.600 | - | - | - |" in md and "failed: m/base/0016E5" in md
    # second start: the scored folds are skipped, the failed ones run again and complete the means
    monkeypatch.delenv("FAIL_SEQ")
    (tmp_path / "calls.log").write_text("")
    doc = loso.run_all(cfg)
    calls = (tmp_path / "calls.log").read_text().split("\n")
    assert all("0016E5" in c for c in calls if c) and len([c for c in calls if c]) == 4
    assert doc["rows"]["m"]["base"]["mean"] == pytest.approx(0.6) and not doc["failed"]
    loso.write(doc, cfg.out, tmp_path / "results", note="stand-in")
    assert json.loads((tmp_path / "results" / "loso.json").read_text())["note"] == "stand-in"


def test_cli_rejects_bad_numbers(capsys: pytest.CaptureFixture) -> None:
    assert loso.main(["--parallel", "0"]) == 2
    assert "--parallel" in capsys.readouterr().err


def test_a_fold_started_with_other_settings_is_refused_not_mixed(tmp_path: Path, fake_python: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    cfg = loso.LosoConfig(models=("m",), recipes=("base",), sequences=("0001TP",), epochs=5, out=tmp_path / "r",
                          python=str(fake_python))
    loso.run_all(cfg)
    longer = loso.LosoConfig(models=("m",), recipes=("base",), sequences=("0001TP",), epochs=50, out=tmp_path / "r",
                             python=str(fake_python))
    with pytest.raises(ValueError, match="other settings"):
        loso.run_all(longer)
    assert loso.main(["--model", "m", "--recipe", "base", "--sequence", "0001TP", "--epochs", "50",
                      "--out", str(tmp_path / "r")]) == 2
    assert "other settings" in capsys.readouterr().err
