"""Leave-one-sequence-out table (issue 21): per model and recipe, train on two drives, score the third.

    python -m benchmarks.loso --model ddrnet23_slim bisenetv1 --epochs 380 --parallel 6      # GPU machine
    python -m benchmarks.loso --model ddrnet23_slim --cpu --epochs 28 --parallel 2             # 2-core CPU, half res
    python -m benchmarks.loso --report runs/loso                                              # table only

Every (model, recipe, held-out drive) is one ``realtime.train --hold-out SEQ`` run in ``OUT/<model>/<recipe>/<SEQ>``
(resumed from its ``last.pt`` when started again), then ``benchmarks.accuracy`` on that drive's frames
(``acc.json`` beside it; skipped when present). Recipes: ``base`` (the shipped recipe) and ``capture`` (plus blur,
sensor noise and JPEG, ``--blur 0.3 --noise 0.03 --jpeg 0.3``). Runs go ``--parallel`` at a time as subprocesses,
so a crash in one is recorded and the rest continue. The table (JSON + markdown) goes to
``OUT/loso.{json,md}``; ``--results DIR`` also copies it there (e.g. ``benchmarks/results/loso``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

SEQUENCES = ("0001TP", "0006R0", "0016E5")
RECIPES: Dict[str, Tuple[str, ...]] = {"base": (), "capture": ("--blur", "0.3", "--noise", "0.03", "--jpeg", "0.3")}
RESULTS = Path(__file__).resolve().parent / "results"
CPU_ARGS = ("--base-scale", "0.5", "--crop", "180x240", "--batch-size", "8", "--eval-size", "180x240", "--no-amp")


@dataclass
class LosoConfig:
    """What to train and where; ``train_args`` go to every ``realtime.train`` call."""
    models: Tuple[str, ...] = ("ddrnet23_slim",)
    recipes: Tuple[str, ...] = ("base", "capture")
    sequences: Tuple[str, ...] = SEQUENCES
    epochs: int = 380
    eval_every: int = 20
    out: Path = Path("runs/loso")
    data: Optional[str] = None
    parallel: int = 1
    threads: Optional[int] = None          # OMP threads per run (default: cores / parallel)
    train_args: Tuple[str, ...] = ()
    eval_size: Optional[str] = None        # benchmarks.accuracy --size (default: native frames)
    results: Optional[Path] = None
    python: str = field(default_factory=lambda: sys.executable)


@dataclass
class Job:
    model: str
    recipe: str
    seq: str
    dir: Path

    @property
    def name(self) -> str:
        return f"{self.model}/{self.recipe}/{self.seq}"


def jobs(cfg: LosoConfig) -> List[Job]:
    return [Job(m, r, s, cfg.out / m / r / s) for m in cfg.models for r in cfg.recipes for s in cfg.sequences]


def train_argv(cfg: LosoConfig, job: Job) -> List[str]:
    """What ``realtime.train`` gets for this fold (after ``python -m realtime.train``)."""
    data = ["--data", cfg.data] if cfg.data else []
    return ["--model", job.model, "--hold-out", job.seq, "--out", str(job.dir), "--epochs", str(cfg.epochs),
            "--eval-every", str(cfg.eval_every), *data, *RECIPES[job.recipe], *cfg.train_args]


def check_settings(cfg: LosoConfig, job: Job) -> None:
    """A fold directory belongs to one set of training settings (``settings.json``): resuming it with others would
    mix recipes or schedules in one table (``realtime.train`` resumes ``last.pt`` with its own epoch count)."""
    want = {"train": train_argv(cfg, job), "eval_size": cfg.eval_size}
    path = job.dir / "settings.json"
    if path.is_file():
        have = json.loads(path.read_text())
        if have != want:
            raise ValueError(f"{job.dir} was started with other settings ({have}); use another --out or remove it")
    else:
        job.dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(want, indent=1) + "\n")


def commands(cfg: LosoConfig, job: Job) -> List[List[str]]:
    """The train call (unless it finished) and the held-out evaluation, as argv lists."""
    data = ["--data", cfg.data] if cfg.data else []
    cmds: List[List[str]] = []
    if not (job.dir / "done.json").is_file():
        cmds.append([cfg.python, "-m", "realtime.train", *train_argv(cfg, job)])
    size = ["--size", cfg.eval_size] if cfg.eval_size else []
    cmds.append([cfg.python, "-m", "benchmarks.accuracy", "--model", job.model, "--weights", str(job.dir / "best.pt"),
                 "--split", "train,val", "--sequence", job.seq, *size, *data, "--json", str(job.dir / "acc.json")])
    return cmds


def _env(cfg: LosoConfig) -> Dict[str, str]:
    env = dict(os.environ)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(1, cfg.parallel))
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def run_all(cfg: LosoConfig) -> Dict[str, object]:
    """Run every job not yet scored, ``parallel`` at a time; returns the table document."""
    for job in jobs(cfg):
        check_settings(cfg, job)             # before anything starts: a mismatch stops the whole run
    todo = [j for j in jobs(cfg) if not (j.dir / "acc.json").is_file()]
    running: List[Tuple[Job, List[List[str]], subprocess.Popen, Any]] = []
    failed: Dict[str, str] = {}
    try:
        _drive(cfg, todo, running, failed)
    finally:                                 # an error or a signal: no orphan keeps writing a fold's checkpoints
        for _job, _rest, proc, log in running:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()
    doc = table(cfg.out)
    doc["failed"] = failed
    return doc


def _drive(cfg: LosoConfig, todo: List[Job], running: List[Tuple[Job, List[List[str]], subprocess.Popen, Any]],
           failed: Dict[str, str]) -> None:
    """Start jobs ``parallel`` at a time and chain each one's train -> accuracy calls until all are done."""
    env = _env(cfg)
    while todo or running:
        while todo and len(running) < cfg.parallel:
            job = todo.pop(0)
            job.dir.mkdir(parents=True, exist_ok=True)
            cmds = commands(cfg, job)
            log = open(job.dir / "log.txt", "a")
            print(f"[loso] start {job.name}", file=sys.stderr, flush=True)
            running.append((job, cmds[1:], subprocess.Popen(cmds[0], stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(2)
        for item in list(running):
            job, rest, proc, log = item
            rc = proc.poll()
            if rc is None:
                continue
            running.remove(item)
            if rc != 0:
                failed[job.name] = f"exit {rc} (see {job.dir / 'log.txt'})"
                log.close()
                print(f"[loso] FAILED {job.name}: exit {rc}", file=sys.stderr, flush=True)
                continue
            if proc.args[2] == "realtime.train":
                (job.dir / "done.json").write_text(json.dumps({"epochs": cfg.epochs}))
            if rest:
                running.append((job, rest[1:], subprocess.Popen(rest[0], stdout=log, stderr=subprocess.STDOUT,
                                                                env=env), log))
            else:
                log.close()
                print(f"[loso] done {job.name}", file=sys.stderr, flush=True)


def table(out: Path) -> Dict[str, object]:
    """{model: {recipe: {seq: mIoU, "mean": ...}}} from every ``acc.json`` under ``out``."""
    rows: Dict[str, Dict[str, Dict[str, float]]] = {}
    for acc in sorted(out.glob("*/*/*/acc.json")):
        model, recipe, seq = acc.parts[-4:-1]
        rows.setdefault(model, {}).setdefault(recipe, {})[seq] = float(json.loads(acc.read_text())["miou"])
    for recipes in rows.values():
        for scores in recipes.values():
            if all(s in scores for s in SEQUENCES):
                scores["mean"] = sum(scores[s] for s in SEQUENCES) / len(SEQUENCES)
    shipped = {}
    for model in rows:                    # the val figure the issue compares with (train + val weights, val = 0016E5)
        acc = RESULTS / f"accuracy_{model}_val.json"
        if acc.is_file():
            shipped[model] = float(json.loads(acc.read_text())["miou"])
    return {"rows": rows, "sequences": list(SEQUENCES), "out": str(out), "shipped_val": shipped}


def markdown(doc: Dict[str, object], note: str = "") -> str:
    lines = ["# Leave-one-sequence-out mIoU", "", note, "",
             "| model | recipe | " + " | ".join(f"held out {s}" for s in SEQUENCES) + " | mean | shipped weights, val |",
             "| --- | --- | " + " | ".join("---" for _ in SEQUENCES) + " | --- | --- |"]
    shipped = doc.get("shipped_val") or {}
    for model, recipes in doc["rows"].items():            # type: ignore[union-attr]
        for recipe, scores in recipes.items():
            cells = [f"{scores[s]:.3f}" if s in scores else "-" for s in (*SEQUENCES, "mean")]
            val = f"{shipped[model]:.3f}" if model in shipped else "-"    # type: ignore[index,operator]
            lines.append(f"| `{model}` | {recipe} | " + " | ".join(cells) + f" | {val} |")
    for name, why in (doc.get("failed") or {}).items():    # type: ignore[union-attr]
        lines.append(f"\n- failed: {name}: {why}")
    return "\n".join(lines).rstrip() + "\n"


def write(doc: Dict[str, object], cfg_out: Path, results: Optional[Path], note: str) -> None:
    cfg_out.mkdir(parents=True, exist_ok=True)
    doc = {**doc, "note": note}
    (cfg_out / "loso.json").write_text(json.dumps(doc, indent=2) + "\n")
    (cfg_out / "loso.md").write_text(markdown(doc, note))
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        for name in ("loso.json", "loso.md"):
            shutil.copyfile(cfg_out / name, results / name)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["ddrnet23_slim"])
    p.add_argument("--recipe", nargs="+", choices=sorted(RECIPES), default=["base", "capture"])
    p.add_argument("--sequence", nargs="+", choices=SEQUENCES, default=list(SEQUENCES), help="held-out drives")
    p.add_argument("--epochs", type=int, default=380)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--out", default="runs/loso")
    p.add_argument("--data")
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, help="CPU threads per run (default: cores / parallel)")
    p.add_argument("--cpu", action="store_true", help="the 2-core CPU recipe: half resolution, batch 8, no AMP")
    p.add_argument("--eval-size", help="score at HxW (default: the frames' own size)")
    p.add_argument("--train-arg", action="append", default=[], help="one more realtime.train argument (repeatable)")
    p.add_argument("--results", help="also copy the table here (e.g. benchmarks/results/loso)")
    p.add_argument("--note", default="", help="a line saying how and where it ran, written above the table")
    p.add_argument("--report", metavar="OUT", help="only build the table from OUT's finished runs")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    if a.report:
        doc = table(Path(a.report))
        write(doc, Path(a.report), Path(a.results) if a.results else None, a.note)
        print(markdown(doc, a.note))
        return 0
    if a.parallel < 1 or a.epochs < 1:
        print("error: --parallel and --epochs must be >= 1", file=sys.stderr)
        return 2
    cfg = LosoConfig(models=tuple(a.model), recipes=tuple(a.recipe), sequences=tuple(a.sequence), epochs=a.epochs,
                     eval_every=a.eval_every, out=Path(a.out), data=a.data, parallel=a.parallel, threads=a.threads,
                     train_args=(*(CPU_ARGS if a.cpu else ()), *a.train_arg), eval_size=a.eval_size,
                     results=Path(a.results) if a.results else None)
    try:
        doc = run_all(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write(doc, cfg.out, cfg.results, a.note)
    print(markdown(doc, a.note))
    return 1 if doc["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
