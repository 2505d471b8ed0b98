"""Waiting on a condition, with a timeout and a failure message worth reading.

Every wait in the tests is one of these (or a `RobotSide.spin_until`, built on it): never a
sleep, never an assumption about the order in which messages arrive.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

LOG_TAIL_CHARS = 3000
POLL_S = 0.05  # how often a wait with nothing to spin looks again


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The end of a log file ("" when there is none yet)."""
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def wait_until(condition: Callable[[], object], timeout: float, what: str, *,
               step: Callable[[], None] | None = None, show: Callable[[], object] | None = None,
               watch=()) -> object:
    """Call `step` (or pause POLL_S) until `condition()` is truthy; return that value.

    Args:
        condition: what is waited for; its truthy result is returned.
        timeout: seconds before the wait fails.
        what: words for the failure message ("the first trajectory").
        step: one round of work between two looks (spinning an executor); None pauses.
        show: the value to report on failure (default: the condition's last result).
        watch: processes (`NodeProcess`, `ServerProcess`) whose death ends the wait at once
            and whose log tails go into the failure message.

    Raises:
        AssertionError: the timeout passed, or a watched process died, before the condition.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        dead = [p for p in watch if not p.alive() and not p.ended_on_purpose]
        if dead or time.monotonic() >= deadline:
            value = condition()  # what arrived meanwhile (a log's last line) still counts
            if value:
                return value
            reason = (f"{', '.join(p.name for p in dead)} exited (code "
                      f"{', '.join(str(p.returncode) for p in dead)})" if dead
                      else f"timed out after {timeout:g} s")
            raise AssertionError(failure_report(f"{reason} waiting for {what}",
                                                show() if show is not None else value, watch))
        if step is not None:
            step()
        else:
            time.sleep(POLL_S)  # the polling interval of this wait, not a synchronisation


def failure_report(headline: str, last_value, watch=()) -> str:
    """A wait's failure message: the headline, the last value seen, the watched logs' tails."""
    parts = [headline, f"last value seen: {_short(last_value)}"]
    for process in watch:
        parts.append(f"--- tail of {process.name}'s log ({process.log}) ---\n"
                     f"{log_tail(process.log)}")
    return "\n".join(parts)


def _short(value, chars: int = 2000) -> str:
    text = repr(value)
    return text if len(text) <= chars else text[:chars] + f"... ({len(text)} characters)"
