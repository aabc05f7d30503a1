import av
import numpy as np
import pytest

from realtime import demo
from realtime.live.sinks.video import VideoWriter


def test_video_writer_round_trip_and_bad_frames(tmp_path):
    path = tmp_path / "v.mp4"
    with VideoWriter(path, fps=5) as w:
        for k in range(3):
            w.write(np.full((31, 40, 3), 60 * k, np.uint8))   # odd height is cropped to even
        with pytest.raises(ValueError, match="uint8"):
            w.write(np.zeros((31, 40, 3), np.float32))
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (30, 40, 3)
    assert abs(int(frames[2].mean()) - 120) < 6


def test_demo_writes_overlay_video(camvid_root, tmp_path):
    out = tmp_path / "demo.mp4"
    summary = demo.run(demo.parse_args(["--max-frames", "3", "--output", str(out), "--device", "cpu"]))
    assert summary["frames"] == 3 and summary["sequence_miou"] > 0.5
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 3
