"""Policy runtime without ROS: an observation in, an action chunk in joint units out.

The same object serves the ROS policy node, evaluation loops and tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..embodiment import Embodiment
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

    def __init__(self, checkpoint: str, embodiment: Embodiment, device: str = "auto",
                 backbone_path: str | None = None, seed: int | None = None):
        """Load the checkpoint on `device` (bf16 on CUDA, fp32 on CPU) and check it fits.

        Raises:
            ValueError: when the checkpoint has no entry for the embodiment's normalization key,
                or its state/action spaces differ from the embodiment's.
        """
        self.device = resolve_device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = load_checkpoint(checkpoint, device=self.device, dtype=dtype,
                                     backbone_path=backbone_path)
        self.model.eval()
        self.key = embodiment.normalization_key
        self.spec = check_compatible(self.model.config.embodiments, embodiment, checkpoint)
        self.horizon = self.model.config.action_expert.horizon
        self.seed = seed
        self.identity = {"checkpoint": str(checkpoint),
                         "backbone": self.model.config.backbone_path,
                         "backbone_type": self.model.right.model_type,
                         "brain_mode": self.model.config.brain_mode,
                         "embodiment_key": self.key}

    def check_instruction(self, instruction: str, max_tokens: int) -> int:
        """The instruction's token count; `InstructionError` (with a cause) if unusable."""
        return self.model.processor.check_instruction(instruction, max_tokens)

    def infer(self, observation: Observation) -> ActionChunk:
        """Run the model on one observation; raises ValueError on unusable input."""
        start = time.perf_counter()
        actions = self.model.predict_action(observation.images, observation.instruction,
                                            observation.state, self.key, seed=self.seed)
        return ActionChunk(actions=actions, latency_s=time.perf_counter() - start)


def check_compatible(specs: dict, embodiment: Embodiment, checkpoint: str):
    """The checkpoint's spec for the embodiment, or a ValueError saying what differs."""
    key = embodiment.normalization_key
    if key not in specs:
        raise ValueError(f"checkpoint {checkpoint} has no embodiment {key!r} (the "
                         f"normalization_key of {embodiment.name}); it has {sorted(specs)}")
    spec = specs[key]
    wanted = {"action_space": embodiment.action_space, "state_space": embodiment.state_space,
              "action_dim": embodiment.action_dim, "state_dim": embodiment.state_dim}
    found = {name: getattr(spec, name) for name in wanted}
    if found != wanted:
        diff = {k: (found[k], wanted[k]) for k in wanted if found[k] != wanted[k]}
        raise ValueError(f"checkpoint {checkpoint} does not fit embodiment {embodiment.name}: "
                         f"(checkpoint, embodiment) differ in {diff}")
    return spec
