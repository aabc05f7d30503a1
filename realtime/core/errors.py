"""Errors a user can fix, shared by every layer so each command reports them the same way."""
from __future__ import annotations


class DataNotFoundError(FileNotFoundError):
    """Raised when no CamVid directory can be found; the message names every place looked at."""


class UsageError(Exception):
    """A one-line problem with the arguments, model, calibration, source or engine (exit status 2)."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (for ``error: ...`` reports)."""
    return " ".join(str(exc).split())


__all__ = ["DataNotFoundError", "UsageError", "one_line"]
