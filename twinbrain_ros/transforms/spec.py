"""What the model knows of a robot (`EmbodimentSpec`); saved in every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EmbodimentSpec:
    """What the model needs to know of an embodiment, and the robot it was trained for.

    The names travel with the checkpoint so that a robot whose joints are named or ordered
    differently is refused (`twinbrain_ros.policy.contract.check_contract`); they are empty in
    checkpoints written before they were recorded.
    """

    state_dim: int
    action_dim: int
    action_space: str = "joint_position"   # or "ee_delta" (Bridge: xyz + rpy deltas, gripper)
    state_space: str = "joint_position"
    robot: str = ""                        # the embodiment's name
    joint_names: list[str] = field(default_factory=list)    # state order
    action_names: list[str] = field(default_factory=list)   # action vector entries
    num_cameras: int = 0                   # images per observation (0: not recorded)
    control_rate_hz: float = 0.0           # rate of the chunk's actions (0: not recorded)
