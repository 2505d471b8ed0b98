"""WX250s kinematics: FK/IK with Pinocchio and the Bridge end-effector delta convention."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

pytest.importorskip("pinocchio", reason="Pinocchio is not installed (pip install pin==4.1.0)")

from twinbrain_ros.robot.kinematics import (  # noqa: E402
    WIDOWX_ARM_JOINTS,
    ArmKinematics,
    bounded_pose_delta,
    rotation_angle,
    rpy_matrix,
    widowx_urdf,
)

POS_TOL = 1e-3  # metres: the required IK accuracy
ROT_TOL = 1e-2  # radians


@pytest.fixture(scope="module")
def arm() -> ArmKinematics:
    return ArmKinematics.widowx()


@pytest.fixture
def q_home() -> np.ndarray:
    """A Bridge-like pose: gripper in front of the robot, pointing forward and down."""
    return np.array([0.0, -0.4, 0.5, 0.0, 0.8, 0.0])


def rz(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def ry(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rx(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def test_model_is_the_six_arm_joints_with_interbotix_frames(arm):
    assert arm.joint_names == list(WIDOWX_ARM_JOINTS)
    assert arm.model.nq == 6  # gripper and fingers are locked out of the model
    assert arm.ee_frame == "wx250s/ee_gripper_link"
    assert arm.base_frame == "wx250s/base_link"


def test_joint_limits_match_the_interbotix_published_limits(arm):
    # Interbotix WX250s (WidowX 250 6DOF) limits, degrees: waist +-180, shoulder -108/114,
    # elbow -123/92, forearm_roll +-180, wrist_angle -100/123, wrist_rotate +-180.
    published = {"waist": (-180, 180), "shoulder": (-108, 114), "elbow": (-123, 92),
                 "forearm_roll": (-180, 180), "wrist_angle": (-100, 123),
                 "wrist_rotate": (-180, 180)}
    for i, name in enumerate(arm.joint_names):
        lo, hi = published[name]
        assert arm.lower[i] == pytest.approx(math.radians(lo), abs=1e-4), name
        assert arm.upper[i] == pytest.approx(math.radians(hi), abs=1e-4), name
    assert arm.lower[1] == pytest.approx(-1.884956, abs=1e-6)  # shoulder
    assert arm.upper[2] == pytest.approx(1.605703, abs=1e-6)   # elbow
    np.testing.assert_allclose(arm.velocity_limit, math.pi)


def test_fk_at_zero_is_the_arm_stretched_forward(arm):
    # Sum of the joint origins along x (0.04975 + 0.175 + 0.075 + 0.065 + 0.043 + 0.023 +
    # 0.027575) and along z (0.072 + 0.03865 + 0.25) in the Interbotix description.
    pose = arm.fk(np.zeros(6))
    np.testing.assert_allclose(pose[:3, 3], [0.458325, 0.0, 0.36065], atol=1e-9)
    np.testing.assert_allclose(pose[:3, :3], np.eye(3), atol=1e-9)


def test_rpy_matrix_is_fixed_axis_roll_then_pitch_then_yaw():
    roll, pitch, yaw = 0.3, -0.2, 1.1
    np.testing.assert_allclose(rpy_matrix(roll, pitch, yaw), rz(yaw) @ ry(pitch) @ rx(roll),
                               atol=1e-12)


def test_rotation_angle_is_the_angle_between_two_orientations():
    base = rpy_matrix(0.4, -0.7, 2.0)
    assert rotation_angle(base, base) == pytest.approx(0.0, abs=1e-7)
    assert rotation_angle(base, rz(0.3) @ base) == pytest.approx(0.3, abs=1e-9)
    assert rotation_angle(rx(-1.2) @ base, base) == pytest.approx(1.2, abs=1e-9)
    assert rotation_angle(base, ry(math.pi) @ base) == pytest.approx(math.pi, abs=1e-6)


def test_a_bounded_pose_delta_heads_straight_at_the_goal_and_reaches_a_near_one():
    rng = np.random.default_rng(3)
    for _ in range(50):
        pose = np.eye(4)
        pose[:3, :3] = rpy_matrix(*rng.uniform(-math.pi, math.pi, 3))
        pose[:3, 3] = rng.uniform(-0.3, 0.3, 3)
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = rng.uniform(0.0, 2.5)
        # Rodrigues: a known rotation about a known axis, applied in the base frame.
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        turn = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k
        goal_rotation = turn @ pose[:3, :3]
        goal_position = pose[:3, 3] + rng.normal(0.0, 0.05, 3)

        delta = bounded_pose_delta(pose, goal_position, goal_rotation, 0.03, 0.3)
        step = goal_position - pose[:3, 3]
        distance = np.linalg.norm(step)
        # Translation: the whole way when near, else 3 cm along the same direction.
        np.testing.assert_allclose(delta[:3], step * min(1.0, 0.03 / distance), atol=1e-12)
        # Rotation: R_next = R_delta @ R_current turns about the goal's own axis, by at most
        # 0.3 rad, and lands on the goal when it is within reach.
        applied = rpy_matrix(*delta[3:]) @ pose[:3, :3]
        assert rotation_angle(pose[:3, :3], applied) == pytest.approx(min(angle, 0.3), abs=1e-7)
        assert rotation_angle(applied, goal_rotation) == pytest.approx(max(angle - 0.3, 0.0),
                                                                        abs=1e-7)


def test_ik_recovers_random_poses_from_a_perturbed_seed(arm):
    rng = np.random.default_rng(0)
    mid, half = (arm.lower + arm.upper) / 2, 0.8 * (arm.upper - arm.lower) / 2
    for _ in range(20):
        q = rng.uniform(mid - half, mid + half)
        target = arm.fk(q)
        seed = np.clip(q + rng.normal(0.0, 0.1, size=6), arm.lower, arm.upper)
        q_ik, converged = arm.ik(target, seed)
        assert converged
        assert np.all(q_ik >= arm.lower) and np.all(q_ik <= arm.upper)
        reached = arm.fk(q_ik)
        assert np.linalg.norm(reached[:3, 3] - target[:3, 3]) < POS_TOL
        assert rotation_angle(reached[:3, :3], target[:3, :3]) < ROT_TOL


def test_zero_deltas_keep_the_joints(arm, q_home):
    targets, converged = arm.ee_deltas_to_joint_targets(q_home, np.zeros((8, 6)))
    assert targets.shape == (8, 6) and converged.shape == (8,)
    assert converged.all()
    np.testing.assert_allclose(targets, np.tile(q_home, (8, 1)), atol=1e-6)


def test_x_delta_moves_the_gripper_2cm_forward_and_keeps_orientation(arm, q_home):
    start = arm.fk(q_home)
    targets, converged = arm.ee_deltas_to_joint_targets(q_home, [[0.02, 0, 0, 0, 0, 0]])
    assert converged.all()
    end = arm.fk(targets[0])
    np.testing.assert_allclose(end[:3, 3] - start[:3, 3], [0.02, 0.0, 0.0], atol=1e-4)
    assert rotation_angle(end[:3, :3], start[:3, :3]) < 1e-3


def test_targets_chain_from_target_to_target(arm, q_home):
    start = arm.fk(q_home)
    deltas = np.tile([0.0, 0.01, -0.005, 0.0, 0.0, 0.0], (5, 1))
    targets, converged = arm.ee_deltas_to_joint_targets(q_home, deltas)
    assert converged.all()
    for k, q in enumerate(targets, start=1):
        np.testing.assert_allclose(arm.fk(q)[:3, 3] - start[:3, 3], [0.0, 0.01 * k, -0.005 * k],
                                   atol=1e-4)


def test_yaw_delta_rotates_about_the_base_z_axis_in_place(arm, q_home):
    start = arm.fk(q_home)
    deltas = np.tile([0.0, 0.0, 0.0, 0.0, 0.0, 0.1], (3, 1))
    targets, converged = arm.ee_deltas_to_joint_targets(q_home, deltas)
    assert converged.all()
    end = arm.fk(targets[-1])
    assert rotation_angle(end[:3, :3], rz(0.3) @ start[:3, :3]) < 1e-3
    np.testing.assert_allclose(end[:3, 3], start[:3, 3], atol=1e-4)
    assert not np.allclose(targets[-1], q_home, atol=0.05)


def test_rotation_delta_is_applied_in_the_base_frame(arm, q_home):
    start = arm.fk(q_home)
    delta = [0.0, 0.0, 0.0, 0.1, -0.15, 0.2]
    targets, converged = arm.ee_deltas_to_joint_targets(q_home, [delta])
    assert converged.all()
    end = arm.fk(targets[0])
    expected = rz(0.2) @ ry(-0.15) @ rx(0.1) @ start[:3, :3]
    assert rotation_angle(end[:3, :3], expected) < 1e-3
    np.testing.assert_allclose(end[:3, 3], start[:3, 3], atol=1e-4)


def test_unreachable_target_reports_not_converged_within_limits(arm, q_home):
    target = arm.fk(q_home)
    target[:3, 3] = [1.5, 0.0, 0.3]  # far beyond the ~0.65 m reach
    q_ik, converged = arm.ik(target, q_home)
    assert not converged
    assert np.all(q_ik >= arm.lower) and np.all(q_ik <= arm.upper)
    # The closest configuration found reaches further toward the target than the seed.
    assert arm.fk(q_ik)[0, 3] > arm.fk(q_home)[0, 3] + 0.05


def test_unreachable_delta_rows_are_flagged_and_stay_within_limits(arm, q_home):
    deltas = np.zeros((3, 6))
    deltas[1, 2] = 1.0  # one metre up in one step
    targets, converged = arm.ee_deltas_to_joint_targets(q_home, deltas)
    assert converged.tolist() == [True, False, False]  # later rows chain from the target
    assert np.all(targets >= arm.lower) and np.all(targets <= arm.upper)


def test_bad_inputs_are_rejected(arm, q_home):
    with pytest.raises(ValueError):
        arm.fk(np.zeros(5))
    with pytest.raises(ValueError):
        arm.ik(np.eye(3), q_home)
    with pytest.raises(ValueError):
        arm.ee_deltas_to_joint_targets(q_home, np.zeros((2, 7)))
    with pytest.raises(ValueError):
        arm.fk(np.full(6, np.nan))


def test_joint_names_must_exist_and_be_in_model_order():
    urdf = widowx_urdf()
    with pytest.raises(ValueError, match="model order"):
        ArmKinematics(urdf, ["shoulder", "waist"], ee_frame="wx250s/ee_gripper_link")
    with pytest.raises(ValueError, match="not in the URDF"):
        ArmKinematics(urdf, ["waist", "nope"], ee_frame="wx250s/ee_gripper_link")
    with pytest.raises(ValueError, match="frame"):
        ArmKinematics(urdf, list(WIDOWX_ARM_JOINTS), ee_frame="nope")


def test_missing_dependencies_name_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "xacro", None)
    with pytest.raises(ImportError, match="pip install xacro"):
        widowx_urdf()
    monkeypatch.setitem(sys.modules, "pinocchio", None)
    with pytest.raises(ImportError, match="pip install pin"):
        ArmKinematics("<robot name='r'/>", ["j"], ee_frame="ee")
