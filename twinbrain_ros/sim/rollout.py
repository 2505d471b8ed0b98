"""Driving a simulated robot as the sim bridge drives it, and episodes of per-period actions.

Joint trajectories go to a `TrajectoryFollower` (a joint trajectory controller with the robot's
velocity limits), and the simulator steps at its own rate towards the follower's command
(`SimulatedRobot`). `run_episode` drives it with a scripted expert, or any callable giving one
action per control period in the embodiment's action space: each action is decoded by the
embodiment's action space (inverse kinematics for Bridge end-effector deltas) and sent as a
one-point trajectory reached one period later, as the bridge's `expert` mode publishes it.
Recording what the expert saw and did gives training demonstrations in the policy's own action
space (`twinbrain_ros.sim.record`). Policy episodes (the policy loop on this robot) are in
`twinbrain_ros.evaluation.rollout`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..robot.action_spaces import ChunkRejected
from .base import Episode, SimBackend
from .follower import TrajectoryFollower


@dataclass
class EpisodeResult:
    """One episode: how it ended, and per control step the frames, states and actions kept."""

    episode: Episode
    success: bool = False
    steps: int = 0
    frames: list[list[np.ndarray]] = field(default_factory=list)  # [step][camera] HxWx3
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    rejected: int = 0          # actions or cycles that could not be turned into joint targets
    trajectories: int = 0      # trajectories sent to the follower
    holds: int = 0             # failed policy cycles (the robot held)
    hold_causes: dict = field(default_factory=dict)  # cause -> count of those holds
    outcome: dict = field(default_factory=dict)
    final_state: list[float] = field(default_factory=list)  # joint positions at the end
    motion: object = None  # policy episodes: a `MotionLog` of commanded and measured joints


def substeps_per_control(backend: SimBackend) -> int:
    """Simulator steps per control period (at least one)."""
    return max(1, round(backend.embodiment.dt / backend.sim_dt))


class SimulatedRobot:
    """A backend driven through a trajectory follower, on the backend's own clock."""

    def __init__(self, backend: SimBackend):
        """Follow from the backend's current joint positions (call after a reset)."""
        emb = backend.embodiment
        self.backend = backend
        q, _ = backend.joint_state()
        self.follower = TrajectoryFollower(emb.joint_names, emb.lower, emb.upper, q,
                                           max_velocity=emb.max_velocity)
        self.follower.reset(q, now=backend.time)
        self.substeps = substeps_per_control(backend)

    @property
    def time(self) -> float:
        """The simulated time."""
        return self.backend.time

    def send(self, joint_names: list[str], time_from_start: np.ndarray, positions: np.ndarray,
             start_time: float | None = None) -> int:
        """Execute a trajectory (starting now unless `start_time` is given)."""
        now = self.time
        return self.follower.receive(list(joint_names), np.asarray(time_from_start, float),
                                     np.asarray(positions, float),
                                     now if start_time is None else start_time, now)

    def step(self, substeps: int | None = None) -> None:
        """Advance one control period (or `substeps` simulator steps)."""
        backend = self.backend
        for _ in range(self.substeps if substeps is None else substeps):
            backend.step(self.follower.advance(backend.time + backend.sim_dt))


def start_episode(backend: SimBackend, seed: int, max_steps: int = 0
                  ) -> tuple[Episode, SimulatedRobot]:
    """Reset to the seeded episode (cut to `max_steps` periods when given); its robot."""
    episode = backend.reset(seed)
    if max_steps > 0:
        episode = dataclasses.replace(episode, max_steps=int(max_steps))
    return episode, SimulatedRobot(backend)


def run_episode(backend: SimBackend, seed: int,
                policy: Callable[[list[np.ndarray], np.ndarray, Episode], np.ndarray] | None
                = None, actions=None, record: bool = False, render: bool = True,
                stop_on_success: bool | None = None, stop_when_done: bool = False,
                max_steps: int = 0) -> EpisodeResult:
    """Run one seeded episode with the scripted expert (default) or `policy`.

    Args:
        backend: the simulator.
        seed: the episode seed (scene layout, target object, instruction).
        policy: `(frames, state, episode) -> action` in the embodiment's action space, one per
            control period; None uses the backend's scripted expert.
        actions: the action space decoding per-period actions (the embodiment's own when None).
        record: keep frames, states and actions (demonstrations).
        render: render cameras every control step (needed by `record` and image policies).
        stop_on_success: end the episode at the first control step where it succeeded (None:
            unless the backend judges episodes at their end, `judge_at_end`).
        stop_when_done: end the episode once it succeeds and the scripted expert says it is
            `done` (demonstrations of backends that judge at the end).
        max_steps: the episode's length in control periods (0: the task's own limit).

    Returns:
        The episode's result; `success` is whether the goal held at the end.
    """
    emb = backend.embodiment
    actions = actions or emb.actions
    episode, robot = start_episode(backend, seed, max_steps)
    if stop_on_success is None:
        stop_on_success = not backend.judge_at_end
    expert = backend.expert() if policy is None else None
    result = EpisodeResult(episode=episode)
    for step in range(episode.max_steps):
        q, _ = backend.joint_state()
        frames = backend.render() if (render or record) else []
        action = expert.act() if expert is not None else policy(frames, q, episode)
        action = np.asarray(action, dtype=np.float64)
        try:
            targets = actions.decode(action[None], q)[:1]
        except ChunkRejected:
            result.rejected += 1
        else:
            robot.send(emb.joint_names, [emb.dt], targets)
            result.trajectories += 1
        if record:
            result.frames.append(frames)
            result.states.append(q.astype(np.float32))
            result.actions.append(action.astype(np.float32))
        robot.step()
        result.steps = step + 1
        if stop_on_success and backend.success():
            break
        if stop_when_done and expert is not None and expert.done and backend.success():
            break
    return finish_episode(backend, result)


def finish_episode(backend: SimBackend, result: EpisodeResult) -> EpisodeResult:
    """Note the episode's outcome, judged by the backend now, and the final joint state."""
    result.success = bool(backend.success())
    result.outcome = dict(backend.outcome())
    result.final_state = [round(float(v), 5) for v in backend.joint_state()[0]]
    return result
