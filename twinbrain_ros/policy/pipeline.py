"""One control cycle without ROS: observation -> model -> joint targets -> schedule -> safety.

The ROS node feeds it snapshots and publishes what it returns; evaluation loops and tests use it
directly.
"""

from __future__ import annotations

__all__ = ["ChunkRejected", "CycleResult", "PolicyPipeline"]

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..robot.action_spaces import ChunkRejected
from ..robot.embodiment import Embodiment
from .runtime import ActionChunk, Observation
from .safety import SafetyFilter, hold_trajectory
from .scheduler import ActionChunkScheduler, Trajectory


@dataclass
class CycleResult:
    """What one cycle produced."""

    trajectory: Trajectory
    chunk: ActionChunk
    dropped_actions: int   # actions whose time had passed when the chunk was ready


class PolicyPipeline:
    """Runs the model on snapshots and keeps the executing plan smooth and safe."""

    def __init__(self, runtime, embodiment: Embodiment, blend_steps: int = 3,
                 actions=None):
        """Schedule and check the chunks `runtime` infers.

        Args:
            runtime: anything with `infer(Observation) -> ActionChunk` (a `PolicyRuntime`).
            embodiment: the robot.
            blend_steps: points of a new chunk cross-faded with the executing plan.
            actions: the action space decoding chunks (default: the embodiment's own).
        """
        self.runtime = runtime
        self.embodiment = embodiment
        self.actions = actions or embodiment.actions
        self.scheduler = ActionChunkScheduler(embodiment.dt, blend_steps)
        self.safety = SafetyFilter(embodiment.lower, embodiment.upper, embodiment.max_step,
                                   embodiment.dt)

    def cycle(self, observation: Observation, observation_time: float,
              clock: Callable[[], float],
              measured: Callable[[], np.ndarray] | None = None) -> CycleResult:
        """Infer, convert, schedule and check one chunk (`infer`, then `plan`).

        Args:
            observation: the snapshot (state in `embodiment.joint_names` order).
            observation_time: when the snapshot's joint state was taken (clock seconds).
            clock: returns the current time on the same clock, read after inference.
            measured: returns the newest measured joint position, read after inference (the
                trajectory starts from it); None uses the observation's state.

        Raises:
            ChunkRejected: when the chunk must not be executed (non-finite output, failed
                inverse kinematics, all actions already past); the caller holds still.
            StateOutOfRange: the observed or measured state is outside the joint limits.
            Exception: whatever the model raised.
        """
        chunk = self.infer(observation)
        return self.plan(chunk, observation, observation_time, clock, measured)

    def infer(self, observation: Observation) -> ActionChunk:
        """Run the model on a snapshot whose state lies within the joint limits."""
        self.safety.check_state(observation.state, self.embodiment.joint_names)
        chunk = self.runtime.infer(observation)
        if not np.isfinite(chunk.actions).all():
            raise ChunkRejected("non_finite_actions", "the model returned non-finite actions")
        return chunk

    def plan(self, chunk: ActionChunk, observation: Observation, observation_time: float,
             clock: Callable[[], float],
             measured: Callable[[], np.ndarray] | None = None) -> CycleResult:
        """Turn a chunk into the executing plan and the trajectory to publish (see `cycle`)."""
        targets = self.decode(chunk, observation)
        return self.schedule(chunk, targets, observation, observation_time, clock, measured)

    def decode(self, chunk: ActionChunk, observation: Observation) -> np.ndarray:
        """The chunk's joint targets (inverse kinematics for end-effector actions)."""
        return self.actions.decode(chunk.actions, observation.state)

    def schedule(self, chunk: ActionChunk, targets: np.ndarray, observation: Observation,
                 observation_time: float, clock: Callable[[], float],
                 measured: Callable[[], np.ndarray] | None = None) -> CycleResult:
        """Merge decoded targets into the executing plan, check them, make the trajectory."""
        names = self.embodiment.joint_names
        now = clock()
        plan = self.scheduler.merge(targets, observation_time, now)
        if plan is None:
            raise ChunkRejected("chunk_too_late", f"all {len(targets)} actions of the chunk were "
                                                  "in the past when it was ready")
        position = observation.state if measured is None else measured()
        start = self.safety.check_state(position, names)
        try:
            plan = self.safety.apply(plan, now, start)
        except ValueError as error:
            raise ChunkRejected("unsafe_targets", str(error)) from error
        self.scheduler.commit(plan)
        trajectory = self.scheduler.trajectory(names, now, start)
        return CycleResult(trajectory=trajectory, chunk=chunk,
                           dropped_actions=len(targets) - len(plan.times))

    def hold(self, position: np.ndarray, now: float) -> Trajectory:
        """Forget the plan and keep the robot at `position` (clipped into the joint limits).

        Raises:
            StateOutOfRange: `position` is outside the limits by more than one step; nothing
                safe can be commanded from it.
            ValueError: `position` is not finite.
        """
        self.scheduler.reset()
        position = np.asarray(position, dtype=np.float64)
        if not np.isfinite(position).all():
            raise ValueError("cannot hold at a non-finite position")
        position = self.safety.check_state(position, self.embodiment.joint_names)
        return hold_trajectory(self.embodiment.joint_names, now, position, self.embodiment.dt)
