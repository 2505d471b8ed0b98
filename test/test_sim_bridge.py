"""The sim bridge over real rclpy: topics out, trajectories in, episodes, and `evaluate`."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("mujoco", reason="the WidowX MuJoCo backend needs mujoco")

from twinbrain_ros.robot.embodiment import Embodiment  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.slow]

WIDOWX = Embodiment.load("widowx")


class Listener:
    """A test node that records what the bridge publishes, spinning in a thread."""

    def __init__(self, context):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import Bool, String
        from trajectory_msgs.msg import JointTrajectory

        from twinbrain_ros.ros.sim_bridge import EPISODE_TOPIC, EVENT_QOS, SUCCESS_TOPIC

        self.node = rclpy.create_node("bridge_listener", context=context)
        self.joints, self.images, self.events, self.instructions, self.success = [], [], [], [], []
        self.node.create_subscription(JointState, WIDOWX.joint_state_topic, self.joints.append,
                                      10)
        self.node.create_subscription(Image, WIDOWX.image_topics[0], self.images.append,
                                      qos_profile_sensor_data)
        self.node.create_subscription(String, EPISODE_TOPIC,
                                      lambda m: self.events.append(json.loads(m.data)), EVENT_QOS)
        self.node.create_subscription(String, WIDOWX.instruction_topic,
                                      lambda m: self.instructions.append(m.data), 10)
        self.node.create_subscription(Bool, SUCCESS_TOPIC, lambda m: self.success.append(m.data),
                                      10)
        self.arm = self.node.create_publisher(JointTrajectory, WIDOWX.trajectory_topic, 10)
        self.gripper = self.node.create_publisher(JointTrajectory, WIDOWX.gripper_topic, 10)
        self.reset = self.node.create_publisher(String, "/sim/reset", 10)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def wait_for(self, predicate, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")

    def close(self):
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()


@pytest.fixture
def bridge(ros_env):
    """A SimBridge node (WidowX MuJoCo, pick_cube, 64x64) and a listener, own context."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from twinbrain_ros.ros.sim_bridge import SimBridge

    context = rclpy.Context()
    rclpy.init(context=context)
    node = SimBridge(context=context, parameter_overrides=[
        Parameter("embodiment", value="widowx"), Parameter("task", value="pick_cube"),
        Parameter("image_width", value=64), Parameter("image_height", value=64),
        Parameter("seed", value=3), Parameter("wait_for_subscribers_s", value=5.0)])
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    listener = Listener(context)
    yield node, listener
    listener.close()
    executor.shutdown(timeout_sec=1.0)
    node.destroy_node()
    rclpy.shutdown(context=context)


def test_bridge_publishes_the_robot_and_executes_trajectories(bridge):
    from twinbrain_ros.ros.conversions import image_to_rgb, make_trajectory

    node, listener = bridge
    listener.wait_for(lambda: listener.events and listener.images and len(listener.joints) > 5,
                      30.0, "the first episode's observations")
    start = listener.events[0]
    assert start["event"] == "start" and start["seed"] == 3
    assert start["info"]["target"] in start["instruction"]
    assert listener.instructions and listener.instructions[-1] == start["instruction"]
    frame = image_to_rgb(listener.images[-1])
    assert frame.shape == (64, 64, 3) and frame.std() > 1.0          # a rendered scene
    state = listener.joints[-1]
    assert list(state.name) == WIDOWX.joint_names
    stamp = state.header.stamp.sec + state.header.stamp.nanosec * 1e-9
    assert stamp > 0                                                   # simulated time

    # Arm and gripper trajectories on the controller topics move the simulated joints.
    q0 = np.array(state.position)
    arm_target = q0[:6] + np.array([0.25, -0.15, 0.2, 0.0, 0.2, -0.3])
    arm_names = WIDOWX.joint_names[:6]
    waypoints = np.linspace(q0[:6], arm_target, 6)[1:]
    listener.arm.publish(make_trajectory(arm_names, waypoints, 0.2))
    listener.gripper.publish(make_trajectory([WIDOWX.gripper_joint], [[0.022]], 0.6))

    def reached():
        q = np.array(listener.joints[-1].position)
        return np.all(np.abs(q[:6] - arm_target) < 0.03) and abs(q[6] - 0.022) < 0.004

    listener.wait_for(reached, 20.0, "the joints to reach the trajectory's targets")

    # A bad trajectory is ignored and the robot holds where it is.
    listener.arm.publish(make_trajectory(["waist", "no_such_joint"], [[0.0, 0.0]], 0.2))
    time.sleep(1.0)
    q = np.array(listener.joints[-1].position)
    assert np.all(np.abs(q[:6] - arm_target) < 0.03)


def test_reset_requests_start_new_seeded_episodes(bridge):
    from std_msgs.msg import String

    node, listener = bridge
    listener.wait_for(lambda: listener.events and listener.joints, 30.0, "the first episode")
    before = listener.joints[-1].header.stamp
    listener.reset.publish(String(data=json.dumps({"seed": 42})))
    listener.wait_for(lambda: any(e["seed"] == 42 for e in listener.events), 30.0,
                      "episode seed 42")
    # Simulated time skips episode_gap_s (5 s) at the reset: no plan outlives its episode.
    start = next(e for e in listener.events if e["seed"] == 42)
    assert start["sim_time"] >= before.sec + before.nanosec * 1e-9 + 5.0
    listener.reset.publish(String(data="not json"))                 # logged and ignored
    listener.reset.publish(String(data=json.dumps({"task": "no_such_task"})))
    time.sleep(0.5)
    assert [e["seed"] for e in listener.events if e["event"] == "start"] == [3, 42]
    assert node._episode is not None                                 # still running


def test_evaluate_with_the_scripted_expert_reports_its_success_rate(ros_env, tmp_path, capsys):
    from twinbrain_ros.ros.evaluate import main

    out = tmp_path / "eval"
    code = main(["--embodiment", "widowx", "--tasks", "pick_cube", "--episodes", "3",
                 "--seed", "100", "--policy", "expert", "--image-size", "64",
                 "--real-time-factor", "4", "--out", str(out), "--video", "1", "--plot"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads((out / "results.json").read_text())
    assert [e["seed"] for e in results["episodes"]] == [100, 101, 102]
    rate = results["summary"]["tasks"]["pick_cube"]["success_rate"]
    assert rate >= 2 / 3, printed
    assert f"{100 * rate:.1f}%" in printed and "Avg@3" in printed
    assert (out / "success.png").stat().st_size > 0
    videos = list((out / "videos").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0
