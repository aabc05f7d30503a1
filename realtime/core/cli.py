"""What every command-line entry point shares: user errors as one line + exit code 2, JSON output."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Tuple

from realtime.core.errors import DataNotFoundError

# Failures a user can fix (bad path, unknown name, mismatched artifact): reported without a traceback.
USER_ERRORS = (DataNotFoundError, FileNotFoundError, KeyError, ValueError, RuntimeError)


def parse_hw(text: str, minimum: int = 1) -> Tuple[int, int]:
    """'360x480' -> (360, 480); ValueError naming the expected form, or the minimum side."""
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"expected HxW such as 360x480, got {text!r}") from None
    if h < minimum or w < minimum:
        raise ValueError(f"{text} is too small (need at least {minimum}x{minimum})")
    return h, w


def report_error(exc: BaseException) -> int:
    """Print ``error: <message>`` to stderr and return the exit code for user errors (2)."""
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc   # KeyError's str() adds quotes
    print(f"error: {msg}", file=sys.stderr)
    return 2


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def run_job(job: Callable[[Any], Any], args: Any) -> int:
    """``job(args)``; print its result as JSON and return 0, or report a user error and return 2."""
    try:
        result = job(args)
    except USER_ERRORS as exc:
        return report_error(exc)
    print(json.dumps(result, indent=2))
    return 0
