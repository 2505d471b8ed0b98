"""Closed loops without ROS: a scripted expert (or any action source) driving a backend.

The loop is the one the bridge and policy node run over ROS, in one process: every control
period (`embodiment.dt`) it reads the joints, renders the cameras, asks for one action in the
embodiment's action space, turns it into joint targets with the policy's own `ActionConverter`
(inverse kinematics for Bridge end-effector deltas) and reaches them linearly at the
simulator's rate. Recording what the expert saw and did gives training demonstrations in the
policy's own action space.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..actions import ActionConverter, ChunkRejected
from .base import Episode, SimBackend, TargetInterpolator


@dataclass
class EpisodeRecord:
    """One episode: per control step the frames seen, the state and the action taken."""

    episode: Episode
    success: bool = False
    steps: int = 0
    frames: list[list[np.ndarray]] = field(default_factory=list)  # [step][camera] HxWx3
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    rejected: int = 0          # actions that could not be turned into joint targets


def substeps_per_control(backend: SimBackend) -> int:
    """Simulator steps per control period (at least one)."""
    return max(1, round(backend.embodiment.dt / backend.sim_dt))


def run_episode(backend: SimBackend, seed: int,
                policy: Callable[[list[np.ndarray], np.ndarray, Episode], np.ndarray] | None
                = None, converter: ActionConverter | None = None, record: bool = False,
                render: bool = True, stop_on_success: bool = True) -> EpisodeRecord:
    """Run one seeded episode with the scripted expert (default) or `policy`.

    Args:
        backend: the simulator.
        seed: the episode seed (scene layout, target object, instruction).
        policy: `(frames, state, episode) -> action` in the embodiment's action space; None
            uses the backend's scripted expert.
        converter: action -> joint targets (built for the embodiment when None).
        record: keep frames, states and actions (demonstrations).
        render: render cameras every control step (needed by `record` and image policies).
        stop_on_success: end the episode at the first control step where it succeeded.

    Returns:
        The episode record; `success` is whether the goal held at the end.
    """
    emb = backend.embodiment
    converter = converter or ActionConverter(emb)
    episode = backend.reset(seed)
    expert = backend.expert() if policy is None else None
    result = EpisodeRecord(episode=episode)
    substeps = substeps_per_control(backend)
    q, _ = backend.joint_state()
    interpolator = TargetInterpolator(q)
    for step in range(episode.max_steps):
        q, _ = backend.joint_state()
        frames = backend.render() if (render or record) else []
        action = expert.act() if expert is not None else policy(frames, q, episode)
        action = np.asarray(action, dtype=np.float64)
        try:
            targets = converter(action[None], q)[0]
        except ChunkRejected:
            result.rejected += 1
            targets = interpolator.sample(backend.time)
        targets = np.clip(targets, emb.lower, emb.upper)
        if record:
            result.frames.append(frames)
            result.states.append(q.astype(np.float32))
            result.actions.append(action.astype(np.float32))
        interpolator.set_target(targets, backend.time, emb.dt)
        for _ in range(substeps):
            backend.step(interpolator.sample(backend.time + backend.sim_dt))
        result.steps = step + 1
        if stop_on_success and backend.success():
            break
    result.success = bool(backend.success())
    return result
