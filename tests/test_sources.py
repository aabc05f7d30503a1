"""Every source kind on synthetic inputs made here, the overload queue, and each source error."""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from realtime.live.sources import (CameraSource, CamVidSource, ImageFolderSource, LatestQueue, Reconnecting,
                              SourceDied, SourceError, SourceOptions, VideoSource, open_source, source_kind)
from realtime.live.sources import camera as camera_mod


def make_video(path: Path, n: int = 12, fps: int = 10, hw=(48, 64), faststart: bool = False,
               noise: bool = False) -> np.ndarray:
    """Write ``n`` frames whose mean brightness encodes the index (``noise``: random texture, so the
    bytes spread evenly over the frames); returns the frames."""
    frames = np.stack([np.full((*hw, 3), (10 + 15 * k) % 240, np.uint8) for k in range(n)])
    frames[:, :8, :8] = 255                                           # some texture for the encoder
    if noise:
        frames = np.random.default_rng(0).integers(0, 256, frames.shape, dtype=np.uint8)
    c = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})
    s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
    s.width, s.height, s.pix_fmt = hw[1], hw[0], "yuv420p"
    for f in frames:
        for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return frames


def save_png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path)


def test_source_kind_parsing(tmp_path):
    (tmp_path / "d").mkdir()
    assert source_kind("camera0") == source_kind("0") == source_kind("cam2") == "camera"
    assert source_kind("rtsp://h/x") == source_kind("http://h/v.mp4") == "url"
    assert source_kind("camvid:0016E5@val") == "camvid"
    assert source_kind("demo") == source_kind("demo:0006R0") == "demo"
    assert source_kind(str(tmp_path / "d")) == source_kind(str(tmp_path / "*.png")) == "images"
    assert source_kind(str(tmp_path / "v.mp4")) == "video"


def test_video_file_is_frame_exact_with_timestamps(tmp_path):
    ref = make_video(tmp_path / "v.mp4", n=12, fps=10)
    src = open_source(str(tmp_path / "v.mp4"))
    assert isinstance(src, VideoSource) and not src.live and src.fps == pytest.approx(10)
    frames = list(src)
    src.close()
    assert [f.index for f in frames] == list(range(12)) and src.length == 12
    assert [f.timestamp for f in frames] == pytest.approx([k / 10 for k in range(12)], abs=1e-6)
    means = [float(f.image[8:, 8:].mean()) for f in frames]
    assert means == pytest.approx([float(r[8:, 8:].mean()) for r in ref], abs=4)   # order and content
    assert frames[0].image.shape == (48, 64, 3) and frames[0].image.dtype == np.uint8


def test_video_served_over_http(tmp_path):
    make_video(tmp_path / "v.mp4", n=6)
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        src = open_source(f"http://127.0.0.1:{server.server_address[1]}/v.mp4")
        assert src.live
        assert len(list(src)) == 6                 # an HTTP file ends normally (not a dead stream)
        src.close()
    finally:
        server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_unreachable_url_is_a_clear_error():
    with pytest.raises(SourceError, match="cannot open stream rtsp://127.0.0.1:9/"):
        open_source("rtsp://127.0.0.1:9/live", )


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"not a video at all\n" * 50, "cannot open video")])
def test_zero_byte_and_garbage_video(tmp_path, content, match):
    p = tmp_path / "bad.mp4"
    p.write_bytes(content)
    with pytest.raises(SourceError, match=match):
        open_source(str(p))


def test_truncated_video_without_index_is_rejected(tmp_path):
    make_video(tmp_path / "v.mp4", n=20)
    data = (tmp_path / "v.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])       # index (moov) at the end is lost
    with pytest.raises(SourceError, match="truncated or not a video"):
        open_source(str(tmp_path / "cut.mp4"))


def test_video_dying_mid_stream_delivers_what_decodes(tmp_path):
    make_video(tmp_path / "v.mp4", n=40, faststart=True, noise=True)
    data = (tmp_path / "v.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])       # index first, data cut in half
    src = open_source(str(tmp_path / "cut.mp4"))
    got = []
    with pytest.raises(SourceDied, match="cut.mp4"):
        for f in src:
            got.append(f.index)
    assert 0 < len(got) < 40 and got == list(range(len(got)))


def test_image_folder_natural_order_and_glob(tmp_path):
    for k in (10, 2, 1):
        save_png(tmp_path / f"f{k}.png", np.full((40, 48, 3), k * 20, np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    src = open_source(str(tmp_path), )
    assert isinstance(src, ImageFolderSource)
    frames = list(src)
    assert [int(f.image.mean()) for f in frames] == [20, 40, 200]
    assert [f.meta["file"] for f in frames] == ["f1.png", "f2.png", "f10.png"]
    assert frames[1].timestamp == pytest.approx(0.1)
    assert [f.meta["file"] for f in open_source(str(tmp_path / "f1*.png"))] == ["f1.png", "f10.png"]
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    save_png(rgba / "a.png", np.full((40, 48, 4), 90, np.uint8))
    assert next(iter(open_source(str(rgba)))).image.shape == (40, 48, 3)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path / "empty"))
    gray = tmp_path / "gray"
    gray.mkdir()
    save_png(gray / "a.png", np.zeros((40, 48, 3), np.uint8))
    save_png(gray / "b.png", np.zeros((40, 48), np.uint8))
    with pytest.raises(SourceError, match="b.png .*grayscale"):
        open_source(str(gray))
    odd = tmp_path / "odd"
    odd.mkdir()
    save_png(odd / "a.png", np.zeros((40, 48, 3), np.uint8))
    save_png(odd / "b.png", np.zeros((41, 48, 3), np.uint8))
    with pytest.raises(SourceError, match="48x41 but a.png is 48x40"):
        open_source(str(odd))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(SourceError, match="cannot read image"):
        open_source(str(broken))
    with pytest.raises(SourceError, match="not found"):
        open_source(str(tmp_path / "nowhere.mp4"))


class _FakeCapture:
    """Stands in for cv2.VideoCapture: 5 BGR frames, then the camera 'unplugs'."""

    def __init__(self, index: int) -> None:
        self.k = 0

    def isOpened(self) -> bool:
        return True

    def get(self, prop: int) -> float:
        return 30.0

    def set(self, prop: int, value: float) -> bool:
        return True

    def read(self):
        self.k += 1
        if self.k > 5:
            return False, None
        bgr = np.zeros((40, 48, 3), np.uint8)
        bgr[..., 0] = 200                                  # blue in BGR
        return True, bgr

    def release(self) -> None:
        pass


def test_camera_source_with_a_fake_device(monkeypatch):
    monkeypatch.setattr(camera_mod.os.path, "exists", lambda p: True)
    monkeypatch.setattr(camera_mod.cv2, "VideoCapture", _FakeCapture)
    src = open_source("camera3", SourceOptions(reconnect=0))       # no reconnect: the unplug ends it
    assert isinstance(src, CameraSource) and src.live and src.fps == 30.0
    got = []
    with pytest.raises(SourceDied, match="camera3 stopped delivering frames after 5"):
        for f in src:
            got.append(f)
    assert len(got) == 5 and got[0].image[0, 0].tolist() == [0, 0, 200]       # converted to RGB
    assert all(b.timestamp >= a.timestamp for a, b in zip(got, got[1:]))


def test_camera_reconnects_after_an_unplug(monkeypatch):
    monkeypatch.setattr(camera_mod.os.path, "exists", lambda p: True)
    monkeypatch.setattr(camera_mod.cv2, "VideoCapture", _FakeCapture)
    src = open_source("camera3")                                      # live: reconnects by default
    assert isinstance(src, Reconnecting) and src.live
    got = []
    for f in src:
        got.append(f)
        if len(got) == 8:
            break
    events = src.drain_events()
    src.close()
    assert [f.index for f in got] == list(range(8))                  # gap-free across the reconnect
    assert len(events) == 1 and events[0]["ok"] and events[0]["frame"] == 5 and events[0]["gap_s"] >= 0.4
    assert got[5].timestamp >= got[4].timestamp + 0.4                 # the outage shows in the timestamps


def test_missing_camera():
    with pytest.raises(SourceError, match="camera 97"):
        open_source("camera97")


def test_latest_queue_drops_oldest_and_keeps_the_end_marker():
    q = LatestQueue(2)
    for k in range(10):
        q.put(k)
    assert q.dropped == 8 and [q.get(), q.get()] == [8, 9]
    q.put(1)
    q.put(2)
    with pytest.raises(Exception):
        q.put(None, timeout=0.01)                        # the end marker waits, never evicts a frame
    assert q.dropped == 0 + 8 and q.get() == 1


def _tiny_camvid(root: Path) -> Path:
    for split, names in {"val": ["SeqV_00020", "SeqV_00010", "SeqV_00030"], "train": ["SeqT_00001"]}.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for k, n in enumerate(names):
            save_png(root / split / f"{n}.png", np.full((40, 48, 3), 50 + k, np.uint8))
            save_png(root / f"{split}annot" / f"{n}.png", np.full((40, 48), 3, np.uint8))
    return root


def test_camvid_sequence_source(tmp_path):
    root = _tiny_camvid(tmp_path / "camvid")
    src = open_source("camvid:SeqV", _opts(root))
    assert isinstance(src, CamVidSource) and src.fps == pytest.approx(3.0)   # frames 10 apart at 30 fps
    frames = list(src)
    assert [f.meta["camvid_frame"] for f in frames] == [10, 20, 30]
    assert [f.timestamp for f in frames] == pytest.approx([0, 1 / 3, 2 / 3])
    assert frames[0].label.shape == (40, 48) and frames[0].gt_mask.shape == (40, 48)
    assert not any(f.gt_mask.any() for f in frames)                     # known clean
    assert len(list(open_source("camvid:SeqT@train", _opts(root)))) == 1
    with pytest.raises(SourceError, match="SeqX.*available: SeqV@val"):
        open_source("camvid:SeqX", _opts(root))


def _opts(root: Path):
    from realtime.live.sources import SourceOptions
    return SourceOptions(data=str(root))


def test_demo_source_composites_a_moving_patch(camvid_root):
    from realtime.live.sources.demo import DemoConfig, DemoSource
    src = DemoSource(DemoConfig(patch_start=3, patch_frames=6))
    frames = []
    clean = {f: img for f, img, _ in src.view}
    for f in src:
        frames.append(f)
        if f.index == 11:
            break
    assert all(not f.gt_mask.any() for f in frames[:3] + frames[9:])
    assert all(f.gt_mask.mean() > 0.03 for f in frames[3:9])               # a sizeable poster
    for f in frames:
        changed = (f.image != clean[f.meta["camvid_frame"]]).any(-1)
        assert not (changed & ~f.gt_mask).any()                           # only patch pixels change
        assert changed.sum() >= 0.8 * f.gt_mask.sum()
    quads = [q for q in src.quads[3:9] if q is not None]
    steps = [np.abs(b - a).max() for a, b in zip(quads, quads[1:])]
    assert len(quads) == 6 and max(steps) < 40                            # moves smoothly with the facade
