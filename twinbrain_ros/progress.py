"""Progress bars that suit where the output goes (tqdm).

On a terminal: a live tqdm bar. Anywhere else (a CI log, `> file`, a pipe): the same bar
written as one plain line every `interval_s` seconds (and at the end), never a stream of
carriage-return frames, so that a training log stays a few kilobytes, not megabytes.
"""

from __future__ import annotations

import sys

__all__ = ["progress_bar"]

LOG_INTERVAL_S = 10.0


class _Lines:
    """A file for tqdm that turns its carriage-return frames into whole lines."""

    def __init__(self, file):
        self.file = file
        self.last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line and line != self.last:
            self.last = line
            self.file.write(line + "\n")

    def flush(self) -> None:
        self.file.flush()


def progress_bar(total: int, desc: str, unit: str = "it", initial: int = 0, file=None,
                 disable: bool = False, interval_s: float = LOG_INTERVAL_S):
    """A tqdm bar on `file` (default stdout): live on a terminal, a line per interval elsewhere.

    Update the postfix with `set_postfix(..., refresh=False)`: a refreshing postfix would draw
    a frame at every step.
    """
    from tqdm import tqdm

    file = sys.stdout if file is None else file
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=file,
                    dynamic_ncols=True, disable=disable)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=_Lines(file),
                ncols=100, ascii=True, mininterval=interval_s, maxinterval=interval_s,
                disable=disable)
