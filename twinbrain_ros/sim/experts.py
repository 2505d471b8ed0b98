"""The scripted top-down pick (and place) of the WidowX backends, in Bridge end-effector deltas.

One phase machine, one method per phase: approach (above the grasp point, the gripper turned to
the grasp yaw), descend, close, lift; to place, then carry (over the drop point), lower,
release, retreat. A grasp that does not lift the object is retried from the approach, and an
object dropped on the way is picked up again. Every action is computed from the *measured*
end-effector pose and the objects' current poses, so the expert closes the loop on tracking
errors and on objects that moved.

What differs between simulators is the geometry (`TopDownGeometry`: where to grasp, at which
yaw, where to drop, how high the object is) and a few numbers of the motion (`TopDownMotion`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..robot.action_spaces import GRIPPER_CLOSED, GRIPPER_OPEN
from ..robot.kinematics import bounded_pose_delta, rotation_angle, top_down_rotation
from .base import ScriptedExpert

PHASES = ("approach", "descend", "close", "lift", "carry", "lower", "release", "retreat")


class TopDownGeometry(ABC):
    """Where a backend's expert grasps and drops, in the arm's base frame."""

    @abstractmethod
    def ee_pose(self) -> np.ndarray:
        """The measured 4x4 end-effector pose."""

    @abstractmethod
    def grasp(self) -> tuple[np.ndarray, float]:
        """The end effector's grasp point on the object now, and the fingers' yaw there."""

    @abstractmethod
    def lift_height(self) -> float:
        """How far the object is above where it rested at the episode's start (m)."""

    def drop(self, pose: np.ndarray) -> np.ndarray | None:
        """The end effector's goal that lets the object go on its target; None: pick only."""
        return None


@dataclass(frozen=True)
class TopDownMotion:
    """The numbers of a top-down pick and place.

    Attributes:
        lift: how high the end effector rises above the grasp height (m).
        grasp_tolerance: the descent ends this close to the grasp point (m).
        drop_tolerance: the lowering ends this close to the drop point (m).
        carry_height: the carry's height above the drop point (m); None: level, no lower than
            the drop point.
        max_translation: largest translation per action (m).
        max_rotation: largest rotation per action (rad).
        hover: height above the grasp (and release) point of the approach and retreat (m).
        close_steps, release_steps: control periods the gripper takes to close, to open.
        done_periods: periods hovering after the release that finish the task.
    """

    lift: float
    grasp_tolerance: float
    drop_tolerance: float
    carry_height: float | None
    max_translation: float
    max_rotation: float
    hover: float = 0.07
    close_steps: int = 3
    release_steps: int = 2
    done_periods: int = 3


class TopDownPickPlace(ScriptedExpert):
    """Pick the object from above (and put it on its target), as Bridge end-effector deltas.

    Attributes:
        phase: the current phase (one of `PHASES`).
        retries: grasps that did not lift the object.
    """

    def __init__(self, geometry: TopDownGeometry, motion: TopDownMotion):
        """Start in the approach phase with the gripper open."""
        self.geometry, self.motion = geometry, motion
        self.phase = "approach"
        self.retries = 0
        self._counter = 0
        self._yaw: float | None = None
        self._grasped = np.zeros(3)      # where the descent ended
        self._released = np.zeros(3)     # where the gripper opened over the target
        self._held_still = 0             # periods hovering after the release

    @property
    def done(self) -> bool:
        """Released and back at the hover height for `done_periods` periods."""
        return self._held_still >= self.motion.done_periods

    def act(self) -> np.ndarray:
        """The next action: 6 end-effector deltas and the gripper (1 open, 0 closed)."""
        self._pose = pose = self.geometry.ee_pose()
        self._position = pose[:3, 3]
        self._grasp, yaw = self.geometry.grasp()
        if self._yaw is None or self.phase == "approach":
            self._yaw = yaw
        self._orientation = top_down_rotation(self._yaw)
        goal, gripper = self._position, GRIPPER_OPEN
        # Phases in order: one that completes hands over to the next within the same call.
        for phase in PHASES:
            if self.phase == phase:
                goal, gripper = getattr(self, f"_{phase}")()
        delta = bounded_pose_delta(pose, goal, self._orientation, self.motion.max_translation,
                                   self.motion.max_rotation)
        return np.concatenate([delta, [gripper]])

    def _error(self, goal: np.ndarray) -> float:
        return float(np.linalg.norm(goal - self._position))

    def _above_grasp(self) -> np.ndarray:
        return self._grasp + (0.0, 0.0, self.motion.hover)

    def _approach(self):
        goal = self._above_grasp()
        if (np.linalg.norm(goal[:2] - self._position[:2]) < 0.01 and self._error(goal) < 0.02
                and rotation_angle(self._orientation, self._pose[:3, :3]) < 0.08):
            self.phase = "descend"
        return goal, GRIPPER_OPEN

    def _descend(self):
        goal = self._grasp
        if self._error(goal) < self.motion.grasp_tolerance:
            self.phase, self._counter = "close", 0
            self._grasped = goal.copy()
        return goal, GRIPPER_OPEN

    def _close(self):
        self._counter += 1
        if self._counter > self.motion.close_steps:
            self.phase = "lift"
        return self._grasp, GRIPPER_CLOSED

    def _lift(self):
        goal = self._grasped + (0.0, 0.0, self.motion.lift)
        raised = self._position[2] - self._grasped[2]
        if raised > 0.03 and self.geometry.lift_height() < raised - 0.02:
            # The object stayed behind: open and try again.
            self.phase, self.retries = "approach", self.retries + 1
            return self._above_grasp(), GRIPPER_OPEN
        if raised > self.motion.lift - 0.02 and self.geometry.drop(self._pose) is not None:
            self.phase = "carry"
        return goal, GRIPPER_CLOSED

    def _carry(self):
        if self.geometry.lift_height() < 0.01:
            self.phase = "approach"  # dropped on the way: pick it up again
            return self._above_grasp(), GRIPPER_OPEN
        drop = self.geometry.drop(self._pose)
        if self.motion.carry_height is None:
            goal = np.array([drop[0], drop[1], max(drop[2], self._position[2])])
        else:
            goal = drop + (0.0, 0.0, self.motion.carry_height)
        if np.linalg.norm(goal[:2] - self._position[:2]) < 0.01:
            self.phase = "lower"
        return goal, GRIPPER_CLOSED

    def _lower(self):
        goal = self.geometry.drop(self._pose)
        if self._error(goal) < self.motion.drop_tolerance:
            self.phase, self._counter = "release", 0
        return goal, GRIPPER_CLOSED

    def _release(self):
        self._counter += 1
        if self._counter > self.motion.release_steps:
            self.phase = "retreat"
            self._released = self._position.copy()
        return self._position.copy(), GRIPPER_OPEN

    def _retreat(self):
        goal = self._released + (0.0, 0.0, self.motion.hover)
        self._held_still = self._held_still + 1 if self._error(goal) < 0.01 else 0
        return goal, GRIPPER_OPEN
