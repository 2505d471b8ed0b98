"""One synchronised observation of a robot, as every policy driver hands it to the policy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Observation:
    """Camera frames, the proprioceptive state and the instruction, taken together."""

    images: list[np.ndarray]   # HxWx3 uint8 RGB, one per camera
    state: np.ndarray          # raw proprioceptive state (state_dim,), embodiment joint order
    instruction: str
