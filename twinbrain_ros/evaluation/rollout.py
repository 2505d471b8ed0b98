"""Policy episodes in this process: the policy loop on a simulated robot, on simulated time.

The loop (`twinbrain_ros.policy.loop.PolicyLoop`) is the policy node's, with the simulated
robot as its I/O: the backend's cameras and joints, the sim bridge's trajectory follower, the
simulated clock. Cycles start at control-period boundaries, when the loop says one is due (every
`actions_per_inference` periods; one period after a cycle that planned nothing). The simulation
waits for the model; with `inference_delay_s` the chunk is joined into the plan that much
simulated time later, while the robot goes on executing its plan, and the next cycle starts no
earlier. Every episode keeps a `MotionLog` for the motion metrics, and a rerun log when given
one.
"""

from __future__ import annotations

import numpy as np

from ..policy.config import PolicyConfig
from ..policy.loop import PolicyLoop, Snapshot
from ..policy.pipeline import PolicyPipeline
from ..policy.scheduler import Trajectory
from ..robot.observation import Observation
from ..sim.base import SimBackend
from ..sim.rollout import EpisodeResult, SimulatedRobot, finish_episode, start_episode
from .motion import MotionLog


class SimulatedIO:
    """A simulated robot as the policy loop sees it (`twinbrain_ros.policy.loop.PolicyIO`)."""

    def __init__(self, robot: SimulatedRobot, instruction: str, result: EpisodeResult):
        """Observe and drive `robot` for an episode of `instruction`, noting into `result`."""
        self.robot, self.backend = robot, robot.backend
        self.instruction = instruction
        self.result = result
        self.frames: list[np.ndarray] | None = None  # this period's render, when made

    def now(self) -> float:
        """Simulated time."""
        return self.robot.time

    def render(self) -> list[np.ndarray]:
        """The cameras now (rendered once per control period)."""
        if self.frames is None:
            self.frames = self.backend.render()
        return self.frames

    def observe(self) -> Snapshot:
        """What the cameras and joints show now (always consistent and fresh)."""
        state = np.asarray(self.backend.joint_state()[0], dtype=np.float64)
        return Snapshot(Observation(images=list(self.render()), state=state,
                                    instruction=self.instruction), self.robot.time)

    def measured(self, max_age: float | None = None) -> np.ndarray:
        """The simulated joints now."""
        return self.backend.joint_state()[0]

    def send(self, trajectory: Trajectory) -> bool:
        """Execute a trajectory from now, as the bridge's controller does."""
        self.robot.send(trajectory.joint_names, trajectory.time_from_start,
                        trajectory.positions)
        hold = trajectory.is_hold
        if not hold:
            self.result.trajectories += 1
        self.result.motion.trajectory(self.robot.time, hold=hold)
        return True


def run_policy_episode(backend: SimBackend, seed: int, pipeline: PolicyPipeline,
                       config: PolicyConfig, keep_frames: bool = False, logs=None,
                       max_steps: int = 0, stop_on_success: bool | None = None
                       ) -> EpisodeResult:
    """One seeded episode driven by the policy loop; its result.

    Args:
        backend: the simulator.
        seed: the episode seed.
        pipeline: the policy's stages (its plan is reset for the episode).
        config: the loop's settings (cadence, inference delay).
        keep_frames: keep every control period's frames (videos).
        logs: a `CycleLogs` for the episode's rerun log (None: none).
        max_steps: the episode's length in control periods (0: the task's own limit).
        stop_on_success: end at the first period where the task succeeded (None: unless the
            backend judges episodes at their end).

    Returns:
        The result: outcome, trajectories sent, failed cycles by cause (`hold_causes`), the
        motion log.
    """
    emb = backend.embodiment
    if stop_on_success is None:
        stop_on_success = not backend.judge_at_end
    episode, robot = start_episode(backend, seed, max_steps)
    result = EpisodeResult(episode=episode, motion=MotionLog.for_embodiment(emb))
    io = SimulatedIO(robot, episode.instruction, result)
    loop = PolicyLoop(pipeline, config, io, logs=logs)
    loop.reset()
    loop.open_log(0, episode.instruction)
    for step in range(episode.max_steps):
        io.frames = None
        q, _ = backend.joint_state()
        result.motion.sample(robot.time, robot.follower.sample(robot.time), q)
        loop.log_measured(robot.time, q)
        # What is due at this period's start: a delayed chunk, then a new cycle.
        while loop.next_due() <= robot.time + 1e-9:
            loop.tick()
        if keep_frames:
            result.frames.append(io.render())
        ready = loop.pending_ready
        if ready is not None and ready < robot.time + emb.dt - 1e-9:
            # The chunk is ready within this period: run the robot up to then, deliver it.
            substeps = min(robot.substeps, max(0, round((ready - robot.time) / backend.sim_dt)))
            robot.step(substeps)
            loop.tick(deliver=True)  # its time has come, to the simulator's step
            robot.step(robot.substeps - substeps)
        else:
            robot.step()
        result.steps = step + 1
        if stop_on_success and backend.success():
            break
    result.holds = result.rejected = sum(loop.failures.values())
    result.hold_causes = dict(loop.failures)
    return finish_episode(backend, result)
