"""Normalization statistics of states and actions, one set per embodiment.

They are computed once from the training data, travel inside every checkpoint
(`norm_stats.json`) and are used unchanged by training, evaluation and the policy node.

Modes:
- `q01_q99`: x -> 2 (x - q01) / (q99 - q01) - 1, clipped to [-1, 1] (Bridge / RT-1 actions);
- `min_max`: the same with min / max (GR1);
- `mean_std`: x -> (x - mean) / std.
Dims listed in `binary` (grippers) are not scaled when normalizing; when un-normalizing they are
thresholded at 0.5 into {0, 1}.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

MODES = ("q01_q99", "min_max", "mean_std")
_EPS = 1e-6


@dataclass
class NormStats:
    """Statistics of one vector quantity (a state or an action) of one embodiment."""

    mode: str
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    q01: list[float]
    q99: list[float]
    binary: list[int] = field(default_factory=list)

    def __post_init__(self):
        """Check the mode and that every statistic has the same length."""
        if self.mode not in MODES:
            raise ValueError(f"normalization mode {self.mode!r} is not one of {MODES}")
        lengths = {len(v) for v in (self.mean, self.std, self.min, self.max, self.q01, self.q99)}
        if len(lengths) != 1:
            raise ValueError(f"normalization statistics have different lengths: {lengths}")
        if any(not 0 <= i < self.dim for i in self.binary):
            raise ValueError(f"binary dims {self.binary} out of range for dim {self.dim}")
        for name in ("mean", "std", "min", "max", "q01", "q99"):
            values = np.asarray(getattr(self, name), dtype=np.float64)
            if not np.isfinite(values).all():
                raise ValueError(f"normalization statistic {name!r} has non-finite values "
                                 f"{values.tolist()[:8]}")

    @property
    def dim(self) -> int:
        """Vector length."""
        return len(self.mean)

    @classmethod
    def identity(cls, dim: int, mode: str = "q01_q99") -> NormStats:
        """Statistics that leave values in [-1, 1] unchanged (for untrained models)."""
        ones, zeros = [1.0] * dim, [0.0] * dim
        neg = [-1.0] * dim
        return cls(mode=mode, mean=zeros, std=ones, min=neg, max=ones, q01=neg, q99=ones)

    @classmethod
    def from_data(cls, values: np.ndarray, mode: str, binary=()) -> NormStats:
        """Compute statistics from an (N, dim) array of samples."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] == 0:
            raise ValueError(f"expected a non-empty (N, dim) array, got shape {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError("normalization statistics from non-finite values")
        return cls(mode=mode, mean=values.mean(0).tolist(), std=values.std(0).tolist(),
                   min=values.min(0).tolist(), max=values.max(0).tolist(),
                   q01=np.quantile(values, 0.01, axis=0).tolist(),
                   q99=np.quantile(values, 0.99, axis=0).tolist(), binary=list(binary))

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "q01_q99":
            return np.asarray(self.q01), np.asarray(self.q99)
        return np.asarray(self.min), np.asarray(self.max)

    def _scaled(self) -> np.ndarray:
        mask = np.ones(self.dim, dtype=bool)
        mask[list(self.binary)] = False
        return mask

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Map raw values (..., dim) into the model's normalized space."""
        x = np.asarray(x, dtype=np.float64)
        self._check(x)
        if self.mode == "mean_std":
            y = (x - np.asarray(self.mean)) / np.maximum(np.asarray(self.std), _EPS)
        else:
            low, high = self._bounds()
            y = np.clip(2.0 * (x - low) / np.maximum(high - low, _EPS) - 1.0, -1.0, 1.0)
        return np.where(self._scaled(), y, x).astype(np.float32)

    def unnormalize(self, y: np.ndarray) -> np.ndarray:
        """Map normalized values (..., dim) back to raw units; binary dims become 0 or 1."""
        y = np.asarray(y, dtype=np.float64)
        self._check(y)
        if self.mode == "mean_std":
            x = y * np.asarray(self.std) + np.asarray(self.mean)
        else:
            low, high = self._bounds()
            x = (np.clip(y, -1.0, 1.0) + 1.0) / 2.0 * (high - low) + low
        x = np.where(self._scaled(), x, (y > 0.5).astype(np.float64))
        return x.astype(np.float32)

    def _check(self, x: np.ndarray) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected last dim {self.dim}, got shape {x.shape}")

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        return asdict(self)


@dataclass
class EmbodimentNormStats:
    """State and action statistics of one embodiment."""

    state: NormStats
    action: NormStats

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        return {"state": self.state.to_dict(), "action": self.action.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> EmbodimentNormStats:
        """Inverse of `to_dict`."""
        return cls(state=NormStats(**data["state"]), action=NormStats(**data["action"]))
