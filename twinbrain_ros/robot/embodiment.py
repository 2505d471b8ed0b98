"""Embodiment descriptions: one YAML file per robot in `config/`, read by every layer.

A description is a ROS 2 parameter file (`policy_node: ros__parameters: ...`) so that the same
file configures the policy node (`--params-file config/widowx.yaml`) and, through this module,
the policy runtime, training and simulation code without ROS.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
import yaml

from ..transforms.normalization import MODES as NORMALIZATION_MODES

ACTION_SPACES = ("joint_position", "ee_delta")
STATE_SPACES = ("joint_position",)
PACKAGE = "twinbrain_ros"
NODE_SECTION = "policy_node"


class EmbodimentError(ValueError):
    """An embodiment description is missing or inconsistent."""


@dataclass
class Embodiment:
    """What every layer needs to know about one robot.

    Attributes:
        name: embodiment name (also the default normalization key).
        joint_names: joints of the model's state and (joint-space) actions, in model order.
        joint_lower_limits, joint_upper_limits: position limits, same order.
        max_joint_step: largest allowed change of each joint per control step (the policy's
            safety filter).
        max_joint_velocity: the robot's own joint velocity limits (units per second, as in its
            URDF), enforced by the simulated trajectory controller; empty: twice the velocity
            of `max_joint_step`.
        control_rate_hz: rate of the actions in a chunk.
        action_space: "joint_position" (absolute targets) or "ee_delta" (Bridge-style
            end-effector deltas + gripper, converted to joints by inverse kinematics); its
            conventions live in `twinbrain_ros.robot.action_spaces` (see `actions`).
        kinematics: the arm's kinematics model for `ee_delta` actions (a name known to
            `ArmKinematics.load`, e.g. `interbotix_wx250s`); "" for joint-space robots.
        state_space: how the state is measured ("joint_position").
        normalization_key: the checkpoint entry (state encoder + statistics) to use.
        action_normalization, state_normalization: statistics mode of actions / states
            (`q01_q99`, `min_max` or `mean_std`, see `twinbrain_ros.transforms.normalization`).
        gripper_joint: the gripper joint in `joint_names` ("" if none).
        gripper_open_position, gripper_closed_position: joint values of a binary gripper.
        grasp_joints: joints that a grasped object can stop while they close (empty: the
            gripper joint). The `gripper_joint` closes from its open towards its closed
            position, any other grasp joint towards its upper limit (the Fourier hands: 0 is
            open). See `tracking_tolerance`.
        max_tracking_error: per joint, how far the measured position may be from the commanded
            plan before the robot counts as having left it (the policy then plans afresh from
            the measured state); empty: three times `max_joint_step`. A grasp joint that is
            more open than commanded (fingers on an object) never counts.
        image_topics, joint_state_topic, instruction_topic: default input topics.
        trajectory_topic: the JointTrajectoryController topic of the arm.
        gripper_topic: a separate gripper controller topic ("" puts the gripper in the arm
            trajectory).
        dry_run_topic: where trajectories go while actuation is disabled.
    """

    name: str
    joint_names: list[str]
    joint_lower_limits: list[float]
    joint_upper_limits: list[float]
    max_joint_step: list[float]
    control_rate_hz: float
    max_joint_velocity: list[float] = field(default_factory=list)
    action_space: str = "joint_position"
    kinematics: str = ""
    state_space: str = "joint_position"
    normalization_key: str = ""
    action_normalization: str = "q01_q99"
    state_normalization: str = "q01_q99"
    gripper_joint: str = ""
    gripper_open_position: float = 0.0
    gripper_closed_position: float = 0.0
    grasp_joints: list[str] = field(default_factory=list)
    max_tracking_error: list[float] = field(default_factory=list)
    image_topics: list[str] = field(default_factory=lambda: ["/camera/image_raw"])
    joint_state_topic: str = "/joint_states"
    instruction_topic: str = "/instruction"
    trajectory_topic: str = "/joint_trajectory_controller/joint_trajectory"
    gripper_topic: str = ""
    dry_run_topic: str = "/policy/dry_run/joint_trajectory"

    def __post_init__(self):
        """Check sizes, limits and names; default the normalization key to the name."""
        self.normalization_key = self.normalization_key or self.name
        n = len(self.joint_names)
        if n == 0 or len(set(self.joint_names)) != n:
            raise EmbodimentError(f"{self.name}: joint_names must be non-empty and unique")
        keys = ["joint_lower_limits", "joint_upper_limits", "max_joint_step"]
        keys += ["max_joint_velocity"] if self.max_joint_velocity else []
        keys += ["max_tracking_error"] if self.max_tracking_error else []
        for key in keys:
            if len(getattr(self, key)) != n:
                raise EmbodimentError(f"{self.name}: {key} has {len(getattr(self, key))} values "
                                      f"for {n} joints")
        if np.any(self.lower >= self.upper):
            raise EmbodimentError(f"{self.name}: a lower joint limit is not below its upper")
        if np.any(self.max_step <= 0) or np.any(self.max_velocity <= 0):
            raise EmbodimentError(f"{self.name}: max_joint_step and max_joint_velocity values "
                                  "must be positive")
        if self.control_rate_hz <= 0:
            raise EmbodimentError(f"{self.name}: control_rate_hz must be positive")
        if self.action_space not in ACTION_SPACES:
            raise EmbodimentError(f"{self.name}: action_space {self.action_space!r} is not one "
                                  f"of {ACTION_SPACES}")
        if self.state_space not in STATE_SPACES:
            raise EmbodimentError(f"{self.name}: state_space {self.state_space!r} is not one "
                                  f"of {STATE_SPACES}")
        if self.gripper_joint and self.gripper_joint not in self.joint_names:
            raise EmbodimentError(f"{self.name}: gripper_joint {self.gripper_joint!r} is not in "
                                  "joint_names")
        unknown = [name for name in self.grasp_joints if name not in self.joint_names]
        if unknown:
            raise EmbodimentError(f"{self.name}: grasp_joints {unknown} are not in joint_names")
        if self.max_tracking_error and np.any(self.tracking_tolerance <= 0):
            raise EmbodimentError(f"{self.name}: max_tracking_error values must be positive")
        for key in ("action_normalization", "state_normalization"):
            if getattr(self, key) not in NORMALIZATION_MODES:
                raise EmbodimentError(f"{self.name}: {key} {getattr(self, key)!r} is not one "
                                      f"of {NORMALIZATION_MODES}")
        if not self.image_topics:
            raise EmbodimentError(f"{self.name}: at least one image topic is needed")
        if self.action_space == "ee_delta" and not (self.gripper_joint and self.kinematics):
            raise EmbodimentError(f"{self.name}: ee_delta actions need a gripper_joint and a "
                                  "kinematics model (the 'kinematics' field)")

    @property
    def lower(self) -> np.ndarray:
        """Lower joint limits as an array."""
        return np.asarray(self.joint_lower_limits, dtype=np.float64)

    @property
    def upper(self) -> np.ndarray:
        """Upper joint limits as an array."""
        return np.asarray(self.joint_upper_limits, dtype=np.float64)

    @property
    def max_step(self) -> np.ndarray:
        """Largest change per control step as an array."""
        return np.asarray(self.max_joint_step, dtype=np.float64)

    @property
    def max_velocity(self) -> np.ndarray:
        """The robot's joint velocity limits (units per second) as an array."""
        if self.max_joint_velocity:
            return np.asarray(self.max_joint_velocity, dtype=np.float64)
        return 2.0 * self.max_step * self.control_rate_hz

    @property
    def tracking_tolerance(self) -> np.ndarray:
        """Per joint: the largest distance from the commanded plan that still follows it."""
        if self.max_tracking_error:
            return np.asarray(self.max_tracking_error, dtype=np.float64)
        return 3.0 * self.max_step

    @property
    def grasp_closing(self) -> np.ndarray:
        """Per joint: the direction a grasp joint closes in (+1 or -1), 0 for other joints."""
        names = self.grasp_joints or ([self.gripper_joint] if self.gripper_joint else [])
        closing = np.zeros(len(self.joint_names))
        for name in names:
            direction = 1.0
            if name == self.gripper_joint and self.gripper_closed_position != \
                    self.gripper_open_position:
                direction = float(np.sign(self.gripper_closed_position
                                          - self.gripper_open_position))
            closing[self.joint_names.index(name)] = direction
        return closing

    @property
    def dt(self) -> float:
        """Control period in seconds."""
        return 1.0 / self.control_rate_hz

    @property
    def state_dim(self) -> int:
        """Size of the model's state vector."""
        return len(self.joint_names)

    def __getstate__(self) -> dict:
        """Pickle the description only (worker processes build their own kinematics)."""
        state = dict(self.__dict__)
        state.pop("_actions", None)
        return state

    @property
    def actions(self):
        """The action space object (`twinbrain_ros.robot.action_spaces`).

        It encodes and decodes this robot's actions and names their entries, size and binary
        dims. Kinematics load on first use.
        """
        if getattr(self, "_actions", None) is None:
            from .action_spaces import action_space_for

            self._actions = action_space_for(self)
        return self._actions

    @property
    def binary_action_dims(self) -> list[int]:
        """Action dims that are a binary gripper (not scaled by the statistics)."""
        return list(self.actions.binary_dims)

    @property
    def action_dim(self) -> int:
        """Size of the model's action vector."""
        return self.actions.dim

    @property
    def action_names(self) -> list[str]:
        """Names of the action vector's entries."""
        return list(self.actions.names)

    def spec(self, num_cameras: int | None = None):
        """The model's `EmbodimentSpec` of this robot, with its names (saved in checkpoints).

        Args:
            num_cameras: images per observation (default: one per image topic).
        """
        from ..transforms.spec import EmbodimentSpec

        return EmbodimentSpec(
            state_dim=self.state_dim, action_dim=self.action_dim,
            action_space=self.action_space, state_space=self.state_space, robot=self.name,
            joint_names=list(self.joint_names), action_names=self.action_names,
            num_cameras=len(self.image_topics) if num_cameras is None else int(num_cameras),
            control_rate_hz=float(self.control_rate_hz))

    @classmethod
    def from_parameters(cls, params: dict) -> Embodiment:
        """Build from a `ros__parameters` mapping; keys of the node that are not ours are ignored.

        Raises:
            EmbodimentError: naming missing keys.
        """
        names = {f.name for f in fields(cls)}
        data = {k: v for k, v in params.items() if k in names}
        if "name" not in data and "embodiment" in params:
            data["name"] = params["embodiment"]
        required = {f.name for f in fields(cls)
                    if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted("embodiment" if k == "name" else k for k in required - set(data))
        if missing:
            raise EmbodimentError(f"missing embodiment parameters {missing}")
        # ROS array parameters arrive as array.array: make them plain lists.
        robot = cls(**{k: v if isinstance(v, (str, int, float, bool)) else list(v)
                       for k, v in data.items()})
        # The file's other entries configure the policy loop for this robot
        # (`twinbrain_ros.policy.config.PolicyConfig.for_robot`).
        robot.node_parameters = {k: v for k, v in params.items()
                                 if k not in names and k != "embodiment"}
        return robot

    @classmethod
    def from_yaml(cls, path: str | Path) -> Embodiment:
        """Read an embodiment description (a policy_node parameter file)."""
        path = Path(path)
        if not path.is_file():
            raise EmbodimentError(f"embodiment description {path} does not exist")
        try:
            document = yaml.safe_load(path.read_text()) or {}
            params = document[NODE_SECTION]["ros__parameters"]
        except (yaml.YAMLError, KeyError, TypeError) as exc:
            raise EmbodimentError(f"{path}: expected '{NODE_SECTION}: ros__parameters:' "
                                  f"({exc})") from exc
        return cls.from_parameters(params)

    @classmethod
    def load(cls, name: str) -> Embodiment:
        """Load `config/<name>.yaml` from the installed package share or the source tree."""
        return cls.from_yaml(config_dir() / f"{name}.yaml")

    @classmethod
    def resolve(cls, name_or_path: str | Path) -> Embodiment:
        """An embodiment name (`config/<name>.yaml`) or the path of a YAML description."""
        return cls.from_yaml(description_file(name_or_path))


def description_file(name_or_path: str | Path) -> Path:
    """The YAML file of an embodiment name (`config/<name>.yaml`) or the path itself."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        return Path(text)
    return config_dir() / f"{text}.yaml"


def config_dir() -> Path:
    """The package's config directory: the ament share directory if installed, else the repo's."""
    try:
        from ament_index_python.packages import (
            PackageNotFoundError,
            get_package_share_directory,
        )

        try:
            shared = Path(get_package_share_directory(PACKAGE)) / "config"
            if shared.is_dir():
                return shared
        except (PackageNotFoundError, OSError):  # not installed, or no AMENT_PREFIX_PATH
            pass
    except ImportError:
        pass
    return Path(__file__).resolve().parents[2] / "config"
