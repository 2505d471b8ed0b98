"""ROS message <-> NumPy conversion without cv_bridge."""

from __future__ import annotations

import collections

import numpy as np
from builtin_interfaces.msg import Duration
from sensor_msgs.msg import Image, JointState
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from ..data.images import SUPPORTED_ENCODINGS as RAW_SUPPORTED_ENCODINGS
from ..data.images import ImageFormatError, raw_to_rgb
from ..errors import CausedError

SUPPORTED_ENCODINGS = RAW_SUPPORTED_ENCODINGS


class InputError(CausedError, ValueError):
    """A message that cannot be used; `cause` is a short key for counting and rate limiting."""


def image_to_rgb(msg: Image) -> np.ndarray:
    """Convert a sensor_msgs/Image to an HxWx3 uint8 RGB array (one copy at most)."""
    try:
        return raw_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data)
    except ImageFormatError as error:
        raise InputError(error.cause, str(error)) from error


def rgb_to_image(rgb: np.ndarray, stamp=None, frame_id: str = "camera") -> Image:
    """Make an rgb8 sensor_msgs/Image from an HxWx3 uint8 array."""
    msg = Image()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = "rgb8"
    msg.step = msg.width * 3
    msg.data = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return msg


def joint_positions(msg: JointState, joint_names: list[str]) -> np.ndarray:
    """Positions of `joint_names` (in that order) from a JointState in any joint order."""
    if len(msg.position) != len(msg.name):
        raise InputError("joint_state_size", f"JointState has {len(msg.name)} names but "
                                             f"{len(msg.position)} positions")
    index = {name: i for i, name in enumerate(msg.name)}
    missing = [name for name in joint_names if name not in index]
    if missing:
        raise InputError("missing_joints", f"JointState lacks joints {missing[:5]}")
    if len(index) != len(msg.name):
        counts = collections.Counter(msg.name)
        repeated = sorted(n for n in joint_names if counts[n] > 1)
        if repeated:
            raise InputError("duplicate_joints", f"JointState names joints {repeated[:5]} more "
                                                 "than once")
    positions = np.array([msg.position[index[name]] for name in joint_names], dtype=np.float64)
    if not np.isfinite(positions).all():
        bad = [n for n, p in zip(joint_names, positions, strict=True) if not np.isfinite(p)]
        raise InputError("non_finite_joints", f"JointState has non-finite positions for {bad}")
    return positions


def _duration(seconds: float) -> Duration:
    nanoseconds = int(round(seconds * 1e9))
    return Duration(sec=nanoseconds // 1_000_000_000, nanosec=nanoseconds % 1_000_000_000)


def make_trajectory(joint_names: list[str], positions: np.ndarray, time_from_start,
                    velocities: np.ndarray | None = None, stamp=None) -> JointTrajectory:
    """A JointTrajectory with one point per row of `positions`.

    Args:
        joint_names: names of the columns.
        positions: (K, n) targets.
        time_from_start: (K,) seconds, or one float `dt` meaning points at dt, 2 dt, ...
        velocities: optional (K, n).
        stamp: header stamp; None keeps it zero, which controllers read as "start now".
    """
    positions = np.asarray(positions, dtype=np.float64)
    times = np.asarray(time_from_start, dtype=np.float64)
    if times.ndim == 0:
        times = times * np.arange(1, len(positions) + 1)
    msg = JointTrajectory()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.joint_names = list(joint_names)
    for i, row in enumerate(positions):
        point = JointTrajectoryPoint()
        point.positions = row.tolist()
        if velocities is not None:
            point.velocities = np.asarray(velocities[i], dtype=np.float64).tolist()
        point.time_from_start = _duration(float(times[i]))
        msg.points.append(point)
    return msg


def controller_trajectories(embodiment, positions: np.ndarray, time_from_start,
                            velocities: np.ndarray | None = None, stamp=None
                            ) -> list[tuple[str, JointTrajectory]]:
    """(topic, JointTrajectory) pairs for an embodiment's controllers.

    With a separate gripper controller (`gripper_topic`), the gripper joint goes there and the
    other joints to `trajectory_topic`; otherwise all joints go to `trajectory_topic`.

    Args:
        embodiment: the robot (an `Embodiment`).
        positions: (K, n_joints) targets in `embodiment.joint_names` order.
        time_from_start: as in `make_trajectory`.
        velocities: optional (K, n_joints).
        stamp: header stamp (None: zero, "start now").
    """
    names = list(embodiment.joint_names)
    positions = np.asarray(positions, dtype=np.float64)
    if not (embodiment.gripper_topic and embodiment.gripper_joint):
        return [(embodiment.trajectory_topic,
                 make_trajectory(names, positions, time_from_start, velocities, stamp))]
    g = names.index(embodiment.gripper_joint)
    arm = [i for i in range(len(names)) if i != g]

    def part(columns):
        return make_trajectory([names[i] for i in columns], positions[:, columns],
                               time_from_start,
                               None if velocities is None else np.asarray(velocities)[:, columns],
                               stamp)

    return [(embodiment.trajectory_topic, part(arm)), (embodiment.gripper_topic, part([g]))]
