"""One control cycle without ROS: observation -> model -> joint targets -> schedule -> safety.

The ROS node feeds it snapshots and publishes what it returns; evaluation loops and tests use it
directly.
"""

from __future__ import annotations

__all__ = ["ActionConverter", "ChunkRejected", "CycleResult", "PolicyPipeline"]

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..actions import ActionConverter, ChunkRejected
from ..embodiment import Embodiment
from .runtime import ActionChunk, Observation
from .scheduler import ActionChunkScheduler, SafetyFilter, Trajectory, hold_trajectory


@dataclass
class CycleResult:
    """What one cycle produced."""

    trajectory: Trajectory
    chunk: ActionChunk
    dropped_actions: int   # actions whose time had passed when the chunk was ready


class PolicyPipeline:
    """Runs the model on snapshots and keeps the executing plan smooth and safe."""

    def __init__(self, runtime, embodiment: Embodiment, blend_steps: int = 3,
                 converter: ActionConverter | None = None):
        """`runtime`: anything with `infer(Observation) -> ActionChunk` (a `PolicyRuntime`)."""
        self.runtime = runtime
        self.embodiment = embodiment
        self.converter = converter or ActionConverter(embodiment)
        self.scheduler = ActionChunkScheduler(embodiment.dt, blend_steps)
        self.safety = SafetyFilter(embodiment.lower, embodiment.upper, embodiment.max_step,
                                   embodiment.dt)

    def cycle(self, observation: Observation, observation_time: float,
              clock: Callable[[], float]) -> CycleResult:
        """Infer, convert, schedule and check one chunk.

        Args:
            observation: the snapshot (state in `embodiment.joint_names` order).
            observation_time: when the snapshot's joint state was taken (clock seconds).
            clock: returns the current time on the same clock, read after inference.

        Raises:
            ChunkRejected: when the chunk must not be executed (non-finite output, failed
                inverse kinematics, all actions already past); the caller holds still.
            Exception: whatever the model raised.
        """
        chunk = self.runtime.infer(observation)
        if not np.isfinite(chunk.actions).all():
            raise ChunkRejected("non_finite_actions", "the model returned non-finite actions")
        targets = self.converter(chunk.actions, observation.state)
        now = clock()
        plan = self.scheduler.merge(targets, observation_time, now)
        if plan is None:
            raise ChunkRejected("chunk_too_late", f"all {len(targets)} actions of the chunk were "
                                                  "in the past when it was ready")
        start = self.scheduler.commanded_position(now)
        if start is None:
            start = np.asarray(observation.state, dtype=np.float64)
        try:
            plan = self.safety.apply(plan, now, start)
        except ValueError as error:
            raise ChunkRejected("unsafe_targets", str(error)) from error
        self.scheduler.commit(plan)
        trajectory = self.scheduler.trajectory(self.embodiment.joint_names, now, start)
        return CycleResult(trajectory=trajectory, chunk=chunk,
                           dropped_actions=len(targets) - len(plan.times))

    def hold(self, position: np.ndarray, now: float) -> Trajectory:
        """Forget the plan and keep the robot at `position`."""
        self.scheduler.reset()
        return hold_trajectory(self.embodiment.joint_names, now, position, self.embodiment.dt)
