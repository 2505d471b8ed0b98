"""Action-chunk scheduling on plain NumPy arrays and seconds.

A chunk's action i is meant for `observation_time + (i + 1) * dt`. By the time the chunk is
ready, some of those times have passed: they are dropped (latency compensation). The rest is
blended into the plan being executed, so that the commanded position and velocity are continuous
where the new chunk takes over, and then passed through the safety filter
(`twinbrain_ros.policy.safety`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Plan:
    """Joint targets at absolute times (seconds on the node's clock)."""

    times: np.ndarray       # (K,) strictly increasing
    positions: np.ndarray   # (K, n)

    def position_at(self, t: float) -> np.ndarray | None:
        """Linearly interpolated target at time `t`, None outside the plan's span."""
        if len(self.times) == 0 or t < self.times[0] or t > self.times[-1]:
            return None
        k = int(np.searchsorted(self.times, t))
        if k == 0:
            return self.positions[0].copy()
        t0, t1 = self.times[k - 1], self.times[k]
        w = (t - t0) / (t1 - t0)
        return (1 - w) * self.positions[k - 1] + w * self.positions[k]

    def velocities(self, start_time: float, start_position: np.ndarray) -> np.ndarray:
        """Velocities at the plan's points, anchored at the start; zero at the last point.

        Central differences, limited so that the cubic a trajectory controller fits through
        positions and velocities (ros2_control's does) stays monotone between two points
        (Fritsch-Carlson): zero where the motion turns or pauses, scaled down where a slope
        would swing the cubic past the next point. So a trajectory whose points respect the
        joint limits never passes them between points either. The plan ends at rest.
        """
        times = np.concatenate([[start_time], self.times])
        points = np.vstack([np.asarray(start_position, float)[None], self.positions])
        if len(times) < 2 or np.any(np.diff(times) <= 0):
            return np.zeros_like(self.positions)
        return monotone_slopes(times, points)[1:]


def monotone_slopes(times: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(K, n) slopes at (K,) strictly increasing times for a monotone cubic Hermite, 0 at end."""
    secants = np.diff(points, axis=0) / np.diff(times)[:, None]
    slopes = np.gradient(points, times, axis=0)
    slopes[-1] = 0.0
    # Turning points and pauses: a zero slope (also at the start when it points the other way).
    turns = secants[:-1] * secants[1:] <= 0
    slopes[1:-1][turns] = 0.0
    slopes[0][slopes[0] * secants[0] <= 0] = 0.0
    for k in range(len(secants)):
        flat = secants[k] == 0
        slopes[k][flat], slopes[k + 1][flat] = 0.0, 0.0
        safe = np.where(flat, 1.0, secants[k])
        alpha, beta = slopes[k] / safe, slopes[k + 1] / safe
        radius = np.hypot(alpha, beta)
        scale = np.where(radius > 3.0, 3.0 / np.maximum(radius, 1e-12), 1.0)
        slopes[k] = np.where(flat, 0.0, scale * alpha * safe)
        slopes[k + 1] = np.where(flat, 0.0, scale * beta * safe)
    return slopes


@dataclass
class Trajectory:
    """What the node publishes: points relative to `start_time`."""

    joint_names: list[str]
    start_time: float
    time_from_start: np.ndarray  # (K,)
    positions: np.ndarray        # (K, n)
    velocities: np.ndarray       # (K, n)
    hold: bool = False           # keeps the robot where it is (not a plan)

    @property
    def is_hold(self) -> bool:
        """Whether this keeps the robot where it is rather than executing a plan."""
        return self.hold


class ActionChunkScheduler:
    """Merges each new chunk into the executing plan (drop the past, blend, keep the rest)."""

    def __init__(self, dt: float, blend_steps: int):
        """`dt`: control period; `blend_steps`: new points cross-faded with the old plan."""
        if dt <= 0:
            raise ValueError("dt must be positive")
        self.dt = dt
        self.blend_steps = max(int(blend_steps), 0)
        self.plan: Plan | None = None

    def reset(self) -> None:
        """Forget the executing plan (after a hold or a new instruction)."""
        self.plan = None

    def commanded_position(self, now: float) -> np.ndarray | None:
        """Where the executing plan has the robot at `now` (None if no plan covers it)."""
        return None if self.plan is None else self.plan.position_at(now)

    def merge(self, positions: np.ndarray, observation_time: float, now: float,
              blend: bool = True) -> Plan | None:
        """The plan from a new chunk of joint targets; None if all of it is already past.

        `blend`: cross-fade the first `blend_steps` points into the executing plan.
        """
        positions = np.asarray(positions, dtype=np.float64)
        times = observation_time + self.dt * np.arange(1, len(positions) + 1)
        keep = times > now
        if not keep.any():
            return None
        times, positions = times[keep], positions[keep].copy()
        if self.plan is not None and blend:
            for j in range(min(self.blend_steps, len(times))):
                old = self.plan.position_at(times[j])
                if old is None:
                    break
                # Cosine ramp: starts with zero slope, so the velocity is continuous too.
                w = 0.5 - 0.5 * np.cos(np.pi * (j + 1) / (self.blend_steps + 1))
                positions[j] = (1 - w) * old + w * positions[j]
        return Plan(times, positions)

    def commit(self, plan: Plan) -> None:
        """Make `plan` the executing plan."""
        self.plan = plan

    def trajectory(self, joint_names: list[str], now: float, start_position: np.ndarray
                   ) -> Trajectory:
        """The executing plan from `now` on, with velocities, ready to publish."""
        plan = self.plan
        future = plan.times > now
        remaining = Plan(plan.times[future], plan.positions[future])
        return Trajectory(joint_names=list(joint_names), start_time=now,
                          time_from_start=remaining.times - now,
                          positions=remaining.positions,
                          velocities=remaining.velocities(now, start_position))
