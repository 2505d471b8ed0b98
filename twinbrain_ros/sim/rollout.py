"""Closed loops without ROS, with the same pieces as the ROS path.

The simulated robot is driven exactly as the sim bridge drives it: joint trajectories go to a
`TrajectoryFollower` (a joint trajectory controller with the robot's velocity limits), and the
simulator steps at its own rate towards the follower's command. What sends the trajectories:

- a scripted expert, or any callable giving one action per control period in the embodiment's
  action space: each action is decoded by the embodiment's action space (inverse kinematics for
  Bridge end-effector deltas) and sent as a one-point trajectory reached one period later, as
  the bridge's `expert` mode publishes it. Recording what the expert saw and did gives training
  demonstrations in the policy's own action space;
- a policy pipeline (`twinbrain_ros.policy.pipeline.PolicyPipeline`, the code the policy node
  runs): every `actions_per_inference` control periods it gets the latest observation and
  returns the trajectory to send; a cycle that fails holds the robot at its measured position
  and the next control period plans again, as in the node. Inference takes `inference_delay_s`
  of simulated time (0 by default: the simulation waits for the model): the robot goes on
  executing its plan meanwhile, the chunk is joined into the plan when that time has passed,
  and the next cycle starts no earlier, as the node's worker does.

Every policy episode keeps a `MotionLog` (commanded and measured joints per control period,
trajectories sent) for the motion metrics, and writes its cycles to a recorder when given one
(`twinbrain_ros.policy.recording.CycleRecorder`).

This module does not import the policy layer: the pipeline is passed in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..robot.action_spaces import ChunkRejected
from ..robot.observation import Observation
from .base import Episode, SimBackend
from .follower import TrajectoryFollower
from .motion import MotionLog


@dataclass
class EpisodeRecord:
    """One episode: per control step the frames seen, the state and the action taken."""

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
    motion: MotionLog | None = None  # policy episodes: commanded and measured joints


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


def run_episode(backend: SimBackend, seed: int,
                policy: Callable[[list[np.ndarray], np.ndarray, Episode], np.ndarray] | None
                = None, actions=None, record: bool = False, render: bool = True,
                stop_on_success: bool | None = None, stop_when_done: bool = False,
                pipeline=None,
                actions_per_inference: int = 1, inference_delay_s: float = 0.0,
                recorder=None, max_steps: int = 0) -> EpisodeRecord:
    """Run one seeded episode with the scripted expert (default), `policy` or `pipeline`.

    Args:
        backend: the simulator.
        seed: the episode seed (scene layout, target object, instruction).
        policy: `(frames, state, episode) -> action` in the embodiment's action space, one per
            control period; None (and no `pipeline`) uses the backend's scripted expert.
        actions: the action space decoding per-period actions (the embodiment's own when None).
        record: keep frames and states (and, for per-period drivers, actions: demonstrations).
        render: render cameras every control step (needed by `record` and image policies).
        stop_on_success: end the episode at the first control step where it succeeded (None:
            unless the backend judges episodes at their end, `judge_at_end`).
        stop_when_done: end the episode once it succeeds and the scripted expert says it is
            `done` (demonstrations of backends that judge at the end).
        pipeline: a `PolicyPipeline` (the policy node's cycle); it replans every
            `actions_per_inference` control periods.
        actions_per_inference: the pipeline's replanning period in control periods.
        inference_delay_s: simulated time that passes while the pipeline infers.
        recorder: a `CycleRecorder` for the policy's cycles (None: none).
        max_steps: the episode's length in control periods (0: the task's own limit).

    Returns:
        The episode record; `success` is whether the goal held at the end.
    """
    emb = backend.embodiment
    actions = actions or emb.actions
    if stop_on_success is None:
        stop_on_success = not backend.judge_at_end
    episode = backend.reset(seed)
    if max_steps > 0:
        episode = dataclasses.replace(episode, max_steps=int(max_steps))
    robot = SimulatedRobot(backend)
    expert = backend.expert() if policy is None and pipeline is None else None
    result = EpisodeRecord(episode=episode)
    if pipeline is not None:
        pipeline.scheduler.reset()  # a new episode: nothing of the last one's plan is left
        result.motion = MotionLog.for_embodiment(emb)
        if recorder is not None:
            recorder.instruction(robot.time, episode.instruction)
        return _run_policy(backend, robot, pipeline, episode, result, actions_per_inference,
                           inference_delay_s, stop_on_success, recorder, record)
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
    return _finish(backend, result)


def _finish(backend: SimBackend, result: EpisodeRecord) -> EpisodeRecord:
    result.success = bool(backend.success())
    result.outcome = dict(backend.outcome())
    result.final_state = [round(float(v), 5) for v in backend.joint_state()[0]]
    return result


@dataclass
class _Pending:
    """A cycle whose chunk is ready at `ready` (simulated time)."""

    ready: float
    observation: Observation
    observation_time: float
    chunk: object = None
    error: Exception | None = None


def _run_policy(backend, robot: SimulatedRobot, pipeline, episode, result: EpisodeRecord,
                actions_per_inference: int, inference_delay_s: float, stop_on_success: bool,
                recorder, record: bool) -> EpisodeRecord:
    """The policy node's loop on the simulated robot, one control period per iteration."""
    emb = backend.embodiment
    dt = emb.dt
    delay = max(0.0, float(inference_delay_s))
    busy_steps = math.ceil(delay / dt - 1e-9)  # control periods a cycle keeps the worker busy
    pending: _Pending | None = None
    next_cycle = 0
    motion = result.motion
    for step in range(episode.max_steps):
        q, _ = backend.joint_state()
        motion.sample(robot.time, robot.follower.sample(robot.time), q)
        if recorder is not None:
            recorder.measured(robot.time, q)
        if pending is not None and pending.ready <= robot.time + 1e-9:
            _deliver(pipeline, robot, pending, result, recorder)  # ready at this period's start
            pending = None
        starts = pending is None and step >= next_cycle
        frames = backend.render() if (starts or record) else []
        if record:
            result.frames.append(frames)
            result.states.append(q.astype(np.float32))
        if starts:
            pending = _start_cycle(pipeline, robot, frames, q, episode, delay, recorder)
            planned = pending.error is None
            next_cycle = step + max(max(1, int(actions_per_inference)) if planned else 1,
                                    busy_steps)
        if pending is not None and pending.ready < robot.time + dt - 1e-9:
            # The chunk is ready within this period: run the robot up to then, deliver it.
            substeps = min(robot.substeps, max(0, round((pending.ready - robot.time)
                                                        / backend.sim_dt)))
            robot.step(substeps)
            _deliver(pipeline, robot, pending, result, recorder)
            pending = None
            robot.step(robot.substeps - substeps)
        else:
            robot.step()
        result.steps = step + 1
        if stop_on_success and backend.success():
            break
    return _finish(backend, result)


def _start_cycle(pipeline, robot: SimulatedRobot, frames, q, episode, delay: float,
                 recorder) -> _Pending:
    """Observe and infer now; the chunk counts as ready `delay` seconds later."""
    now = robot.time
    observation = Observation(images=list(frames), state=np.asarray(q, dtype=np.float64),
                              instruction=episode.instruction)
    if recorder is not None:
        recorder.observation(now, observation.images)
    pending = _Pending(ready=now + delay, observation=observation, observation_time=now)
    try:
        prefix = pipeline.prepare(observation, now)
        pending.chunk = pipeline.infer(observation, prefix)
    except Exception as error:  # noqa: BLE001 - as in the node: whatever failed, the robot holds
        pending.error = error
    return pending


def _deliver(pipeline, robot: SimulatedRobot, pending: _Pending, result: EpisodeRecord,
             recorder) -> bool:
    """Join a ready chunk into the plan and send it, or hold; True when a chunk was sent."""
    backend = robot.backend

    def measured():
        return backend.joint_state()[0]

    error = pending.error
    if error is None:
        try:
            cycle = pipeline.plan(pending.chunk, pending.observation, pending.observation_time,
                                  lambda: robot.time, measured=measured)
        except Exception as failure:  # noqa: BLE001 - the robot holds, as in the node
            error = failure
    if error is not None:
        result.rejected += 1
        result.holds += 1
        cause = getattr(error, "cause", type(error).__name__)
        result.hold_causes[cause] = result.hold_causes.get(cause, 0) + 1
        try:
            hold = pipeline.hold(measured(), robot.time)
        except ValueError:
            return False
        robot.send(hold.joint_names, hold.time_from_start, hold.positions)
        result.motion.trajectory(robot.time, hold=True)
        if recorder is not None:
            recorder.sent(hold.start_time, hold.time_from_start, hold.positions,
                          hold_cause=cause)
        return False
    trajectory = cycle.trajectory
    robot.send(trajectory.joint_names, trajectory.time_from_start, trajectory.positions)
    result.trajectories += 1
    result.motion.trajectory(robot.time)
    if recorder is not None:
        recorder.chunk(pending.observation_time, cycle.targets, backend.embodiment.dt,
                       cycle.chunk.latency_s, robot.time)
        recorder.sent(trajectory.start_time, trajectory.time_from_start, trajectory.positions)
    return True
