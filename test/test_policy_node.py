"""The policy node in its own process, over real rclpy (PyPI Jazzy wheels), isolated domain."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import save_policy_checkpoint, stop_process_group

from twinbrain_ros.robot.embodiment import Embodiment, config_dir

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


class NodeProcess:
    """`python -m twinbrain_ros.ros.policy_node` with the GR1 params file and overrides."""

    def __init__(self, tmp_path: Path, checkpoint: Path, embodiment: str = "gr1", **params):
        self.log = tmp_path / "node.log"
        args = [sys.executable, "-m", "twinbrain_ros.ros.policy_node", "--ros-args",
                "--params-file", str(config_dir() / f"{embodiment}.yaml"),
                "-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu",
                "-p", "max_input_age_s:=1.0", "-p", "diagnostics_period_s:=0.5"]
        for key, value in params.items():
            args += ["-p", f"{key}:={value}"]
        self.handle = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self.handle, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=dict(os.environ))

    def text(self) -> str:
        return self.log.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        code = stop_process_group(self.proc, timeout=20)
        self.handle.close()
        return code


class RobotSide:
    """The test's own node: camera, joint states, instruction; listens to every output."""

    def __init__(self):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        self.rclpy = rclpy
        self.Image, self.JointState, self.String = Image, JointState, String
        rclpy.init()
        self.node = rclpy.create_node("robot_side")
        self.controller, self.dry_run, self.diagnostics = [], [], []
        self.node.create_subscription(JointTrajectory, GR1.trajectory_topic,
                                      self.controller.append, 10)
        self.node.create_subscription(JointTrajectory, GR1.dry_run_topic,
                                      self.dry_run.append, 10)
        self.node.create_subscription(DiagnosticArray, "/diagnostics",
                                      self.diagnostics.append, 10)
        self.image_pub = self.node.create_publisher(Image, GR1.image_topics[0], 10)
        self.joint_pub = self.node.create_publisher(JointState, GR1.joint_state_topic, 10)
        self.text_pub = self.node.create_publisher(String, GR1.instruction_topic, 10)
        self.state = np.clip(np.linspace(-0.3, 0.3, GR1.state_dim), GR1.lower, GR1.upper)

    def image(self, height=48, width=64, encoding="rgb8", step=None):
        msg = self.Image(height=height, width=width, encoding=encoding)
        msg.header.stamp = self.node.get_clock().now().to_msg()
        channels = {"rgb8": 3, "16UC1": 2}.get(encoding, 3)
        msg.step = step if step is not None else width * channels
        msg.data = bytes(np.random.default_rng(0).integers(0, 256, msg.step * height,
                                                           dtype=np.uint8))
        return msg

    def joints(self, names=None, positions=None):
        msg = self.JointState()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        # Extra joints and reversed order, as a real robot's joint_states would have them.
        msg.name = ["head_yaw"] + list(names or GR1.joint_names)[::-1]
        values = list(positions if positions is not None else self.state)[::-1]
        msg.position = [0.0] + [float(v) for v in values]
        return msg

    def publish(self, image=None, joints=None, text="pick up the red cup"):
        if image is not None:
            self.image_pub.publish(image)
        if joints is not None:
            self.joint_pub.publish(joints)
        if text is not None:
            self.text_pub.publish(self.String(data=text))

    def spin_for(self, seconds, publish=None):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if publish:
                publish()
            self.rclpy.spin_once(self.node, timeout_sec=0.05)

    def spin_until(self, condition, timeout, publish=None, node=None):
        """Spin until `condition()`, the timeout, or the death of `node` (a NodeProcess)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and not condition():
            if node is not None and not node.alive():
                break
            if publish:
                publish()
            self.rclpy.spin_once(self.node, timeout_sec=0.05)
        return condition()

    def diagnostic_values(self) -> dict:
        if not self.diagnostics:
            return {}
        return {kv.key: kv.value for kv in self.diagnostics[-1].status[0].values}

    def close(self):
        self.node.destroy_node()
        self.rclpy.shutdown()


@pytest.fixture
def robot(ros_env):
    side = RobotSide()
    yield side
    side.close()


def _valid(robot):
    return lambda: robot.publish(robot.image(), robot.joints())


def _times(traj):
    return np.array([p.time_from_start.sec + p.time_from_start.nanosec * 1e-9
                     for p in traj.points])


def test_publishes_a_safe_trajectory_for_the_embodiment(robot, gr1_checkpoints, tmp_path):
    node = NodeProcess(tmp_path, gr1_checkpoints["good"], enable_actuation="true")
    try:
        assert robot.spin_until(lambda: robot.controller, 90, _valid(robot), node), node.text()
        traj = robot.controller[0]
        assert list(traj.joint_names) == GR1.joint_names
        times = _times(traj)
        assert len(times) >= 1 and times[0] > 0 and np.all(np.diff(times) > 0)
        positions = np.array([p.positions for p in traj.points])
        assert np.all(positions >= GR1.lower - 1e-9) and np.all(positions <= GR1.upper + 1e-9)
        # No step larger than the embodiment allows, starting from the measured state.
        steps = np.diff(np.vstack([robot.state, positions]), axis=0)
        assert np.all(np.abs(steps) <= GR1.max_step + 1e-6)
        assert all(len(p.velocities) == GR1.state_dim for p in traj.points)
        assert traj.header.stamp.sec == 0 and traj.header.stamp.nanosec == 0
        assert not robot.dry_run
        # /diagnostics is periodic: wait for one sent after the first chunk was inferred.
        assert robot.spin_until(
            lambda: "inference_latency_median_ms" in robot.diagnostic_values(), 10)
        values = robot.diagnostic_values()
        assert values["actuation_enabled"] == "True"
        assert float(values["inference_latency_median_ms"]) > 0
        assert node.alive()
    finally:
        node.stop()


def test_actuation_gate_keeps_the_controller_topic_silent(robot, gr1_checkpoints, tmp_path):
    node = NodeProcess(tmp_path, gr1_checkpoints["good"])  # enable_actuation defaults to false
    try:
        assert robot.spin_until(lambda: len(robot.dry_run) >= 2, 90, _valid(robot), node), \
            node.text()
        assert robot.controller == []
        assert "dry run on /policy/dry_run/joint_trajectory" in node.text()
    finally:
        node.stop()


def test_bad_inputs_are_dropped_logged_and_counted(robot, gr1_checkpoints, tmp_path):
    node = NodeProcess(tmp_path, gr1_checkpoints["good"], enable_actuation="true")
    bad_joints = list(GR1.joint_names)
    nan_state = robot.state.copy()
    nan_state[3] = np.nan
    phases = [
        lambda: robot.publish(robot.image(encoding="16UC1"), None, None),
        lambda: robot.publish(robot.image(step=10), None, None),
        lambda: robot.publish(None, robot.joints(names=bad_joints[:-1],
                                                 positions=robot.state[:-1]), None),
        lambda: robot.publish(None, robot.joints(positions=nan_state), None),
        lambda: robot.publish(None, None, "   "),
    ]
    try:
        # Nothing valid ever arrives: every phase is rejected and no trajectory is published.
        ready = robot.spin_until(lambda: "policy node ready" in node.text(), 90, None, node)
        assert ready, node.text()
        for phase in phases:
            robot.spin_for(1.0, phase)
        robot.spin_for(1.0)
        assert robot.controller == [] and robot.dry_run == []
        log = node.text()
        for expected in ["unsupported image encoding '16UC1'", "has step 10",
                         "lacks joints ['torso_waist_roll']", "non-finite positions",
                         "rejected an empty instruction"]:
            assert expected in log, expected
        values = robot.diagnostic_values()
        for cause in ["unsupported_encoding", "image_size", "missing_joints", "non_finite_joints",
                      "empty_instruction"]:
            assert int(values.get(f"rejected.{cause}", 0)) > 0, cause

        # Valid input: the node is alive and answers.
        assert robot.spin_until(lambda: robot.controller, 60, _valid(robot), node), node.text()
        # The camera changes resolution mid-run (even to a tiny one and back): every size is
        # usable, nothing is locked in, and trajectories keep coming.
        for height, width in ((2, 2), (96, 128), (48, 64)):
            count = len(robot.controller)
            assert robot.spin_until(lambda c=count: len(robot.controller) >= c + 2, 30,
                                    lambda h=height, w=width: robot.publish(
                                        robot.image(h, w), robot.joints()), node), node.text()
        assert "size changed" not in node.text()
        assert node.alive()
    finally:
        node.stop()


def test_a_model_returning_nan_holds_the_robot_still(robot, gr1_checkpoints, tmp_path):
    node = NodeProcess(tmp_path, gr1_checkpoints["nan"], enable_actuation="true")
    try:
        assert robot.spin_until(lambda: robot.controller, 90, _valid(robot), node), node.text()
        hold = robot.controller[0]
        assert len(hold.points) == 1
        np.testing.assert_allclose(hold.points[0].positions, robot.state)
        assert np.all(np.array(hold.points[0].velocities) == 0)
        assert "holding position: the model returned non-finite actions" in node.text()
        robot.spin_for(1.0, _valid(robot))
        assert "non_finite_actions" in robot.diagnostic_values()["last_error"]
        assert node.alive()
    finally:
        assert node.stop() == 0


def test_missing_params_file_is_a_clear_error(ros_env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "twinbrain_ros.ros.policy_node", "--ros-args",
                           "-p", "checkpoint:=/nowhere"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))
    assert proc.returncode == 1
    assert "missing embodiment parameters" in proc.stdout + proc.stderr
    assert "--params-file config/<embodiment>.yaml" in proc.stdout + proc.stderr


def test_widowx_end_effector_deltas_drive_arm_and_gripper_controllers(robot, gr1_checkpoints,
                                                                        tmp_path):
    from trajectory_msgs.msg import JointTrajectory

    arm, gripper = [], []
    robot.node.create_subscription(JointTrajectory, WIDOWX.trajectory_topic, arm.append, 10)
    robot.node.create_subscription(JointTrajectory, WIDOWX.gripper_topic, gripper.append, 10)
    state = np.array([0.0, 0.1, -0.2, 0.0, 0.4, 0.0, 0.03])

    def publish():
        robot.publish(robot.image(), robot.joints(WIDOWX.joint_names, state))

    node = NodeProcess(tmp_path, gr1_checkpoints["widowx"], "widowx", enable_actuation="true")
    try:
        assert robot.spin_until(lambda: arm and gripper, 90, publish, node), node.text()
        assert list(arm[0].joint_names) == WIDOWX.joint_names[:6]
        assert list(gripper[0].joint_names) == ["left_finger"]
        positions = np.array([p.positions for p in arm[0].points])
        assert np.all(positions >= WIDOWX.lower[:6]) and np.all(positions <= WIDOWX.upper[:6])
        # Small end-effector steps give small joint steps, starting near the measured state.
        assert np.abs(positions[0] - state[:6]).max() <= 0.3 + 1e-6
        fingers = np.array([p.positions[0] for p in gripper[0].points])
        assert np.all((fingers >= 0.015 - 1e-9) & (fingers <= 0.037 + 1e-9))
        assert len(arm[0].points) == len(gripper[0].points)
    finally:
        node.stop()


def test_checkpoint_of_another_embodiment_fails_at_start(ros_env, gr1_checkpoints):
    proc = subprocess.run(
        [sys.executable, "-m", "twinbrain_ros.ros.policy_node", "--ros-args",
         "--params-file", str(config_dir() / "widowx.yaml"),
         "-p", f"checkpoint:={gr1_checkpoints['good']}", "-p", "device:=cpu"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 1
    assert "has no embodiment 'widowx'" in proc.stdout + proc.stderr


def test_the_joint_state_stamped_nearest_the_image_is_used():
    from twinbrain_ros.ros.policy_node import _matching_joint_state

    # joint states at 50 Hz, the camera at 5 Hz: the newest joint state is 0.18 s past the image
    history = [(np.full(2, k), 100.0 + 0.02 * k, 10.0 + 0.02 * k) for k in range(20)]
    chosen = _matching_joint_state(history, image_stamps=[10.2])
    assert chosen[2] == pytest.approx(10.2)
    # unstamped inputs: the newest joint state
    unstamped = [(np.zeros(2), 1.0, 0.0), (np.ones(2), 2.0, 0.0)]
    assert _matching_joint_state(unstamped, image_stamps=[0.0]) is unstamped[-1]


@pytest.mark.parametrize("module, params", [
    ("policy_node", ["--params-file", str(config_dir() / "gr1.yaml"), "-p", "device:=cpu",
                     "-p", "enable_actuation:=true"]),
    ("sim_bridge", ["-p", "embodiment:=widowx", "-p", "image_width:=64",
                    "-p", "image_height:=64", "-p", "wait_for_subscribers_s:=0.0",
                    "-p", "real_time_factor:=0.0"]),
])
def test_two_sigints_end_a_busy_node_cleanly(ros_env, gr1_checkpoints, tmp_path, module,
                                            params):
    """A terminal's Ctrl-C under `ros2 launch` reaches a node twice: exit 0, no traceback."""
    import signal

    command = [sys.executable, "-m", f"twinbrain_ros.ros.{module}", "--ros-args", *params]
    if module == "policy_node":
        command += ["-p", f"checkpoint:={gr1_checkpoints['good']}"]
    log = tmp_path / "node.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, env=dict(os.environ))
        try:
            deadline = time.monotonic() + 120
            while "ready" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.1)
            if module == "policy_node":  # busy: planning while the signals come
                side = RobotSide()
                try:
                    side.spin_until(lambda: side.controller, 60, _valid(side))
                    assert side.controller, log.read_text()
                    for _ in range(2):
                        os.killpg(proc.pid, signal.SIGINT)
                        side.spin_for(0.02, _valid(side))
                    assert proc.wait(timeout=20) == 0, log.read_text()
                finally:
                    side.close()
            else:  # busy: stepping the simulator and publishing at full speed
                time.sleep(2.0)
                for _ in range(2):
                    os.killpg(proc.pid, signal.SIGINT)
                    time.sleep(0.02)
                assert proc.wait(timeout=20) == 0, log.read_text()
        finally:
            stop_process_group(proc, timeout=10)
    text = log.read_text()
    assert "Traceback" not in text and "context is invalid" not in text, text
