"""What every frame source shares: the frame record, the error type, and the drop-oldest queue.

A source is an iterable of :class:`Frame` (RGB uint8, a timestamp in seconds, optional ground truth)
that can be closed. ``live`` sources (cameras, network streams, paced files) run on their own clock:
the reader keeps only the newest frames under overload and counts what it dropped. Non-live sources
(files, folders, datasets) are replayed frame-exactly: the reader blocks instead of dropping.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, TypeVar

import numpy as np


class SourceError(RuntimeError):
    """A source cannot be opened or read; the message is one line meant for the user."""


class SourceDied(SourceError):
    """A source failed after delivering some frames (camera unplugged, stream cut, corrupt tail)."""


@dataclass
class Frame:
    """One decoded frame. ``index`` counts frames the source delivered (0-based, gap-free)."""
    index: int
    image: np.ndarray                       # HxWx3 uint8 RGB
    timestamp: float                        # seconds on the source's clock (pts for video)
    gt_mask: Optional[np.ndarray] = None    # HxW bool: known adversarial-patch pixels (demo)
    label: Optional[np.ndarray] = None      # HxW int64 CamVid classes when known
    meta: Dict[str, Any] = field(default_factory=dict)


class Source:
    """Base class: iterate for frames; ``close`` releases devices/containers (idempotent)."""

    name: str = "source"
    live: bool = False
    fps: Optional[float] = None             # nominal rate, None when unknown
    length: Optional[int] = None            # frames, None when unknown or endless

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources; safe to call more than once."""

    def interrupt(self) -> None:
        """Ask an iterator blocked on another thread (a reconnect back-off) to end soon; thread-safe."""

    def drain_events(self) -> List[Dict[str, Any]]:
        """Source events since the last call (e.g. reconnects), as event records; thread-safe."""
        return []

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


T = TypeVar("T")


def call_interruptibly(fn: Callable[[], T], on_abandon: Callable[[T], None] = lambda _: None) -> T:
    """``fn()`` on a helper thread while the main thread stays responsive to Ctrl-C / SIGTERM.

    A blocking network open (FFmpeg) does not return to Python until its own timeout; run this way,
    a stop signal interrupts the wait at once: the open is abandoned, and whatever it still returns
    is handed to ``on_abandon`` (to close it). Off the main thread ``fn`` simply runs."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    box: Dict[str, Any] = {}
    abandoned = threading.Event()

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller below
            box["error"] = exc
        if abandoned.is_set() and "value" in box:
            on_abandon(box["value"])

    t = threading.Thread(target=work, name="source-open", daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.05)
    except BaseException:
        abandoned.set()
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


def check_rgb(image: np.ndarray, where: str) -> np.ndarray:
    """Return ``image`` if it is an HxWx3 uint8 frame of a usable size, else raise SourceError."""
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise SourceError(f"{where} is grayscale (1 channel); the models need RGB colour frames")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise SourceError(f"{where} has shape {image.shape}; expected an HxWx3 colour image")
    if image.shape[0] < 32 or image.shape[1] < 32:
        raise SourceError(f"{where} is only {image.shape[1]}x{image.shape[0]} pixels; need at least 32x32")
    if image.shape[2] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8:
        raise SourceError(f"{where} has {image.dtype} pixels; expected 8-bit colour")
    return np.ascontiguousarray(image)


class LatestQueue:
    """Bounded queue that never blocks the producer: when full, the OLDEST item is dropped and counted.

    That is the live-source policy: a slow consumer always gets the newest frames and latency stays
    bounded by ``maxsize`` frames instead of growing without limit.
    """

    def __init__(self, maxsize: int = 1) -> None:
        if maxsize < 1:
            raise ValueError("LatestQueue needs maxsize >= 1")
        self._q: "queue.Queue[Any]" = queue.Queue(maxsize)
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, item: Any, timeout: Optional[float] = None) -> None:
        """Insert ``item``, evicting the oldest frame when full. The end-of-stream marker ``None``
        never evicts a frame: it waits for room like a normal queue (raises queue.Full on timeout)."""
        if item is None:
            self._q.put(None, timeout=timeout)
            return
        with self._lock:
            while True:
                try:
                    self._q.put_nowait(item)
                    return
                except queue.Full:
                    try:
                        self._q.get_nowait()
                        self.dropped += 1
                    except queue.Empty:
                        continue

    def get(self, timeout: Optional[float] = None) -> Any:
        return self._q.get(timeout=timeout)

    def qsize(self) -> int:
        return self._q.qsize()


class BlockingQueue:
    """Bounded FIFO that blocks the producer (frame-exact replay); same interface as LatestQueue."""

    def __init__(self, maxsize: int = 4) -> None:
        self._q: "queue.Queue[Any]" = queue.Queue(maxsize)
        self.dropped = 0

    def put(self, item: Any, timeout: Optional[float] = None) -> None:
        self._q.put(item, timeout=timeout)

    def get(self, timeout: Optional[float] = None) -> Any:
        return self._q.get(timeout=timeout)

    def qsize(self) -> int:
        return self._q.qsize()


def make_queue(live: bool, maxsize: int) -> "LatestQueue | BlockingQueue":
    """Drop-oldest for live sources, blocking for replayed ones."""
    return LatestQueue(maxsize) if live else BlockingQueue(maxsize)
