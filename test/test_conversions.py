"""Image and joint-state conversion without cv_bridge."""

from __future__ import annotations

import numpy as np
import pytest

msgs = pytest.importorskip("sensor_msgs.msg", reason="ROS 2 message packages not installed")
from twinbrain_ros.ros.conversions import (  # noqa: E402
    InputError,
    image_to_rgb,
    joint_positions,
    make_trajectory,
    rgb_to_image,
)


def _image(encoding, pixels, step=None):
    msg = msgs.Image(height=pixels.shape[0], width=pixels.shape[1], encoding=encoding)
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    msg.step = step or pixels.shape[1] * channels
    rows = pixels.reshape(pixels.shape[0], -1)
    pad = msg.step - rows.shape[1]
    msg.data = np.pad(rows, ((0, 0), (0, pad))).tobytes()
    return msg


RGB = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding, pixels", [
    ("rgb8", RGB),
    ("bgr8", RGB[..., ::-1]),
    ("rgba8", np.concatenate([RGB, np.full((4, 5, 1), 7, np.uint8)], -1)),
    ("bgra8", np.concatenate([RGB[..., ::-1], np.full((4, 5, 1), 7, np.uint8)], -1)),
])
def test_colour_encodings_become_rgb(encoding, pixels):
    np.testing.assert_array_equal(image_to_rgb(_image(encoding, pixels)), RGB)


def test_mono_and_padded_rows():
    gray = RGB[..., 0]
    out = image_to_rgb(_image("mono8", gray))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(image_to_rgb(_image("rgb8", RGB, step=16)), RGB)


def test_bad_images_name_the_cause():
    bad = _image("16UC1", RGB[..., 0].astype(np.uint16).view(np.uint8))
    with pytest.raises(InputError, match="unsupported image encoding '16UC1'"):
        image_to_rgb(bad)
    wrong_step = _image("rgb8", RGB)
    wrong_step.step = 10
    with pytest.raises(InputError, match="step 10"):
        image_to_rgb(wrong_step)
    short = _image("rgb8", RGB)
    short.data = short.data[:-3]
    with pytest.raises(InputError) as info:
        image_to_rgb(short)
    assert info.value.cause == "image_size"


def test_rgb_to_image_round_trip():
    np.testing.assert_array_equal(image_to_rgb(rgb_to_image(RGB)), RGB)


def test_joint_positions_any_order_missing_and_nan():
    msg = msgs.JointState(name=["b", "x", "a"], position=[2.0, 9.0, 1.0])
    np.testing.assert_array_equal(joint_positions(msg, ["a", "b"]), [1.0, 2.0])
    with pytest.raises(InputError, match=r"lacks joints \['c'\]"):
        joint_positions(msg, ["a", "c"])
    msg.position = [2.0, 9.0, float("nan")]
    with pytest.raises(InputError, match=r"non-finite positions for \['a'\]"):
        joint_positions(msg, ["a", "b"])


def test_trajectory_points_are_spaced_by_dt():
    traj = make_trajectory(["a", "b"], np.array([[0.0, 1.0], [0.5, 1.5], [1.0, 2.0]]), 0.1,
                           velocities=np.ones((3, 2)))
    times = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in traj.points]
    np.testing.assert_allclose(times, [0.1, 0.2, 0.3])
    assert traj.points[1].positions.tolist() == [0.5, 1.5]
    assert traj.header.stamp.sec == 0 and traj.header.stamp.nanosec == 0


def test_a_joint_named_twice_is_refused():
    msg = msgs.JointState(name=["a", "b", "a"], position=[0.0, 1.0, 2.0])
    with pytest.raises(InputError, match=r"joints \['a'\] more than once") as info:
        joint_positions(msg, ["a", "b"])
    assert info.value.cause == "duplicate_joints"
    # a repeated joint the robot does not use is harmless
    assert list(joint_positions(msgs.JointState(name=["x", "a", "b", "x"], position=[0, 1, 2, 3]),
                                ["a", "b"])) == [1.0, 2.0]
