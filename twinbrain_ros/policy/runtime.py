"""Policy runtime without ROS: an observation in, an action chunk in joint units out.

The same object serves the ROS policy node, evaluation loops and tests.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..model.checkpoint import load_checkpoint
from ..robot.embodiment import Embodiment
from ..robot.observation import Observation

__all__ = ["ActionChunk", "Observation", "PolicyRuntime", "check_compatible", "resolve_device"]


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


INFERENCE_MODES = ("auto", "eager", "compiled")


def resolve_inference(inference: str, device: torch.device) -> str:
    """`auto`: the compiled engine on CUDA; eager on the CPU (see the README's benchmark)."""
    if inference not in INFERENCE_MODES:
        raise ValueError(f"inference {inference!r} is not one of {INFERENCE_MODES}")
    if inference == "auto":
        return "compiled" if device.type == "cuda" else "eager"
    return inference


class PolicyRuntime:
    """Loads a TwinBrainVLA checkpoint and turns observations into action chunks.

    Attributes:
        inference: what runs each chunk: "eager" (`TwinBrainVLA.predict_action`) or "compiled"
            (`twinbrain_ros.model.engine.InferenceEngine`, warmed up here, before the runtime
            is returned); a compiled engine that failed falls back to eager, and
            `inference_state` says so.
        inference_state: "eager", "compiled", or "fallback to eager: <reason>".
    """

    def __init__(self, checkpoint: str, embodiment: Embodiment, device: str = "auto",
                 backbone_path: str | None = None, seed: int | None = None,
                 inference: str = "auto", max_instruction_tokens: int = 128, log=None):
        """Load the checkpoint on `device` (bf16 on CUDA, fp32 on CPU) and check it fits.

        Args:
            checkpoint: the checkpoint directory.
            embodiment: the robot.
            device: auto, cpu, cuda or cuda:N.
            backbone_path: override of the checkpoint's backbone directory.
            seed: seed of the flow-matching noise (None: fresh noise every chunk).
            inference: auto, eager or compiled (see `resolve_inference`).
            max_instruction_tokens: the longest instruction; the compiled engine's largest
                token bucket.
            log: called with progress lines (compile times, fallbacks).

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
        self.log = log or (lambda text: None)
        self.engine = None
        self.inference = resolve_inference(inference, self.device)
        self.inference_state = self.inference
        self.warmup_s = None
        if self.inference == "compiled":
            self._build_engine(len(embodiment.image_topics), max_instruction_tokens)
        self.identity = {"checkpoint": str(checkpoint),
                         "backbone": self.model.config.backbone_path,
                         "backbone_type": self.model.right.model_type,
                         "brain_mode": self.model.config.brain_mode,
                         "embodiment_key": self.key, "inference": self.inference_state}

    def _build_engine(self, num_cameras: int, max_instruction_tokens: int) -> None:
        from ..model.engine import DEFAULT_TOKEN_BUDGETS, InferenceEngine

        budgets = sorted({b for b in DEFAULT_TOKEN_BUDGETS if b < max_instruction_tokens}
                         | {int(max_instruction_tokens)})
        try:
            engine = InferenceEngine(self.model, num_cameras=num_cameras,
                                     token_budgets=tuple(budgets), compile=True, log=self.log)
            self.log(f"compiling the inference engine: {len(engine.buckets)} bucket(s), "
                     f"{num_cameras} camera(s), device {self.device}")
            self.warmup_s = engine.warmup(self.key)
        except Exception as error:  # noqa: BLE001 - never a dead node: eager still works
            self.inference = "eager"
            self.inference_state = (f"fallback to eager: {type(error).__name__}: "
                                    f"{str(error)[:200]}")
            self.log(f"the compiled inference engine failed ({type(error).__name__}: "
                     f"{str(error)[:300]}); running eager")
            return
        if engine.state.startswith("fallback"):
            self.inference_state = engine.state
        else:
            self.inference_state = f"compiled (warm-up {self.warmup_s:.1f} s)"
        self.log(f"inference engine ready in {self.warmup_s:.1f} s: {self.inference_state}")
        self.engine = engine

    def check_instruction(self, instruction: str, max_tokens: int) -> int:
        """The instruction's token count; `InstructionError` (with a cause) if unusable."""
        return self.model.processor.check_instruction(instruction, max_tokens)

    def infer(self, observation: Observation) -> ActionChunk:
        """Run the model on one observation; raises ValueError on unusable input."""
        start = time.perf_counter()
        predict = self.engine.predict_action if self.engine is not None else \
            self.model.predict_action
        actions = predict(observation.images, observation.instruction, observation.state,
                          self.key, seed=self.seed)
        if self.engine is not None and self.engine.state.startswith("fallback"):
            self.inference_state = self.engine.state
            self.identity["inference"] = self.inference_state
        return ActionChunk(actions=actions, latency_s=time.perf_counter() - start)


def check_compatible(specs: dict, embodiment: Embodiment, checkpoint: str, warn=None):
    """The checkpoint's spec for the embodiment, or a ValueError saying what differs.

    Sizes and spaces must match; so must the joint names and their order, the action names and
    the number of cameras where the checkpoint recorded them. A checkpoint that predates those
    records loads with a warning (`warn(text)`, default `warnings.warn`).
    """
    key = embodiment.normalization_key
    if key not in specs:
        raise ValueError(f"checkpoint {checkpoint} has no embodiment {key!r} (the "
                         f"normalization_key of {embodiment.name}); it has {sorted(specs)}")
    spec = specs[key]
    wanted = {"action_space": embodiment.action_space, "state_space": embodiment.state_space,
              "action_dim": embodiment.action_dim, "state_dim": embodiment.state_dim}
    found = {name: getattr(spec, name) for name in wanted}
    recorded = {"joint_names": (list(spec.joint_names), list(embodiment.joint_names)),
                "action_names": (list(spec.action_names), embodiment.action_names),
                "num_cameras": (spec.num_cameras, len(embodiment.image_topics))}
    for name, (theirs, ours) in recorded.items():
        if theirs:
            found[name], wanted[name] = theirs, ours
    if found != wanted:
        diff = {k: (found[k], wanted[k]) for k in wanted if found[k] != wanted[k]}
        raise ValueError(f"checkpoint {checkpoint} does not fit embodiment {embodiment.name}: "
                         f"(checkpoint, embodiment) differ in {diff}")
    if not spec.joint_names:
        text = (f"checkpoint {checkpoint} records no joint names for {key!r} (written by an "
                f"older version): the order of {embodiment.name}'s joints is not checked")
        if warn is None:
            warnings.warn(text, stacklevel=2)
        else:
            warn(text)
    return spec
