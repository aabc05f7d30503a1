"""Optional on-screen window (``--show``): opened only when a display exists, never fatal.

Headless machines (no ``DISPLAY``/``WAYLAND_DISPLAY``) and OpenCV builds without a GUI backend
(opencv-python-headless) get a one-line notice instead of a window.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

import cv2
import numpy as np


def display_available(env: Optional[Mapping[str, str]] = None) -> bool:
    """True when an X11 or Wayland display is advertised in the environment."""
    env = os.environ if env is None else env
    return bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


class Display:
    """A cv2 window showing annotated frames; pressing q or Esc asks the run to stop."""

    def __init__(self, title: str) -> None:
        self.title = title
        cv2.namedWindow(title, cv2.WINDOW_NORMAL)      # raises cv2.error on headless builds
        self.quit_requested = False

    def show(self, rgb: np.ndarray) -> None:
        cv2.imshow(self.title, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
            self.quit_requested = True

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
        except cv2.error:
            pass


def open_display(title: str, notice: Callable[[str], None],
                 env: Optional[Mapping[str, str]] = None) -> Optional[Display]:
    """A Display, or None after printing one notice line saying why there is no window."""
    if not display_available(env):
        notice("--show: no display found (DISPLAY/WAYLAND_DISPLAY unset); continuing without a window")
        return None
    try:
        return Display(title)
    except cv2.error:
        notice("--show: this OpenCV build has no GUI support (opencv-python-headless); "
               "continuing without a window")
        return None
