"""The last stage before a controller: joint limits, step size, finiteness, measured start.

Guarantees of `SafetyFilter.apply` (each checked by tests, with 1e-9 of float tolerance):

- every output position lies within the joint limits;
- the first point is at most one `max_step` (scaled by its time after `start_time`, at most
  one control period) from the start position, which is the latest *measured* joint position
  clipped into the limits: the controller starts from where the robot is, not from where an
  earlier plan wanted it;
- every later point is at most one `max_step` per control period from the point before it.

A measured joint state may be outside the limits by a little (sensor noise, a joint pushed by
hand, a gripper blocked open): up to one `max_step` it is clipped into the limits; further out
it is refused by `check_state_in_range` as a cause of its own (`joint_out_of_range`), and no
command is derived from it.
"""

from __future__ import annotations

import numpy as np

from ..errors import CausedError
from .scheduler import Plan, Trajectory


class StateOutOfRange(CausedError, ValueError):
    """A measured joint state further outside the joint limits than one control step."""


class SafetyFilter:
    """Joint limits, largest change per control step, finiteness and the measured start."""

    def __init__(self, lower: np.ndarray, upper: np.ndarray, max_step: np.ndarray, dt: float):
        """Limits in joint units; `max_step` is per control period `dt`."""
        self.lower, self.upper = np.asarray(lower, float), np.asarray(upper, float)
        self.max_step, self.dt = np.asarray(max_step, float), dt

    def check_state(self, position: np.ndarray, names: list[str] | None = None) -> np.ndarray:
        """`position` clipped into the limits; `StateOutOfRange` if further out than one step."""
        return check_state_in_range(position, self.lower, self.upper, self.max_step, names)

    def start(self, measured: np.ndarray) -> np.ndarray:
        """The start of a command: the measured position clipped into the limits."""
        return np.clip(np.asarray(measured, float), self.lower, self.upper)

    def apply(self, plan: Plan, start_time: float, start_position: np.ndarray) -> Plan:
        """Clip every target to the limits and to a reachable step from the previous target.

        Args:
            plan: the targets to check.
            start_time: the time of `start_position` (now).
            start_position: the measured joint position (it is clipped into the limits first).

        Raises:
            ValueError: if any target or the start is non-finite (the caller must hold still).
        """
        start_position = np.asarray(start_position, float)
        if not np.isfinite(start_position).all():
            raise ValueError("non-finite start position")
        if not np.isfinite(plan.positions).all():
            raise ValueError("non-finite joint targets")
        positions = np.clip(plan.positions, self.lower, self.upper)
        previous, previous_time = self.start(start_position), start_time
        for k, t in enumerate(plan.times):
            # Never more than one step between two points, and less for points closer than a
            # control period (the first one, usually). Capping at one period also keeps float
            # rounding of large clock values (epoch seconds) from allowing 1.000004 steps.
            periods = min(max(t - previous_time, 0.0) / self.dt, 1.0)
            limit = self.max_step * periods
            positions[k] = previous + np.clip(positions[k] - previous, -limit, limit)
            previous, previous_time = positions[k], t
        # Rounding may leave a value a few ulp outside a limit it was clipped to.
        return Plan(plan.times.copy(), np.clip(positions, self.lower, self.upper))


def check_state_in_range(position: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                         margin: np.ndarray, names: list[str] | None = None) -> np.ndarray:
    """The measured `position` clipped into [lower, upper].

    Raises:
        StateOutOfRange: a joint more than `margin` outside its limits (cause
            `joint_out_of_range`), naming the first such joints.
    """
    position = np.asarray(position, dtype=np.float64)
    lower, upper = np.asarray(lower, float), np.asarray(upper, float)
    outside = (position < lower - margin) | (position > upper + margin)
    if outside.any():
        bad = np.flatnonzero(outside)[:3]
        label = [names[i] if names else str(i) for i in bad]
        described = ", ".join(f"{n}={position[i]:.4g} (limits {lower[i]:.4g}..{upper[i]:.4g})"
                              for n, i in zip(label, bad, strict=True))
        raise StateOutOfRange("joint_out_of_range",
                              f"joint state outside the joint limits by more than one control "
                              f"step: {described}")
    return np.clip(position, lower, upper)


def hold_trajectory(joint_names: list[str], now: float, position: np.ndarray, dt: float
                    ) -> Trajectory:
    """A one-point trajectory that keeps the robot where it is."""
    position = np.asarray(position, dtype=np.float64)
    return Trajectory(joint_names=list(joint_names), start_time=now,
                      time_from_start=np.array([dt]), positions=position[None].copy(),
                      velocities=np.zeros((1, len(position))), hold=True)


def within_limits(positions, lower: np.ndarray, upper: np.ndarray) -> bool:
    """Whether every position is finite and within [lower, upper] (1e-9 of rounding)."""
    positions = np.asarray(positions, dtype=np.float64)
    return bool(np.isfinite(positions).all() and np.all(positions >= lower - 1e-9)
                and np.all(positions <= upper + 1e-9))
