"""The transforms between a robot's raw vectors and the model's normalized, padded ones.

Written once and used by the eager model (one observation or a batch: the policy server's), the
compiled engine and the training collator:

- in: a state is checked (shape, finite), normalized with the embodiment's statistics and
  zero-padded to the model's `max_state_dim`, with a mask of its real entries; training targets
  and a real-time chunking prefix the same way, to `max_action_dim` (the prefix with its
  inpainting weights);
- out: a chunk of the model's padded, normalized actions is cut to the embodiment's
  `action_dim` and un-normalized into the robot's units.

NumPy only: the tensors are made by whoever calls (`torch.from_numpy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .normalization import EmbodimentNormStats
from .rtc import ChunkPrefix, rtc_weights
from .spec import EmbodimentSpec


@dataclass(frozen=True)
class EmbodimentTransforms:
    """One embodiment's transforms into and out of a model of the given sizes.

    Attributes:
        name: the embodiment's key in the model (its normalization key).
        spec: its state and action sizes.
        stats: its normalization statistics.
        max_state_dim: the model's padded state width.
        max_action_dim: the model's padded action width.
        horizon: actions per chunk.
    """

    name: str
    spec: EmbodimentSpec
    stats: EmbodimentNormStats
    max_state_dim: int
    max_action_dim: int
    horizon: int

    def state(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(max_state_dim,) normalized, zero-padded state and its mask (1 on real entries).

        Raises:
            ValueError: the state has another shape than the embodiment's, or is not finite.
        """
        state = np.asarray(state, dtype=np.float32)
        if state.shape != (self.spec.state_dim,):
            raise ValueError(f"embodiment {self.name!r} expects a state of shape "
                             f"({self.spec.state_dim},), got {state.shape}")
        if not np.isfinite(state).all():
            raise ValueError("state contains non-finite values")
        return _padded(self.stats.state.normalize(state), self.max_state_dim)

    def actions(self, actions: np.ndarray) -> np.ndarray:
        """(T, max_action_dim) normalized, zero-padded actions (training targets)."""
        return _padded(self.stats.action.normalize(actions), self.max_action_dim)[0]

    def prefix(self, prefix: ChunkPrefix | None) -> tuple[np.ndarray, np.ndarray]:
        """(horizon, max_action_dim) normalized prefix and inpainting weights (zeros: none).

        Raises:
            ValueError: the prefix has another action width than the embodiment's.
        """
        values = np.zeros((self.horizon, self.max_action_dim), dtype=np.float32)
        weights = np.zeros_like(values)
        if prefix is None:
            return values, weights
        dim = self.spec.action_dim
        if prefix.actions.shape[1] != dim:
            raise ValueError(f"embodiment {self.name!r} has {dim} action dims; the prefix has "
                             f"{prefix.actions.shape[1]}")
        overlap = min(len(prefix.actions), self.horizon)
        values[:overlap, :dim] = self.stats.action.normalize(prefix.actions[:overlap])
        ramp = rtc_weights(self.horizon, prefix.frozen, overlap, prefix.schedule)
        weights[:, :dim] = ramp[:, None]
        return values, weights

    def output(self, chunk: np.ndarray) -> np.ndarray:
        """(horizon, action_dim) actions in the robot's units from the model's padded chunk."""
        chunk = np.asarray(chunk, dtype=np.float32)
        return self.stats.action.unnormalize(chunk[..., :self.spec.action_dim])


def _padded(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """`values` (..., d) zero-padded to (..., width), and the (width,) mask of the first d."""
    dim = values.shape[-1]
    padded = np.zeros((*values.shape[:-1], width), dtype=np.float32)
    padded[..., :dim] = values
    mask = np.zeros(width, dtype=np.float32)
    mask[:dim] = 1.0
    return padded, mask
