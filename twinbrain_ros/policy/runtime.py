"""Policy runtime without ROS: an observation in, an action chunk in joint units out.

The same object serves the ROS policy node, evaluation loops and tests.
"""

from __future__ import annotations

import time

import torch

from ..model.checkpoint import load_checkpoint, read_checkpoint_config
from ..robot.embodiment import Embodiment
from ..robot.observation import Observation
from ..transforms.rtc import ChunkPrefix
from .contract import ActionChunk, check_contract

__all__ = ["ActionChunk", "Observation", "PolicyRuntime", "check_compatible", "local_runtime",
           "resolve_device"]


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


def load_model(checkpoint: str, device: str = "auto", backbone_path: str | None = None):
    """The checkpoint's model in eval mode on `device` (bf16 on CUDA, fp32 on the CPU).

    Returns (model, the resolved torch device).
    """
    resolved = resolve_device(device)
    dtype = torch.bfloat16 if resolved.type == "cuda" else torch.float32
    model = load_checkpoint(checkpoint, device=resolved, dtype=dtype,
                            backbone_path=backbone_path)
    return model.eval(), resolved


def compiled_engine(model, key: str, num_cameras: int, max_instruction_tokens: int, log):
    """A compiled `InferenceEngine` for one embodiment and camera count, warmed up.

    Token buckets: the default ones below `max_instruction_tokens`, and that one. A failure is
    never fatal: eager still works.

    Returns:
        (engine or None, state: "compiled (warm-up S s)", the engine's own "fallback: ..." or
        "fallback to eager: <reason>", warm-up seconds or None).
    """
    from ..model.engine import DEFAULT_TOKEN_BUDGETS, InferenceEngine

    budgets = sorted({b for b in DEFAULT_TOKEN_BUDGETS if b < max_instruction_tokens}
                     | {int(max_instruction_tokens)})
    try:
        engine = InferenceEngine(model, num_cameras=num_cameras, token_budgets=tuple(budgets),
                                 compile=True, log=log)
        log(f"compiling the inference engine for {key!r}: {len(engine.buckets)} bucket(s), "
            f"{num_cameras} camera(s), device {model.device}")
        warmup_s = engine.warmup(key)
    except Exception as error:  # noqa: BLE001 - never a dead policy: eager still works
        log(f"the compiled inference engine for {key!r} failed ({type(error).__name__}: "
            f"{str(error)[:300]}); running eager")
        return None, f"fallback to eager: {type(error).__name__}: {str(error)[:200]}", None
    state = (engine.state if engine.state.startswith("fallback")
             else f"compiled (warm-up {warmup_s:.1f} s)")
    log(f"inference engine ready in {warmup_s:.1f} s ({key!r}, {num_cameras} camera(s)): "
        f"{state}")
    return engine, state, warmup_s


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
                 inference: str = "auto", max_instruction_tokens: int = 128,
                 max_question_tokens: int = 256, log=None):
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
            max_question_tokens: the longest question to the Left Brain (`start_answer`).
            log: called with progress lines (compile times, fallbacks).

        Raises:
            ValueError: when the checkpoint has no entry for the embodiment's normalization key,
                or its state/action spaces differ from the embodiment's.
        """
        # A checkpoint of another robot is refused before any weight is read.
        self.spec = check_compatible(read_checkpoint_config(checkpoint)[0].embodiments,
                                     embodiment, checkpoint)
        self.model, self.device = load_model(checkpoint, device, backbone_path)
        self.key = embodiment.normalization_key
        self.horizon = self.model.config.action_expert.horizon
        self.seed = seed
        self.log = log or (lambda text: None)
        self.max_question_tokens = int(max_question_tokens)
        self._answerer = None
        self.inference = resolve_inference(inference, self.device)
        self.engine, self.inference_state, self.warmup_s = None, self.inference, None
        if self.inference == "compiled":
            self.engine, self.inference_state, self.warmup_s = compiled_engine(
                self.model, self.key, len(embodiment.image_topics), max_instruction_tokens,
                self.log)
            if self.engine is None:
                self.inference = "eager"
        self.identity = {"checkpoint": str(checkpoint),
                         "backbone": self.model.config.backbone_path,
                         "backbone_type": self.model.right.model_type,
                         "brain_mode": self.model.config.brain_mode,
                         "embodiment_key": self.key, "inference": self.inference_state}

    def check_instruction(self, instruction: str, max_tokens: int) -> int:
        """The instruction's token count; `InstructionError` (with a cause) if unusable."""
        return self.model.processor.check_instruction(instruction, max_tokens)

    def start_answer(self, images: list, question: str, max_new_tokens: int):
        """A generation answering `question` about `images` with the frozen Left Brain.

        A `twinbrain_ros.model.ask.Generation`: run it with `step(max_tokens)` between
        inference cycles.

        Raises:
            AskError: a single-brain checkpoint, an empty, too long or special-token question.
        """
        return self._left_brain().start(images, question, max_new_tokens)

    def answering_ready(self) -> bool:
        """Whether `start_answer` can begin without reading weights.

        An untied LM head is read in the background meanwhile. `AskError` for a single-brain
        checkpoint.
        """
        return self._left_brain().head_ready()

    def _left_brain(self):
        from ..model.ask import LeftBrainAnswerer

        if self._answerer is None:
            self._answerer = LeftBrainAnswerer(self.model, self.max_question_tokens)
        return self._answerer

    def infer(self, observation: Observation, prefix: ChunkPrefix | None = None) -> ActionChunk:
        """Run the model on one observation; raises ValueError on unusable input.

        `prefix`: the previous plan's overlap in raw action units, for real-time chunking.
        """
        start = time.perf_counter()
        predict = self.engine.predict_action if self.engine is not None else \
            self.model.predict_action
        actions = predict(observation.images, observation.instruction, observation.state,
                          self.key, seed=self.seed, prefix=prefix)
        if self.engine is not None and self.engine.state.startswith("fallback"):
            self.inference_state = self.engine.state
            self.identity["inference"] = self.inference_state
        return ActionChunk(actions=actions, latency_s=time.perf_counter() - start)


def local_runtime(checkpoint: str, embodiment: Embodiment, **settings):
    """The runtime of a checkpoint directory.

    A released starVLA run gets a `ReleaseRuntime`, one of ours a `PolicyRuntime`.

    `settings`: `PolicyRuntime`'s keyword arguments; a release takes device, backbone_path,
    seed and log of them.
    """
    from ..model.release.starvla import is_release_checkpoint

    if is_release_checkpoint(checkpoint):
        from .release_runtime import ReleaseRuntime

        keep = ("device", "backbone_path", "seed", "log")
        return ReleaseRuntime(checkpoint, embodiment,
                              **{k: v for k, v in settings.items() if k in keep})
    return PolicyRuntime(checkpoint, embodiment, **settings)


def check_compatible(specs: dict, embodiment: Embodiment, checkpoint: str, warn=None):
    """The checkpoint's spec for the embodiment, or a ValueError saying what differs.

    See `twinbrain_ros.policy.contract.check_contract` (the policy server's handshake is
    checked by the same function).
    """
    return check_contract(specs, embodiment, f"checkpoint {checkpoint}", warn=warn)
