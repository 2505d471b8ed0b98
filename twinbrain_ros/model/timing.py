"""Per-stage wall-clock timing of inference, synchronising CUDA only when asked to time."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch


class StageTimer:
    """Records the duration of named stages; use as `with timer("vision"): ...`.

    On CUDA each stage boundary synchronises the device so that the time belongs to the stage
    that launched the work; this costs a little, so pass a timer only when measuring.
    """

    def __init__(self, device: torch.device | str | None = None):
        """Time stages on `device` (CUDA devices are synchronised at stage boundaries)."""
        self.sync = torch.device(device).type == "cuda" if device is not None else False
        self.samples: dict[str, list[float]] = defaultdict(list)
        self._name = None

    def __call__(self, name: str) -> StageTimer:
        """Name the next stage."""
        self._name = name
        return self

    def __enter__(self) -> StageTimer:
        """Start the named stage."""
        if self.sync:
            torch.cuda.synchronize()
        self._stack = getattr(self, "_stack", [])
        self._stack.append((self._name, time.perf_counter()))
        return self

    def __exit__(self, *exc) -> bool:
        """Stop the innermost stage and record its duration in seconds."""
        if self.sync:
            torch.cuda.synchronize()
        name, start = self._stack.pop()
        self.samples[name].append(time.perf_counter() - start)
        return False

    def medians_ms(self) -> dict[str, float]:
        """Median duration of each stage in milliseconds."""
        return {name: 1000.0 * statistics.median(v) for name, v in self.samples.items()}


class NullTimer:
    """A timer that records nothing (the default where no timer is passed)."""

    def __call__(self, name: str) -> NullTimer:
        """Ignore the stage name."""
        return self

    def __enter__(self) -> NullTimer:
        """Nothing to start."""
        return self

    def __exit__(self, *exc) -> bool:
        """Nothing to record."""
        return False


NULL_TIMER = NullTimer()
