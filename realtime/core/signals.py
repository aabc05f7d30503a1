"""Stop signals (SIGINT, SIGTERM, SIGHUP) turned into one orderly stop, for the live commands.

Inside :func:`handled` the FIRST stop signal raises :class:`Interrupted` (a ``KeyboardInterrupt``
that knows its signal) in the main thread; every later one is only recorded, so a second Ctrl-C or a
``kill`` during clean-up can never cut an output file short. Inside :func:`deferred` (outputs being
finalised) even the first one is only recorded; the caller reads :func:`received` afterwards.
Standard library only: the CLI installs this before it imports torch.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

_received: List[int] = []
_state = {"defer": 0}


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; ``exit_code`` is the shell convention 128 + signal number."""

    def __init__(self, signum: int = int(signal.SIGINT)) -> None:
        super().__init__(signal_name(signum))
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def signum_of(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt (a plain one is SIGINT)."""
    return int(getattr(exc, "signum", signal.SIGINT))


def _handler(signum: int, _frame: Any) -> None:
    first = not _received
    _received.append(int(signum))
    if first and _state["defer"] == 0:
        raise Interrupted(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _install() -> Dict[int, Any]:
    return {s: signal.signal(s, _handler) for s in STOP_SIGNALS if signal.getsignal(s) is not _handler}


def _restore(previous: Dict[int, Any]) -> None:
    for s, h in previous.items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextmanager
def handled(restore: bool = True) -> Iterator[None]:
    """Stop signals raise :class:`Interrupted` once, then are recorded (main thread; else a no-op).

    ``restore=False`` (a command about to exit): afterwards signals stay recorded-only, so one that
    lands while the interpreter shuts down cannot print a traceback."""
    if not _main_thread():
        yield
        return
    _received.clear()
    previous = _install()
    try:
        yield
    finally:
        if restore:
            _restore(previous)
        else:
            _state["defer"] += 1
            # The interpreter's teardown resets Python-level handlers to the default action, so a signal
            # landing then (a second Ctrl-C) would kill the process after its outputs were finalised and
            # replace the exit status; handlers set to SIG_IGN are left alone by the teardown.
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_IGN)


@contextmanager
def deferred() -> Iterator[None]:
    """Record stop signals instead of raising them (outputs being finalised); nests."""
    previous = _install() if _main_thread() else {}
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1
        _restore(previous)


def mark() -> int:
    """A position in the record of received signals (see :func:`since`)."""
    return len(_received)


def since(position: int) -> List[int]:
    """Signals received after ``mark()`` returned ``position``."""
    return list(_received[position:])


__all__ = ["Interrupted", "STOP_SIGNALS", "deferred", "handled", "mark", "signal_name", "signum_of", "since"]
