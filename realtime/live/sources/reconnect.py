"""Reconnect a live source (camera, RTSP/HTTP stream) with back-off when it drops mid-stream.

``Reconnecting(first, reopen, attempts)`` iterates ``first``; when it dies (``SourceDied``, or a
``SourceError`` from a reopened stream before its first frame) it waits ``backoff`` s (doubling up
to ``max_backoff``), calls ``reopen()`` and carries on, up to ``attempts`` tries per outage (the count
resets once frames flow again). Frame indices stay gap-free and timestamps keep growing across the
gap (the wall time of the outage is added); each outage becomes one ``reconnect`` event record
(``drain_events``) with the frame it resumed at, the gap in seconds, the attempts and the error. When
every attempt fails the source dies with a ``SourceDied`` naming the first error and the last. File
sources are never wrapped: a replay that breaks is truncated, not reconnectable.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional

from .base import Frame, Source, SourceDied, SourceError

DEFAULT_ATTEMPTS = 5


class Reconnecting(Source):
    live = True

    def __init__(self, first: Source, reopen: Callable[[], Source], attempts: int = DEFAULT_ATTEMPTS,
                 backoff: float = 0.5, max_backoff: float = 8.0) -> None:
        self._src: Optional[Source] = first
        self._reopen, self.attempts = reopen, int(attempts)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.name, self.fps, self.length = first.name, first.fps, None
        self._stop = threading.Event()
        self._events: Deque[Dict[str, Any]] = collections.deque()
        self.reconnects = 0

    def __iter__(self) -> Iterator[Frame]:
        k, offset, t0 = 0, 0.0, time.monotonic()
        while self._src is not None:
            try:
                for f in self._src:
                    f.index, f.timestamp = k, offset + f.timestamp
                    k += 1
                    yield f
                return                                   # the stream says it is complete (an HTTP file)
            except SourceDied as exc:
                error = str(exc)
            except SourceError as exc:
                if k == 0:
                    raise                                # never delivered a frame: a bad source, not a drop
                error = str(exc)
            t_drop = time.monotonic()
            self._src.close()
            self._src = self._reconnect(k, error, t_drop)
            if self._src is None:
                return                                   # stopped while waiting
            offset = time.monotonic() - t0
            self.fps = self._src.fps or self.fps

    def _reconnect(self, k: int, error: str, t_drop: float) -> Optional[Source]:
        last = error
        for attempt in range(1, self.attempts + 1):
            if self._stop.wait(min(self.backoff * 2 ** (attempt - 1), self.max_backoff)):
                return None
            try:
                src = self._reopen()
            except SourceError as exc:
                last = str(exc)
                continue
            self.reconnects += 1
            self._events.append({"type": "reconnect", "ok": True, "frame": k, "attempts": attempt,
                                 "gap_s": round(time.monotonic() - t_drop, 3), "error": error})
            return src
        self._events.append({"type": "reconnect", "ok": False, "frame": k, "attempts": self.attempts,
                             "gap_s": round(time.monotonic() - t_drop, 3), "error": error})
        raise SourceDied(f"{self.name} dropped after {k} frames ({error}); {self.attempts} reconnect "
                         f"attempts failed, last: {last}")

    def interrupt(self) -> None:
        self._stop.set()

    def drain_events(self) -> List[Dict[str, Any]]:
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    def close(self) -> None:
        self._stop.set()
        if self._src is not None:
            self._src.close()
            self._src = None
