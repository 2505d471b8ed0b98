"""Action spaces: the one owner of each action convention, its forward and inverse side by side.

An action space turns robot motion into model actions (`encode`: joint states and the joint
targets that followed them -> actions, for datasets made from recordings) and model actions
back into motion (`decode`: actions and the measured joints -> absolute joint targets, for the
policy node, simulation and scripted experts). It also names the action vector's entries, its
size and its binary (gripper) entries. No torch, no ROS; kinematics is built on first use.

- `joint_position`: the action is the absolute joint target, in `embodiment.joint_names` order.
- `ee_delta` (Bridge / SimplerEnv WidowX): `[dx, dy, dz, droll, dpitch, dyaw, gripper]` per
  control step. Translation in metres in the robot base frame; rotation as fixed-axis
  roll-pitch-yaw, `R_delta = Rz(yaw) Ry(pitch) Rx(roll)`, applied in the base frame about the
  end effector (`R_next = R_delta R`); gripper 1 = open, 0 = closed (binary). Decoding chains
  a chunk's targets from target to target through inverse kinematics of the arm that the
  embodiment's `kinematics` field names (`twinbrain_ros.robot.kinematics.ArmKinematics`);
  encoding takes the forward kinematics of consecutive joint states.
"""

from __future__ import annotations

import numpy as np

from ..errors import CausedError
from .embodiment import Embodiment

EE_DELTA_NAMES = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
# The gripper entry of an ee_delta action (binary: decoded as closed below 0.5).
GRIPPER_OPEN = 1.0
GRIPPER_CLOSED = 0.0


class ChunkRejected(CausedError, RuntimeError):
    """A chunk that must not be executed; `cause` is a short key for diagnostics."""


class JointPositionActions:
    """Absolute joint position targets, one per joint of the embodiment."""

    kind = "joint_position"

    def __init__(self, embodiment: Embodiment):
        """The action space of `embodiment` (whose `action_space` is `joint_position`)."""
        self.embodiment = embodiment
        self.names = list(embodiment.joint_names)
        self.dim = len(self.names)
        self.binary_dims: list[int] = []

    def decode(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """(H, dim) actions -> (H, n_joints) targets: the actions themselves."""
        return np.asarray(actions, dtype=np.float64).reshape(-1, self.dim)

    def encode(self, states: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """(T, n) joint states and the (T, n) targets that followed -> (T, dim) actions."""
        return np.asarray(targets, dtype=np.float64).copy()


class EEDeltaActions:
    """Bridge end-effector deltas and a binary gripper (see the module docstring)."""

    kind = "ee_delta"

    def __init__(self, embodiment: Embodiment, kinematics=None):
        """The action space of `embodiment`; `kinematics` replaces the one its YAML names.

        Raises:
            ValueError: no gripper joint, or no kinematics model named.
        """
        if not embodiment.gripper_joint:
            raise ValueError(f"{embodiment.name}: ee_delta actions need a gripper_joint")
        if kinematics is None and not embodiment.kinematics:
            raise ValueError(f"{embodiment.name}: ee_delta actions need a kinematics model "
                             "(the embodiment's 'kinematics' field)")
        self.embodiment = embodiment
        self.names = list(EE_DELTA_NAMES)
        self.dim = len(self.names)
        self.binary_dims = [self.names.index("gripper")]
        self._kinematics = kinematics
        self._arm: list[int] | None = None
        self.gripper = embodiment.joint_names.index(embodiment.gripper_joint)

    @property
    def kinematics(self):
        """The arm's kinematics (built on first use: Pinocchio and xacro are slow to load)."""
        if self._kinematics is None:
            from .kinematics import ArmKinematics

            self._kinematics = ArmKinematics.load(self.embodiment.kinematics)
        return self._kinematics

    @property
    def arm(self) -> list[int]:
        """Embodiment indices of the kinematics model's arm joints, in its order."""
        if self._arm is None:
            names = self.embodiment.joint_names
            missing = [n for n in self.kinematics.joint_names if n not in names]
            if missing:
                raise ValueError(f"kinematics joints {missing} are not in "
                                 f"{self.embodiment.name}'s joint_names")
            self._arm = [names.index(n) for n in self.kinematics.joint_names]
        return self._arm

    def decode(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """(H, 7) actions and the measured joints -> (H', n_joints) targets, H' <= H.

        Targets chain; after the first unreachable pose the rest of the chunk is void too and
        is cut off. Joints neither in the arm nor the gripper keep their measured value.

        Raises:
            ChunkRejected: the first target cannot be reached (cause `ik_failed`).
        """
        emb = self.embodiment
        actions = np.asarray(actions, dtype=np.float64).reshape(-1, self.dim)
        state = np.asarray(state, dtype=np.float64)
        arm, converged = self.kinematics.ee_deltas_to_joint_targets(state[self.arm],
                                                                    actions[:, :6])
        reachable = int(np.argmin(converged)) if not np.all(converged) else len(converged)
        if reachable == 0:
            raise ChunkRejected("ik_failed", "inverse kinematics found no joint solution for "
                                             "the chunk's first end-effector target")
        targets = np.tile(state, (reachable, 1))
        targets[:, self.arm] = arm[:reachable]
        closed = actions[:reachable, self.binary_dims[0]] < 0.5
        targets[:, self.gripper] = np.where(closed, emb.gripper_closed_position,
                                            emb.gripper_open_position)
        return targets

    def encode(self, states: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """(T, n) joint states and the (T, n) targets that followed -> (T, 7) actions.

        The end-effector motion from the forward kinematics of each state to that of its
        target; the gripper is 1 (open) when the target finger is past the midpoint of the open
        and closed positions towards open. Rows with non-finite values give zeros.
        """
        from .kinematics import rotation_to_rpy

        emb = self.embodiment
        states = np.asarray(states, dtype=np.float64)
        targets = np.asarray(targets, dtype=np.float64)
        actions = np.zeros((len(states), self.dim))
        for k in range(len(states)):
            if not (np.isfinite(states[k]).all() and np.isfinite(targets[k]).all()):
                continue
            pose0 = np.asarray(self.kinematics.fk(states[k, self.arm]))
            pose1 = np.asarray(self.kinematics.fk(targets[k, self.arm]))
            actions[k, :3] = pose1[:3, 3] - pose0[:3, 3]
            actions[k, 3:6] = rotation_to_rpy(pose1[:3, :3] @ pose0[:3, :3].T)
        middle = 0.5 * (emb.gripper_open_position + emb.gripper_closed_position)
        towards_open = np.sign(emb.gripper_open_position - emb.gripper_closed_position)
        actions[:, self.binary_dims[0]] = ((targets[:, self.gripper] - middle) * towards_open
                                           > 0).astype(float)
        return actions


ACTION_SPACES = {space.kind: space for space in (JointPositionActions, EEDeltaActions)}


def action_space_for(embodiment: Embodiment, kinematics=None):
    """The action space object of an embodiment (`kinematics`: an ee_delta arm to use)."""
    cls = ACTION_SPACES[embodiment.action_space]
    return cls(embodiment, kinematics) if cls is EEDeltaActions else cls(embodiment)
