"""The policy node in its own process, over real rclpy (PyPI Jazzy wheels), isolated domain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import save_policy_checkpoint
from ros_harness import NodeProcess, RobotSide, is_hold, policy_node_process, positions, times

from twinbrain_ros.robot.embodiment import Embodiment, config_dir
from twinbrain_ros.ros import diagnostic_keys as keys

pytestmark = [pytest.mark.ros, pytest.mark.slow]

GR1 = Embodiment.load("gr1")
WIDOWX = Embodiment.load("widowx")


@pytest.fixture(scope="module")
def gr1_checkpoints(tiny_backbones, tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    good = save_policy_checkpoint(tiny_backbones["qwen2_5_vl"], root / "good", GR1)
    nan = save_policy_checkpoint(tiny_backbones["qwen2_5_vl"], root / "nan", GR1,
                                 nan_weights=True)
    widowx = save_policy_checkpoint(tiny_backbones["qwen2_5_vl"], root / "widowx", WIDOWX)
    return {"good": good, "nan": nan, "widowx": widowx}


@pytest.fixture
def robot(ros_env):
    side = RobotSide("gr1")
    yield side
    side.close()


def test_publishes_a_safe_trajectory_for_the_embodiment(robot, gr1_checkpoints, tmp_path):
    with robot.watch(policy_node_process(tmp_path / "node.log", "gr1",
                                         checkpoint=gr1_checkpoints["good"],
                                         enable_actuation="true")) as node:
        robot.spin_until(lambda: robot.controller, 90, "the first trajectory", feed=True)
        traj = robot.controller[0]
        assert list(traj.joint_names) == GR1.joint_names
        stamps = times(traj)
        assert len(stamps) >= 1 and stamps[0] > 0 and np.all(np.diff(stamps) > 0)
        points = positions(traj)
        assert np.all(points >= GR1.lower - 1e-9) and np.all(points <= GR1.upper + 1e-9)
        # No step larger than the embodiment allows, starting from the measured state.
        steps = np.diff(np.vstack([robot.state, points]), axis=0)
        assert np.all(np.abs(steps) <= GR1.max_step + 1e-6)
        assert all(len(p.velocities) == GR1.state_dim for p in traj.points)
        assert traj.header.stamp.sec == 0 and traj.header.stamp.nanosec == 0
        assert not robot.dry_run
        # /diagnostics is periodic: wait for one sent after the first chunk was inferred.
        robot.spin_until(lambda: keys.INFERENCE_LATENCY_MEDIAN_MS in robot.values(), 10,
                         "diagnostics with the inference latency")
        values = robot.values()
        assert values[keys.ACTUATION_ENABLED] == "True"
        assert values.number(keys.INFERENCE_LATENCY_MEDIAN_MS) > 0
        assert node.alive()


def test_actuation_gate_keeps_the_controller_topic_silent(robot, gr1_checkpoints, tmp_path):
    # enable_actuation defaults to false
    with robot.watch(policy_node_process(tmp_path / "node.log", "gr1",
                                         checkpoint=gr1_checkpoints["good"])) as node:
        robot.spin_until(lambda: len(robot.dry_run) >= 2, 90, "two dry-run trajectories",
                         feed=True)
        assert robot.controller == []
        assert "dry run on /policy/dry_run/joint_trajectory" in node.text()


def test_bad_inputs_are_dropped_logged_and_counted(robot, gr1_checkpoints, tmp_path):
    nan_state = robot.state.copy()
    nan_state[3] = np.nan
    # (what the robot sends, the cause counted, the line logged): nothing valid ever arrives.
    phases = [
        (dict(image=robot.image(encoding="16UC1"), joints=None, text=None),
         "unsupported_encoding", "unsupported image encoding '16UC1'"),
        (dict(image=robot.image(step=10), joints=None, text=None), "image_size", "has step 10"),
        (dict(image=None, text=None, joints=robot.joints(
            names=GR1.joint_names[:-1], positions=robot.state[:-1])),
         "missing_joints", "lacks joints ['torso_waist_roll']"),
        (dict(image=None, text=None, joints=robot.joints(nan_state)),
         "non_finite_joints", "non-finite positions"),
        (dict(image=None, joints=None, text="   "), "empty_instruction",
         "rejected an empty instruction"),
    ]
    with robot.watch(policy_node_process(tmp_path / "node.log", "gr1",
                                         checkpoint=gr1_checkpoints["good"],
                                         enable_actuation="true")) as node:
        node.wait_for_text("policy node ready", 90)
        for inputs, cause, line in phases:
            robot.spin_until(lambda c=cause: robot.values().number(keys.rejected(c)) > 0, 20,
                             f"the count of {cause}", feed=inputs)
            assert line in node.text(), line
        assert robot.controller == [] and robot.dry_run == []

        # Valid input: the node is alive and answers.
        robot.spin_until(lambda: robot.controller, 60, "the first trajectory", feed=True)
        # The camera changes resolution mid-run (even to a tiny one and back): every size is
        # usable, nothing is locked in, and trajectories keep coming.
        for height, width in ((2, 2), (96, 128), (48, 64)):
            count = len(robot.controller)
            robot.spin_until(lambda c=count: len(robot.controller) >= c + 2, 30,
                             f"two trajectories from {height}x{width} frames",
                             feed=lambda h=height, w=width: robot.publish(image=robot.image(h, w)))
        assert "size changed" not in node.text()
        assert node.alive()


def test_a_model_returning_nan_holds_the_robot_still(robot, gr1_checkpoints, tmp_path):
    with robot.watch(policy_node_process(tmp_path / "node.log", "gr1",
                                         checkpoint=gr1_checkpoints["nan"],
                                         enable_actuation="true")) as node:
        robot.spin_until(lambda: robot.controller, 90, "the hold", feed=True)
        hold = robot.controller[0]
        assert is_hold(hold)
        np.testing.assert_allclose(hold.points[0].positions, robot.state)
        assert np.all(np.array(hold.points[0].velocities) == 0)
        assert "holding position: the model returned non-finite actions" in node.text()
        robot.spin_until(lambda: "non_finite_actions" in robot.values().get(keys.LAST_ERROR, ""),
                         10, "the cause in the diagnostics", feed=True)
        assert node.alive()
        assert node.stop() == 0


def test_missing_params_file_is_a_clear_error(ros_env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "twinbrain_ros.ros.policy_node", "--ros-args",
                           "-p", "checkpoint:=/nowhere"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))
    assert proc.returncode == 1
    assert "missing embodiment parameters" in proc.stdout + proc.stderr
    assert "--params-file config/<embodiment>.yaml" in proc.stdout + proc.stderr


def test_widowx_end_effector_deltas_drive_arm_and_gripper_controllers(ros_env, gr1_checkpoints,
                                                                        tmp_path):
    robot = RobotSide("widowx")
    try:
        with robot.watch(policy_node_process(tmp_path / "node.log", "widowx",
                                             checkpoint=gr1_checkpoints["widowx"],
                                             enable_actuation="true")):
            robot.spin_until(lambda: robot.controller and robot.gripper, 90,
                             "arm and gripper trajectories", feed=True)
            arm, gripper = robot.controller[0], robot.gripper[0]
            assert list(arm.joint_names) == WIDOWX.joint_names[:6]
            assert list(gripper.joint_names) == ["left_finger"]
            points = positions(arm)
            assert np.all(points >= WIDOWX.lower[:6]) and np.all(points <= WIDOWX.upper[:6])
            # Small end-effector steps give small joint steps, starting near the measured state.
            assert np.abs(points[0] - robot.state[:6]).max() <= 0.3 + 1e-6
            fingers = positions(gripper)[:, 0]
            assert np.all((fingers >= 0.015 - 1e-9) & (fingers <= 0.037 + 1e-9))
            assert len(arm.points) == len(gripper.points)
    finally:
        robot.close()


def test_checkpoint_of_another_embodiment_fails_at_start(ros_env, gr1_checkpoints):
    proc = subprocess.run(
        [sys.executable, "-m", "twinbrain_ros.ros.policy_node", "--ros-args",
         "--params-file", str(config_dir() / "widowx.yaml"),
         "-p", f"checkpoint:={gr1_checkpoints['good']}", "-p", "device:=cpu"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 1
    assert "has no embodiment 'widowx'" in proc.stdout + proc.stderr


def test_the_joint_state_stamped_nearest_the_image_is_used():
    from twinbrain_ros.ros.inputs import matching_joint_state

    # joint states at 50 Hz, the camera at 5 Hz: the newest joint state is 0.18 s past the image
    history = [(np.full(2, k), 100.0 + 0.02 * k, 10.0 + 0.02 * k) for k in range(20)]
    chosen = matching_joint_state(history, image_stamps=[10.2])
    assert chosen[2] == pytest.approx(10.2)
    # unstamped inputs: the newest joint state
    unstamped = [(np.zeros(2), 1.0, 0.0), (np.ones(2), 2.0, 0.0)]
    assert matching_joint_state(unstamped, image_stamps=[0.0]) is unstamped[-1]


def _two_sigints(node: NodeProcess, between) -> None:
    """A terminal's Ctrl-C under `ros2 launch`: the group's SIGINT and the one launch forwards."""
    node.signal(signal.SIGINT)
    between()
    node.signal(signal.SIGINT)


def test_two_sigints_end_a_busy_policy_node_cleanly(robot, gr1_checkpoints, tmp_path):
    """Busy: planning while the signals come. Exit code 0, no traceback."""
    node = policy_node_process(tmp_path / "node.log", "gr1", checkpoint=gr1_checkpoints["good"],
                               enable_actuation="true")
    with robot.watch(node):
        robot.spin_until(lambda: len(robot.controller) >= 2, 90, "trajectories", feed=True)
        # The second signal 20 ms after the first, while the robot keeps sending inputs.
        _two_sigints(node, lambda: robot.spin_for(0.02, feed=True))
        assert node.wait(timeout=20) == 0, node.text()
    text = node.text()
    assert "Traceback" not in text and "context is invalid" not in text, text


def test_two_sigints_end_a_busy_sim_bridge_cleanly(ros_env, tmp_path):
    """Busy: stepping the simulator and publishing at full speed. Exit code 0, no traceback.

    Episodes follow each other (`auto_reset`): at full speed one lasts about a second, which can
    end before this side's subscription is matched; the bridge then keeps publishing anyway.
    """
    node = NodeProcess(tmp_path / "bridge.log", "twinbrain_ros.ros.sim_bridge", [
        "--ros-args", "-p", "embodiment:=widowx", "-p", "image_width:=64",
        "-p", "image_height:=64", "-p", "wait_for_subscribers_s:=0.0",
        "-p", "real_time_factor:=0.0", "-p", "auto_reset:=true"])
    robot = RobotSide("widowx", watch=[node])
    try:
        from sensor_msgs.msg import JointState

        states = robot.listen(JointState, WIDOWX.joint_state_topic)
        robot.spin_until(lambda: len(states) >= 20, 120, "the bridge's joint states")
        _two_sigints(node, lambda: time.sleep(0.02))  # the gap between two signals, no sync
        assert node.wait(timeout=20) == 0, node.text()
    finally:
        robot.close()
        node.stop()
    text = node.text()
    assert "Traceback" not in text and "context is invalid" not in text, text
