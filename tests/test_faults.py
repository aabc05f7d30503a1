"""Fault injection on ``python -m realtime.run``: every case of the hostile-input audit (issue 17).

Fixtures are built here in tmp dirs: truncated MKV/WebM, broken calibrations (derived from the
shipped one, fingerprint kept), a malicious pickle, a local server that stalls, a local MJPEG server
that drops the connection and comes back, and stop signals sent to a subprocess. Each case checks
the exit status, the one ``error:`` line, and that the outputs are finalised and valid.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import http.server
from pathlib import Path
from typing import List, Optional, Tuple

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from realtime import run as cli
from realtime.core import signals
from realtime.live.sources import Reconnecting, open_source

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "calibration" / "shipped" / "ddrnet23_slim.safetensors"
TINY = ["--imgsz", "64x96", "--quiet"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity (what other JSON parsers do)."""
    def bad(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(text, parse_constant=bad)


def make_video(path: Path, n: int, hw=(48, 64), fps: int = 10, codec: Optional[str] = None) -> Path:
    rng = np.random.default_rng(0)
    c = av.open(str(path), "w")
    s = c.add_stream(codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4"), rate=fps)
    s.width, s.height, s.pix_fmt = hw[1], hw[0], "yuv420p"
    for _ in range(n):
        for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def count_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def frame_events(path: Path) -> List[dict]:
    return [e for e in map(strict_json, path.read_text().splitlines()) if e["type"] == "frame"]


def run_cli(capsys, argv: List[str]) -> Tuple[int, List[str], str]:
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.err.strip().splitlines(), cap.out


def one_error(capsys, argv: List[str], match: str, code: int = 2) -> None:
    rc, err, _ = run_cli(capsys, argv + TINY)
    assert rc == code and len(err) == 1 and err[0].startswith("error:") and match in err[0], (rc, err)
    assert not err[0].startswith("error: unexpected") and "Traceback" not in err[0]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("clip") / "in.mp4", 6)


# ------------------------------------------------------------------ arguments (cases 7, 8, 9, 6)


@pytest.mark.parametrize("argv,match", [
    (["--imgsz", "20000x20000"], "too large"),
    (["--timeout", "-1"], "--timeout must be a positive"),
    (["--fps", "0"], "--fps must be a positive"),
    (["--fps", "-10"], "--fps must be a positive"),
    (["--threshold", "nan"], "--threshold must be a finite"),
    (["--reconnect", "-2"], "--reconnect must be >= 0"),
])
def test_bad_arguments_are_refused_before_anything_opens(capsys, tmp_path, clip, argv, match):
    rc, err, _ = run_cli(capsys, ["--source", str(clip), "--output", str(tmp_path / "o.mp4"), "--quiet"] + argv)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and match in err[0], err
    assert not list(tmp_path.iterdir())                      # nothing written


# ------------------------------------------------------------------ outputs (cases 3, 10)


def test_output_never_overwrites_the_input_and_outputs_are_distinct(capsys, tmp_path, clip):
    src = tmp_path / "in.mp4"
    src.write_bytes(clip.read_bytes())
    before = src.read_bytes()
    base = ["--source", str(src), "--defense", "none"]
    one_error(capsys, base + ["--output", str(src)], "refusing to overwrite an input")
    one_error(capsys, base + ["--output", str(tmp_path / "o.mp4"), "--events", str(src)], "refusing to overwrite")
    one_error(capsys, base + ["--output", str(tmp_path / "o.mp4"), "--events", str(tmp_path / "o.mp4")],
              "--output and --events are the same file")
    one_error(capsys, base + ["--output", str(tmp_path / "o.mp4"), "--summary", str(tmp_path / "e.jsonl"),
                              "--events", str(tmp_path / "e.jsonl")], "are the same file")
    cal = tmp_path / "cal.safetensors"
    cal.write_bytes(SHIPPED.read_bytes())
    one_error(capsys, ["--source", str(src), "--calibration", str(cal), "--output", str(tmp_path / "o.mp4"),
                       "--summary", str(cal)], "is the calibration")
    assert src.read_bytes() == before and cal.read_bytes() == SHIPPED.read_bytes()


def test_unwritable_outputs_fail_before_the_first_frame(capsys, tmp_path, clip):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    base = ["--source", str(clip), "--defense", "none"]
    one_error(capsys, base + ["--output", str(tmp_path / "afile" / "o.mp4")], "is a file, not a directory")
    one_error(capsys, base + ["--output", str(tmp_path / "adir")], "is a directory")
    one_error(capsys, base + ["--output", str(tmp_path / "o.xyz")], "unsupported video extension")
    one_error(capsys, base + ["--output", "/dev/full"], "unsupported video extension")
    if os.path.exists("/dev/full"):
        ev = tmp_path / "ev.jsonl"
        one_error(capsys, base + ["--output", str(tmp_path / "o.mp4"), "--events", "/dev/full"], "--events /dev/full")
        one_error(capsys, base + ["--output", str(tmp_path / "o.mp4"), "--events", str(ev), "--summary", "/dev/full"],
                  "--summary /dev/full cannot be written")
        assert frame_events(ev) == []                        # found before any frame was processed
        assert not (tmp_path / "o.mp4").exists()             # no empty, unplayable video left behind


# ------------------------------------------------------------------ sources (case 4)


@pytest.mark.parametrize("ext,codec", [("mkv", "libx264"), ("webm", "libvpx")])
def test_truncated_mkv_and_webm_are_reported(capsys, tmp_path, ext, codec):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this FFmpeg")
    full = make_video(tmp_path / f"full.{ext}", 30, codec=codec)
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    rc, err, _ = run_cli(capsys, ["--source", str(full), "--defense", "none", "--output", str(tmp_path / "f.mp4")]
                         + TINY)
    assert rc == 0 and err == []                             # the whole file: no false alarm
    rc, err, _ = run_cli(capsys, ["--source", str(cut), "--defense", "none", "--output", str(tmp_path / "o.mp4")]
                         + TINY)
    assert rc == 3 and len(err) == 1 and "is truncated" in err[0] and "frames processed are saved" in err[0], err
    s = strict_json((tmp_path / "o.summary.json").read_text())
    assert 0 < s["frames"] < 30 and count_frames(tmp_path / "o.mp4") == s["frames"]


def test_a_file_source_never_reconnects(clip):
    src = open_source(str(clip))
    assert not isinstance(src, Reconnecting)
    src.close()


# ------------------------------------------------------------------ model and calibration (cases 5, 6, 11)


def _calibration(tmp_path: Path, name: str, header=None, tensors=None) -> Path:
    """The shipped artifact with its header or tensors changed (fingerprint kept: only the checks stop it)."""
    with safe_open(str(SHIPPED), framework="pt") as f:
        meta, ts = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    h = json.loads(meta["zmask"])
    h = header(h) if header else h
    ts = tensors(ts) if tensors else ts
    out = tmp_path / f"{name}.safetensors"
    save_file(ts, str(out), metadata={"zmask": json.dumps(h)})
    return out


def _set(key, value):
    def edit(h):
        h[key] = value
        return h
    return edit


def _wrong_shape(ts):
    k = next(k for k in ts if k.startswith("mu/"))
    ts[k] = ts[k][:-3].contiguous()
    ts["sigma/" + k[3:]] = ts["sigma/" + k[3:]][:-3].contiguous()
    return ts


@pytest.mark.skipif(not SHIPPED.is_file(), reason="shipped calibration missing")
@pytest.mark.parametrize("name,header,tensors,match", [
    ("shape", None, _wrong_shape, "do not fit the model's layers"),
    ("nan_lambda", _set("lambda0", float("nan")), None, "lambda0 must be a finite number"),
    ("null_header", lambda h: None, None, "not a JSON object"),
    ("abc_size", _set("input_size", "abc"), None, "input_size must be two integers"),
    ("huge_size", _set("input_size", [1000000, 1000000]), None, "out of range"),
    ("nan_sigma", None, lambda ts: {**ts, next(k for k in ts if k.startswith("sigma/")):
                                    torch.full_like(ts[next(k for k in ts if k.startswith("sigma/"))], float("nan"))},
     "NaN or infinite"),
])
def test_broken_calibrations_are_refused_at_load(capsys, tmp_path, clip, name, header, tensors, match):
    cal = _calibration(tmp_path, name, header, tensors)
    one_error(capsys, ["--source", str(clip), "--calibration", str(cal), "--output", str(tmp_path / "o.mp4")], match)
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("fail_closed", [False, True])
def test_a_defense_failing_at_run_time_is_in_the_summary(capsys, tmp_path, clip, monkeypatch, fail_closed):
    from realtime.defenses.zmask_defense import ZMaskDefense

    def broken(self, x, timer, prior=None):
        raise RuntimeError("injected: shapes disagree")
    monkeypatch.setattr(ZMaskDefense, "run", broken)
    out = tmp_path / "o.mp4"
    rc, err, stdout = run_cli(capsys, ["--source", str(clip), "--output", str(out)] + TINY
                              + (["--fail-closed"] if fail_closed else []))
    assert "WARNING: the defense failed on 6 of 6 frames" in stdout and "injected" in stdout
    s = strict_json((tmp_path / "o.summary.json").read_text())
    assert s["defense_errors"] == 6 and "injected" in s["defense_error"]
    if fail_closed:
        assert rc == 4 and s["unsafe_frames"] == 6 and len(err) == 1 and err[0].startswith("error: the defense failed")
    else:
        assert rc == 0 and "UNDEFENDED" in stdout


def test_malicious_and_mismatched_weights(capsys, tmp_path, clip):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    torch.save({"model": {"x": Evil()}}, tmp_path / "evil2.pt")
    base = ["--source", str(clip), "--defense", "none", "--output", str(tmp_path / "o.mp4")]
    for p in (bad, tmp_path / "evil2.pt"):
        rc, err, _ = run_cli(capsys, base + ["--weights", str(p)] + TINY)
        assert rc == 2 and len(err) == 1 and err[0].startswith("error:"), err
        assert "weights_only=False" not in err[0] and not err[0].startswith("error: unexpected")
    assert not (tmp_path / "pwned").exists()
    from realtime.models import build_model
    sd = build_model("bisenetv1", weights=None).state_dict()
    torch.save(sd, tmp_path / "other.pt")
    one_error(capsys, base + ["--weights", str(tmp_path / "other.pt")], "does not match")
    ddr = build_model("ddrnet23_slim", weights=None).state_dict()
    k = next(k for k, v in ddr.items() if v.ndim == 4)
    ddr[k] = torch.zeros(1, 1, 1, 1)
    torch.save(ddr, tmp_path / "shape.pt")
    one_error(capsys, base + ["--weights", str(tmp_path / "shape.pt")], "tensors have another shape")


# ------------------------------------------------------------------ signals (cases 1, 2)


def test_stop_signals_raise_once_then_are_recorded():
    with signals.handled():
        with pytest.raises(signals.Interrupted) as info:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.5)
        assert info.value.exit_code == 129
        os.kill(os.getpid(), signal.SIGTERM)                 # a second one: recorded, not raised
        time.sleep(0.1)
        assert signals.since(0) == [signal.SIGHUP, signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _spawn(argv: List[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "realtime.run"] + argv, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_events(ev: Path, n: int, p: subprocess.Popen, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and p.poll() is None:
        if ev.exists() and len(ev.read_text().splitlines()) >= n + 1:
            return
        time.sleep(0.1)


@pytest.mark.parametrize("sigs,code", [((signal.SIGTERM,), 143), ((signal.SIGINT, signal.SIGINT), 130)])
def test_signal_mid_run_finalises_every_output(tmp_path, sigs, code):
    src = make_video(tmp_path / "long.mp4", 300, fps=5)
    out, ev, sm = tmp_path / "o.mp4", tmp_path / "o.jsonl", tmp_path / "o.json"
    p = _spawn(["--source", str(src), "--realtime", "--defense", "none", "--output", str(out), "--events", str(ev),
                "--summary", str(sm)] + TINY)
    try:
        _wait_events(ev, 4, p)
        for s in sigs:                                         # two Ctrl-C 0.15 s apart
            p.send_signal(s)
            time.sleep(0.15)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == code and "Traceback" not in err and "interrupted" in err, err
    n = len(frame_events(ev))
    s = strict_json(sm.read_text())
    assert 4 <= n < 300 and s["frames"] == n and count_frames(out) == n
    assert s["status"] == "interrupted" and s["stopped"] == signal.Signals(sigs[0]).name


def test_ctrl_c_during_start_up_is_one_line(tmp_path, clip):
    p = _spawn(["--source", str(clip), "--output", str(tmp_path / "o.mp4")] + TINY)
    time.sleep(1.0)                                            # still importing torch and the model
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted")


class StallingServer:
    """Accepts TCP connections and never answers (a hung camera or proxy)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


def test_stalled_server_times_out_and_ctrl_c_interrupts_the_open(capsys, tmp_path):
    srv = StallingServer()
    url = f"http://127.0.0.1:{srv.port}/live.mjpg"
    try:
        t0 = time.monotonic()
        one_error(capsys, ["--source", url, "--timeout", "1", "--defense", "none", "--output",
                           str(tmp_path / "o.mp4")], "cannot open stream")
        assert time.monotonic() - t0 < 20
        p = _spawn(["--source", url, "--timeout", "120", "--defense", "none", "--output", str(tmp_path / "o.mp4")]
                   + TINY)
        seen, deadline = len(srv.conns), time.monotonic() + 60
        while len(srv.conns) == seen and time.monotonic() < deadline:    # the subprocess is opening the stream
            time.sleep(0.1)
        t1 = time.monotonic()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 130 and time.monotonic() - t1 < 5 and "Traceback" not in err, err
    finally:
        srv.close()


# ------------------------------------------------------------------ reconnect (live sources)


def _jpeg(k: int) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), (k * 9) % 250, np.uint8)).save(b, "JPEG")
    return b.getvalue()


class MJPEGServer:
    """An MJPEG camera over HTTP whose ``plan`` says, per connection, how many frames it sends before
    cutting the connection (0: refuse at once, as while the camera reboots); after the plan, nothing."""

    def __init__(self, plan: List[int], fps: float = 25.0) -> None:
        self.plan, self.requests = list(plan), 0
        frames = [_jpeg(k) for k in range(16)]
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                n = server.plan[server.requests] if server.requests < len(server.plan) else 0
                server.requests += 1
                if n == 0:
                    self.send_error(503, "camera restarting")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace;boundary=frame")
                self.end_headers()
                try:
                    for k in range(n):
                        j = frames[k % len(frames)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(j) + j + b"\r\n")
                        self.wfile.flush()
                        time.sleep(1.0 / fps)
                except OSError:
                    pass
                self.close_connection = True          # the drop: the connection is cut mid-stream

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cam.mjpg"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_live_stream_reconnects_after_a_drop(capsys, tmp_path):
    srv = MJPEGServer([12, 0, 200])      # 12 frames, cut; down for one attempt; back
    try:
        out, ev = tmp_path / "o.mp4", tmp_path / "o.jsonl"
        rc, err, stdout = run_cli(capsys, ["--source", srv.url, "--defense", "none", "--max-frames", "30",
                                           "--output", str(out), "--events", str(ev), "--timeout", "5"] + TINY)
    finally:
        srv.close()
    assert rc == 0 and err == [], err
    lines = [strict_json(x) for x in ev.read_text().splitlines()]
    rec = [e for e in lines if e["type"] == "reconnect"]
    assert len(rec) == 1 and rec[0]["ok"] and rec[0]["attempts"] == 2 and rec[0]["gap_s"] > 0.4, rec
    frames = [e for e in lines if e["type"] == "frame"]
    assert len(frames) == 30 and count_frames(out) == 30
    ts = [e["timestamp"] for e in frames]
    assert ts == sorted(ts)                                    # time keeps going across the gap
    s = strict_json((tmp_path / "o.summary.json").read_text())
    assert s["status"] == "complete" and len(s["reconnects"]) == 1 and "1 reconnects" in stdout


def test_live_stream_that_stays_down_dies_after_the_attempts(capsys, tmp_path):
    srv = MJPEGServer([10])              # 10 frames, then refuses every reconnect
    try:
        rc, err, _ = run_cli(capsys, ["--source", srv.url, "--defense", "none", "--reconnect", "2", "--output",
                                      str(tmp_path / "o.mp4"), "--timeout", "5"] + TINY)
    finally:
        srv.close()
    assert rc == 3 and len(err) == 1 and "2 reconnect attempts failed" in err[0], err
    s = strict_json((tmp_path / "o.summary.json").read_text())
    assert s["frames"] > 0 and s["reconnects"][-1]["ok"] is False and count_frames(tmp_path / "o.mp4") == s["frames"]
