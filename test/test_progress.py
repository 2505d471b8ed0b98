"""Progress output: a live bar on a terminal, a few plain lines anywhere else."""

from __future__ import annotations

import io
import time

from twinbrain_ros.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(out, steps: int = 2000, interval_s: float = 0.05):
    bar = progress_bar(steps, "train", unit="step", file=out, interval_s=interval_s)
    started = time.monotonic()
    for k in range(steps):
        bar.update(1)
        bar.set_postfix(loss=f"{1.0 / (k + 1):.4f}", refresh=False)
        if k % 100 == 0:
            time.sleep(0.01)  # work between steps (the bar reports on the wall clock), no sync
    bar.close()
    return out.getvalue(), time.monotonic() - started


def test_a_log_file_gets_a_line_per_interval_not_a_frame_per_step():
    text, seconds = _run(io.StringIO())
    lines = text.splitlines()
    assert "\r" not in text
    # About one line per interval plus the last one, not one per step.
    assert 2 <= len(lines) <= seconds / 0.05 + 3, len(lines)
    assert lines[-1].startswith("train: 100%") and "2000/2000" in lines[-1]
    assert "loss=" in lines[-1]


def test_a_terminal_gets_the_live_bar():
    text, _ = _run(Terminal())
    assert "\r" in text and "2000/2000" in text
