"""A released checkpoint behind the policy runtime's interface.

Releases: starVLA's Qwen-GR00T and the TwinBrainVLA authors' PhysBrain-VLA twin.

`ReleaseRuntime.infer` runs the release's own preprocessing and model
(`twinbrain_ros.model.release.starvla`) and returns its chunk un-normalized with the release's
rule, in the robot's action space: for the WidowX, Bridge end-effector deltas and a binary
gripper (1 open), which `EEDeltaActions` turns into joint targets as for our own checkpoints.
`protocol` holds the loop settings of the authors' evaluation (one action per inference,
adaptive ensembling over 7 predictions with alpha 0.1, as their SimplerEnv client runs the
WidowX); the node and `evaluate` use them unless told not to (`release_protocol`).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..model.release.starvla import ReleaseError, load_release, read_release, unnormalize_actions
from ..robot.embodiment import Embodiment
from ..robot.observation import Observation
from ..transforms.rtc import ChunkPrefix
from .contract import ActionChunk
from .runtime import resolve_device

# Which statistics of a release un-normalize the actions of a robot's action space
# (starVLA's SimplerEnv client: `oxe_bridge` for the WidowX).
RELEASE_STATS_KEYS = {"ee_delta": "oxe_bridge"}
# The action conventions of a release (`datasets.vla_data.action_type`) our action spaces speak.
RELEASE_ACTION_TYPES = {"delta_ee": "ee_delta", "ee_delta": "ee_delta"}
# What the node's diagnostics call each released framework.
RELEASE_NAMES = {"QwenGR00T": "starVLA QwenGR00T", "PhysBrainVLA": "PhysBrain-VLA twin"}
# The authors' WidowX evaluation protocol (their SimplerEnv client's defaults).
RELEASE_PROTOCOL = {"actions_per_inference": 1, "chunk_transition": "ensemble",
                    "ensemble_horizon": 7, "ensemble_alpha": 0.1}


class ReleaseRuntime:
    """Loads a released Qwen-GR00T checkpoint and turns observations into action chunks."""

    supports_prefix = False  # no real-time chunking: their sampler takes no prefix

    def __init__(self, checkpoint: str, embodiment: Embodiment, device: str = "auto",
                 backbone_path: str | None = None, seed: int | None = None,
                 unnorm_key: str = "", log=None):
        """Check that the release fits the robot (before any weight is read), then load it.

        Raises:
            ReleaseError (a ValueError): an action convention, dimension or statistics key that
                does not fit the robot, a release conditioned on a state layout we cannot
                produce, or a file that does not fit the model (the message says which).
        """
        spec = read_release(checkpoint)
        space = RELEASE_ACTION_TYPES.get(spec.action_type)
        if space != embodiment.action_space:
            raise ReleaseError(
                f"released checkpoint {spec.run_dir}: its actions are {spec.action_type!r} "
                f"({space or 'no action space of this package'}), robot {embodiment.name!r} "
                f"takes {embodiment.action_space}")
        dim = int(spec.head["action_dim"])
        if dim != embodiment.actions.dim:
            raise ReleaseError(f"released checkpoint {spec.run_dir} predicts {dim} action "
                               f"dimensions, robot {embodiment.name!r} takes "
                               f"{embodiment.actions.dim}")
        if spec.include_state:
            raise ReleaseError(
                f"released checkpoint {spec.run_dir} was trained with the robot state as input "
                "(datasets.vla_data.include_state: true) in its dataset's own layout, which "
                f"{embodiment.name!r}'s joint states are not mapped to; only releases without "
                "state input run here")
        self.unnorm_key, stats = spec.stats_for(unnorm_key or RELEASE_STATS_KEYS.get(space))
        self.action_stats = stats["action"]
        self.device = resolve_device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = load_release(checkpoint, device=self.device, dtype=dtype,
                                  backbone_path=backbone_path, spec=spec)
        self.spec = spec
        self.embodiment = embodiment
        self.horizon = self.model.horizon
        self.seed = seed
        self.log = log or (lambda text: None)
        self.inference = self.inference_state = "eager"
        self.engine, self.warmup_s = None, None
        self.protocol = dict(RELEASE_PROTOCOL)
        twin = spec.framework == "PhysBrainVLA"
        self.brain_mode = "twin" if twin else "single"
        self.identity = {"checkpoint": str(checkpoint), "backbone": str(self.model.spec.base_vlm),
                         "backbone_type": self.model.model_type, "brain_mode": self.brain_mode,
                         "release": RELEASE_NAMES.get(spec.framework, spec.framework),
                         "embodiment_key": self.unnorm_key, "inference": "eager"}
        self.log(f"released checkpoint: {self.identity['release']} ({self.model.model_type}), "
                 f"weights {spec.weights.name}, statistics {self.unnorm_key!r}, "
                 f"horizon {self.horizon}")

    def contract(self, max_instruction_tokens: int) -> dict:
        """What a policy server promises its clients for this release.

        Its robot's spec, the chunk size, the image size and the protocol.
        """
        from .contract import spec_dict

        size = self.spec.image_size or (224, 224)
        return {"embodiment_key": self.embodiment.normalization_key,
                **spec_dict(self.embodiment.spec()), "horizon": self.horizon,
                "image_size": [size[1], size[0]], "backbone": str(self.spec.base_vlm),
                "backbone_type": self.model.model_type, "brain_mode": self.brain_mode,
                "max_instruction_tokens": int(max_instruction_tokens),
                "special_tokens": self.text_processor._special_tokens(),
                "protocol": dict(self.protocol)}

    @property
    def text_processor(self):
        """The processor whose special tokens an instruction must not hold.

        For the twin, the Right Brain's, with its added `<|action|>` and `<|propri|>`.
        """
        return getattr(self.model, "right_processor", self.model.processor)

    def check_instruction(self, instruction: str, max_tokens: int) -> int:
        """The instruction's token count; `InstructionError` (with a cause) if unusable."""
        return self.text_processor.check_instruction(instruction, max_tokens)

    def infer(self, observation: Observation, prefix: ChunkPrefix | None = None,
              seed: int | None | str = "runtime") -> ActionChunk:
        """Run the release on one observation: its chunk in the robot's action units.

        `seed`: the noise seed of this chunk (None: fresh noise); by default the runtime's.
        """
        if prefix is not None:
            raise ValueError("a released checkpoint cannot inpaint a prefix (chunk_transition "
                             "rtc); use blend or ensemble")
        start = time.perf_counter()
        normalized = self.model.sample(list(observation.images), observation.instruction,
                                       seed=self.seed if seed == "runtime" else seed)
        actions = unnormalize_actions(normalized, self.action_stats)
        return ActionChunk(actions=np.asarray(actions), latency_s=time.perf_counter() - start)
