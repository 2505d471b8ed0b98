"""Model actions in an embodiment's action space -> absolute joint position targets.

Below both the policy runtime and the simulators: the policy node turns the model's chunks into
joint targets with it, and scripted experts in simulation act in the same action space through
it, so demonstrations and policy outputs are executed identically. No torch, no ROS.
"""

from __future__ import annotations

import numpy as np

from .embodiment import Embodiment
from .errors import CausedError


class ChunkRejected(CausedError, RuntimeError):
    """A chunk that must not be executed; `cause` is a short key for diagnostics."""


class ActionConverter:
    """Model actions (raw units) -> absolute joint targets in `embodiment.joint_names` order."""

    def __init__(self, embodiment: Embodiment, kinematics=None):
        """For `ee_delta` embodiments, builds the arm kinematics unless one is given."""
        self.embodiment = embodiment
        self.kinematics = kinematics
        if embodiment.action_space == "ee_delta" and kinematics is None:
            from .kinematics import ArmKinematics

            self.kinematics = ArmKinematics.widowx()
        if embodiment.action_space == "ee_delta":
            if not embodiment.gripper_joint:
                raise ValueError(f"{embodiment.name}: ee_delta actions need a gripper_joint")
            self.arm = [i for i, n in enumerate(embodiment.joint_names)
                        if n != embodiment.gripper_joint]
            self.gripper = embodiment.joint_names.index(embodiment.gripper_joint)

    def __call__(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """(H, action_dim) actions and the current joint state -> (H, n_joints) targets."""
        emb = self.embodiment
        if emb.action_space == "joint_position":
            return np.asarray(actions, dtype=np.float64)
        arm, converged = self.kinematics.ee_deltas_to_joint_targets(
            np.asarray(state, float)[self.arm], np.asarray(actions[:, :6], float))
        # Targets chain: after the first unreachable pose the rest of the chunk is void too.
        reachable = int(np.argmin(converged)) if not np.all(converged) else len(converged)
        if reachable == 0:
            raise ChunkRejected("ik_failed", "inverse kinematics found no joint solution for "
                                             "the chunk's first end-effector target")
        actions, arm = actions[:reachable], arm[:reachable]
        targets = np.empty((reachable, len(emb.joint_names)))
        targets[:, self.arm] = arm
        closed = np.asarray(actions[:, 6]) < 0.5
        targets[:, self.gripper] = np.where(closed, emb.gripper_closed_position,
                                            emb.gripper_open_position)
        return targets
