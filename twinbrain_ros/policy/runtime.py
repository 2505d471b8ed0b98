"""Policy runtime without ROS: an observation in, an action chunk in joint units out.

The same object serves the ROS policy node, evaluation loops and tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..model.checkpoint import load_checkpoint


@dataclass
class Observation:
    """One synchronised observation of the robot."""

    images: list[np.ndarray]   # HxWx3 uint8 RGB, one per camera
    state: np.ndarray          # raw proprioceptive state (state_dim,)
    instruction: str


@dataclass
class ActionChunk:
    """The model's answer to one observation."""

    actions: np.ndarray        # (horizon, action_dim) in raw units
    latency_s: float           # model time for this chunk


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available; an explicit CUDA request without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return resolved


class PolicyRuntime:
    """Loads a TwinBrainVLA checkpoint and turns observations into action chunks."""

    def __init__(self, checkpoint: str, embodiment: str, device: str = "auto",
                 backbone_path: str | None = None, seed: int | None = None):
        """Load the checkpoint on `device` (bf16 on CUDA, fp32 on CPU)."""
        self.device = resolve_device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = load_checkpoint(checkpoint, device=self.device, dtype=dtype,
                                     backbone_path=backbone_path)
        self.model.eval()
        if embodiment not in self.model.config.embodiments:
            raise ValueError(f"checkpoint {checkpoint} has no embodiment {embodiment!r}; it has "
                             f"{sorted(self.model.config.embodiments)}")
        self.embodiment = embodiment
        self.spec = self.model.config.embodiments[embodiment]
        self.horizon = self.model.config.action_expert.horizon
        self.seed = seed

    def infer(self, observation: Observation) -> ActionChunk:
        """Run the model on one observation; raises ValueError on unusable input."""
        start = time.perf_counter()
        actions = self.model.predict_action(observation.images, observation.instruction,
                                            observation.state, self.embodiment, seed=self.seed)
        if not np.isfinite(actions).all():
            raise ValueError("the model returned non-finite actions")
        return ActionChunk(actions=actions, latency_s=time.perf_counter() - start)
