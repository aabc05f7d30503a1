"""Video files and network streams (RTSP/HTTP/...) decoded with PyAV, frames stamped with their pts.

Files are replayed frame-exactly. A file whose header promises more frames than could be decoded (MP4)
or a longer duration than the decoded frames cover (MKV/WebM, whose headers carry no frame count) is
reported as truncated (after the frames that did decode were delivered), so a corrupt tail never
passes silently. Network URLs are live: open/read timeouts make an unreachable or stalled stream a
clear error instead of a hang, and the open itself gives way to Ctrl-C at once. A live stream that
ends without a known length (MJPEG, MPEG-TS, RTSP) has dropped (``SourceDied``: the reconnect wrapper
takes it from there); an HTTP file that arrives whole ends normally.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Optional

import av

from .base import Frame, Source, SourceDied, SourceError, call_interruptibly, check_rgb

URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")


def is_url(spec: str) -> bool:
    return spec.lower().startswith(URL_SCHEMES)


def _reason(exc: BaseException) -> str:
    """FFmpeg's error text without PyAV's '[Errno N]' prefix and the repeated file name."""
    msg = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(msg).split())


class VideoSource(Source):
    """One video stream of a file or URL; ``timeout`` (s) bounds opening and each network read."""

    def __init__(self, spec: str, timeout: float = 10.0) -> None:
        self.spec = spec
        self.live = is_url(spec)
        self.name = spec if self.live else Path(spec).name
        options = {}
        if self.live:
            if spec.lower().startswith("rtsp"):
                options["rtsp_transport"] = "tcp"
        else:
            p = Path(spec)
            if not p.exists():
                raise SourceError(f"video file {spec} not found")
            if p.is_dir():
                raise SourceError(f"{spec} is a directory, not a video file")
            if p.stat().st_size == 0:
                raise SourceError(f"video file {spec} is empty (0 bytes)")
        def open_it() -> "av.container.InputContainer":
            return av.open(spec, mode="r", options=options, timeout=(timeout, timeout))

        t0 = time.monotonic()
        try:
            self._container = call_interruptibly(open_it, lambda c: c.close()) if self.live else open_it()
        except av.FFmpegError as exc:
            if self.live and time.monotonic() - t0 >= 0.9 * timeout:
                raise SourceError(f"cannot open stream {spec}: no answer within {timeout:g} s (--timeout)") from None
            what = "stream" if self.live else "video file"
            hint = " (unreachable, refused or timed out)" if self.live else " (truncated or not a video?)"
            raise SourceError(f"cannot open {what} {spec}: {_reason(exc)}{hint}") from None
        except OSError as exc:
            raise SourceError(f"cannot open {spec}: {_reason(exc)}") from None
        if not self._container.streams.video:
            self._container.close()
            raise SourceError(f"{spec} has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else None
        declared = int(self._stream.frames or 0)
        self.declared_frames = declared
        self.length = None if self.live or declared <= 0 else declared
        dur = self._container.duration          # microseconds (AV_TIME_BASE), MKV/WebM carry it
        start = self._container.start_time or 0
        self.end_s = (start + dur) / 1e6 if dur and dur > 0 else None
        self._opened = True

    def __iter__(self) -> Iterator[Frame]:
        if not self._opened:
            raise SourceError(f"{self.name} is closed")
        k = 0
        t_first: Optional[float] = None
        t = 0.0
        try:
            for frame in self._container.decode(self._stream):
                img = check_rgb(frame.to_ndarray(format="rgb24"), f"{self.name} frame {k}")
                t = frame.time
                if t is None:
                    t = k / self.fps if self.fps else float(k)
                if t_first is None:
                    t_first = t
                yield Frame(index=k, image=img, timestamp=float(t - t_first), meta={"pts": frame.pts})
                k += 1
        except av.FFmpegError as exc:
            if k == 0:
                raise SourceError(f"cannot decode {self.name}: {_reason(exc)}") from None
            raise SourceDied(f"{self.name} failed after {k} frames: {_reason(exc)}") from None
        if k == 0:
            raise SourceError(f"{self.name} contains no decodable video frames")
        if self.declared_frames:
            if k < self.declared_frames:
                what = "stream" if self.live else "video"
                raise SourceDied(f"{what} {self.name} is truncated: decoded {k} of {self.declared_frames} frames")
            return
        if self.end_s is not None:
            step = 1.0 / self.fps if self.fps else 0.0
            covered = float(t) + step                      # the last frame lasts one frame interval
            if covered < self.end_s - max(1.5 * step, 0.02 * self.end_s):
                raise SourceDied(f"{self.name} is truncated: decoded {k} frames covering {covered:.2f} s of the "
                                 f"{self.end_s:.2f} s its header declares")
            return
        if self.live:
            raise SourceDied(f"stream {self.name} ended after {k} frames")

    def close(self) -> None:
        if self._opened:
            self._container.close()
            self._opened = False
