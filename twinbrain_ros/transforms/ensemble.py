"""Adaptive action ensembling (CogACT's, used by starVLA's SimplerEnv WidowX protocol).

The policy is queried every control step and predicts a chunk. The action executed at a step is
the weighted mean of what each of the last `horizon` chunks predicted for that step (the chunk
from k steps ago contributes its action k), weighted by `exp(alpha * cos)`, where `cos` is the
cosine similarity of that prediction with the newest chunk's first action. With one step
between predictions this smooths the motion without lag: predictions that agree with the newest
one count more.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class AdaptiveEnsembler:
    """The ensembled action of each step, from the chunks predicted at the last steps."""

    def __init__(self, horizon: int = 7, alpha: float = 0.1):
        """`horizon`: how many chunks (one per step) take part; `alpha`: weight sharpness."""
        if int(horizon) < 1:
            raise ValueError(f"ensemble horizon must be at least 1, got {horizon}")
        self.horizon = int(horizon)
        self.alpha = float(alpha)
        self.history: deque[np.ndarray] = deque(maxlen=self.horizon)

    def reset(self) -> None:
        """Forget the earlier chunks (a new episode or instruction, a hold)."""
        self.history.clear()

    def add(self, chunk: np.ndarray) -> np.ndarray:
        """Take the newest (H, D) chunk; return the (D,) action to execute now.

        A chunk shorter than the history it is combined with leaves the oldest out.
        """
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim == 1:
            chunk = chunk[None]
        self.history.append(chunk)
        count = len(self.history)
        ages = range(count - 1, -1, -1)  # the oldest chunk first
        predictions = np.stack([pred[k] for k, pred in zip(ages, self.history, strict=True)
                                if k < len(pred)])
        newest = predictions[-1]
        cos = predictions @ newest / (np.linalg.norm(predictions, axis=1)
                                      * np.linalg.norm(newest) + 1e-7)
        weights = np.exp(self.alpha * cos)
        weights /= weights.sum()
        return (weights[:, None] * predictions).sum(axis=0)
