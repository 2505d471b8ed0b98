"""Executing joint trajectories in a simulator the way a joint trajectory controller does.

Without ROS types: the bridge node unpacks `trajectory_msgs/JointTrajectory` into names,
times and positions and hands them here. Semantics follow ros2_controllers'
JointTrajectoryController closely enough for a policy to behave the same on both:

- a trajectory may command a subset of the joints (arm and gripper controllers are separate);
- it starts at its header stamp, or on receipt when the stamp is zero;
- it replaces what was executing for its joints from its start on, beginning from the position
  commanded at that moment, so consecutive chunks join without a jump;
- between points the target moves linearly at the simulator's rate; after the last point the
  joints hold it;
- points already in the past are skipped; a trajectory entirely in the past is refused;
- the command sent to the joints moves at most `max_velocity` (the hardware's joint velocity
  limits, as ros2_control's joint limiters enforce them): a trajectory that jumps is followed at
  that speed instead of slamming the servos into their limits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class TrajectoryError(ValueError):
    """A trajectory that cannot be executed; the message says what is wrong with it."""


@dataclass
class _Segment:
    indices: np.ndarray   # joints it commands (embodiment order indices)
    times: np.ndarray     # (K+1,) absolute times, the first is the start point's
    points: np.ndarray    # (K+1, len(indices)) positions, the first is the start point


class TrajectoryFollower:
    """Joint position targets over time from received trajectories.

    Attributes:
        joint_names: all joints, in embodiment order.
    """

    def __init__(self, joint_names: list[str], lower: np.ndarray, upper: np.ndarray,
                 position: np.ndarray, max_velocity: np.ndarray | None = None):
        """Hold `position` until a trajectory arrives; targets are clipped to [lower, upper].

        `max_velocity` (per joint, units per second) limits how fast the command moves in
        `advance`; None leaves it unlimited.
        """
        self.joint_names = list(joint_names)
        self._index = {name: i for i, name in enumerate(self.joint_names)}
        self.lower = np.asarray(lower, dtype=np.float64)
        self.upper = np.asarray(upper, dtype=np.float64)
        self.max_velocity = (None if max_velocity is None
                             else np.asarray(max_velocity, dtype=np.float64))
        self.reset(position)

    def reset(self, position: np.ndarray, now: float | None = None) -> None:
        """Forget all trajectories and hold `position` (after an episode reset)."""
        position = np.asarray(position, dtype=np.float64)
        self._hold = np.clip(position, self.lower, self.upper)
        self._segments: list[_Segment] = []
        self._command = self._hold.copy()
        self._command_time = now

    def receive(self, names: list[str], times_from_start: np.ndarray, positions: np.ndarray,
                start_time: float, now: float) -> int:
        """Accept a trajectory; returns the number of points that will be executed.

        Args:
            names: joints the trajectory commands.
            times_from_start: (K,) seconds after `start_time`, strictly increasing.
            positions: (K, len(names)) targets.
            start_time: when time_from_start counts from (the stamp, or `now` if zero).
            now: the current simulation time.

        Raises:
            TrajectoryError: unknown or repeated joints, sizes that do not match, non-finite
                values, times that do not increase, or every point already in the past.
        """
        unknown = [n for n in names if n not in self._index]
        if unknown:
            raise TrajectoryError(f"unknown joints {unknown} (this robot has "
                                  f"{self.joint_names})")
        if len(set(names)) != len(names) or not names:
            raise TrajectoryError(f"joint names must be non-empty and unique, got {names}")
        times = np.asarray(times_from_start, dtype=np.float64).reshape(-1)
        if len(times) == 0:
            raise TrajectoryError("trajectory has no points")
        positions = np.asarray(positions, dtype=np.float64)
        if positions.ndim != 2 or positions.shape != (len(times), len(names)):
            raise TrajectoryError(f"expected {len(times)} points of {len(names)} positions, "
                                  f"got shape {positions.shape}")
        if not (np.isfinite(times).all() and np.isfinite(positions).all()):
            raise TrajectoryError("trajectory has non-finite times or positions")
        if np.any(np.diff(times) <= 0) or times[0] < 0:
            raise TrajectoryError("time_from_start must be non-negative and strictly increasing")
        absolute = start_time + times
        keep = absolute > now
        if not keep.any():
            raise TrajectoryError(f"all points are in the past (last at {absolute[-1]:.3f} s, "
                                  f"now {now:.3f} s)")
        indices = np.array([self._index[n] for n in names])
        begin = max(start_time, now)
        # Starting now: from what the joints are being commanded (which may lag the previous
        # trajectory when the velocity limit acts), so the command never jumps.
        lagging = self.max_velocity is not None and begin <= now
        start_point = (self._command if lagging else self.sample(begin))[indices]
        segment = _Segment(indices=indices,
                           times=np.concatenate([[begin], absolute[keep]]),
                           points=np.vstack([start_point,
                                             np.clip(positions[keep], self.lower[indices],
                                                     self.upper[indices])]))
        # The new trajectory owns its joints from now on: fold what older segments command for
        # them into the hold position and drop those joints from the older segments.
        remaining = []
        for old in self._segments:
            overlap = np.isin(old.indices, indices)
            if overlap.any():
                self._hold[old.indices[overlap]] = _interpolate(old, now)[overlap]
                if overlap.all():
                    continue
                old = _Segment(old.indices[~overlap], old.times, old.points[:, ~overlap])
            remaining.append(old)
        self._segments = remaining + [segment]
        return int(keep.sum())

    def advance(self, now: float) -> np.ndarray:
        """The command at `now`: `sample(now)` approached at no more than `max_velocity`.

        Call with increasing times (once per simulator step).
        """
        target = self.sample(now)
        if self.max_velocity is not None:
            # The first call has no elapsed time to move in: it holds the command.
            elapsed = 0.0 if self._command_time is None else max(now - self._command_time, 0.0)
            reach = self.max_velocity * elapsed
            target = self._command + np.clip(target - self._command, -reach, reach)
        self._command, self._command_time = target, now
        return target.copy()

    def sample(self, now: float) -> np.ndarray:
        """Targets of all joints at time `now` (the trajectories, without the velocity limit)."""
        target = self._hold.copy()
        for segment in self._segments:
            target[segment.indices] = _interpolate(segment, now)
        return target


def _interpolate(segment: _Segment, now: float) -> np.ndarray:
    times, points = segment.times, segment.points
    if now <= times[0]:
        return points[0].copy()
    if now >= times[-1]:
        return points[-1].copy()
    k = int(np.searchsorted(times, now, side="right"))
    alpha = (now - times[k - 1]) / (times[k] - times[k - 1])
    return points[k - 1] + alpha * (points[k] - points[k - 1])
