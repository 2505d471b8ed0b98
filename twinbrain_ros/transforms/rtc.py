"""Real-time chunking's inputs, in NumPy only (the robot side builds them without torch).

The previous plan's overlap with the next chunk (`ChunkPrefix`) and the inpainting weights over
it (`rtc_weights`); `FlowMatchingActionExpert.integrate` does the inpainting itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["RTC_SCHEDULES", "ChunkPrefix", "rtc_weights"]

RTC_SCHEDULES = ("exp", "linear", "hard")


def rtc_weights(horizon: int, frozen: int, overlap: int, schedule: str = "exp") -> np.ndarray:
    """(horizon,) inpainting weights of real-time chunking.

    Args:
        horizon: actions per chunk.
        frozen: leading actions that execute while the chunk is computed: weight 1, reproduced
            exactly.
        overlap: leading actions the previous plan covers (``>= frozen``); weight 0 after it.
        schedule: the weights between the frozen prefix and the end of the overlap:
            ``exp`` (the paper's soft mask: ``c (e^c - 1) / (e - 1)`` with ``c`` falling
            linearly over the n unfrozen actions of the overlap, from ``n / (n + 1)`` to
            ``1 / (n + 1)``), ``linear`` (``c`` itself) or ``hard`` (0: only the frozen prefix
            is inpainted).
    """
    if schedule not in RTC_SCHEDULES:
        raise ValueError(f"rtc schedule must be one of {RTC_SCHEDULES}, got {schedule!r}")
    overlap = max(0, min(int(overlap), horizon))
    frozen = max(0, min(int(frozen), overlap))
    weights = np.zeros(horizon, dtype=np.float32)
    weights[:frozen] = 1.0
    ramp = np.arange(frozen, overlap)
    if len(ramp) and schedule != "hard":
        c = (overlap - ramp) / (overlap - frozen + 1.0)
        weights[ramp] = c * np.expm1(c) / math.expm1(1.0) if schedule == "exp" else c
    return weights


@dataclass
class ChunkPrefix:
    """The previous plan's part that overlaps the next chunk, for real-time chunking.

    Attributes:
        actions: (K, action_dim) the previous plan from the new chunk's first action on, in the
            embodiment's raw action units (K <= horizon: the overlap).
        frozen: how many of them execute while the chunk is computed (reproduced exactly).
        schedule: the guidance weights over the rest of the overlap (see `rtc_weights`).
    """

    actions: np.ndarray
    frozen: int
    schedule: str = "exp"

    def __post_init__(self):
        """Check the arrays and the schedule."""
        self.actions = np.asarray(self.actions, dtype=np.float32)
        if self.actions.ndim != 2 or len(self.actions) == 0:
            raise ValueError(f"prefix actions must be (K>0, action_dim), got "
                             f"{self.actions.shape}")
        if not np.isfinite(self.actions).all():
            raise ValueError("prefix actions contain non-finite values")
        if self.schedule not in RTC_SCHEDULES:
            raise ValueError(f"rtc schedule must be one of {RTC_SCHEDULES}, got "
                             f"{self.schedule!r}")
        self.frozen = max(0, min(int(self.frozen), len(self.actions)))
