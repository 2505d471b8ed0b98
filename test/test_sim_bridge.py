"""The sim bridge over real rclpy: topics out, trajectories in, episodes, and `evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ros_harness import RobotSide

pytest.importorskip("mujoco", reason="the WidowX MuJoCo backend needs mujoco")

from rclpy.qos import qos_profile_sensor_data  # noqa: E402

from twinbrain_ros.robot.embodiment import Embodiment  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.slow]

WIDOWX = Embodiment.load("widowx")


@pytest.fixture
def bridge(ros_env):
    """A SimBridge node (WidowX MuJoCo, pick_cube, 64x64) spun by a RobotSide that listens to
    what the simulated robot publishes (the policy's side), in a context of their own."""
    import rclpy
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Bool, String
    from trajectory_msgs.msg import JointTrajectory

    from twinbrain_ros.ros.sim_bridge import EPISODE_TOPIC, EVENT_QOS, SUCCESS_TOPIC, SimBridge

    context = rclpy.Context()
    rclpy.init(context=context)
    listener = RobotSide(WIDOWX, name="bridge_listener", context=context)
    node = SimBridge(context=context, parameter_overrides=[
        Parameter("embodiment", value="widowx"), Parameter("task", value="pick_cube"),
        Parameter("image_width", value=64), Parameter("image_height", value=64),
        Parameter("seed", value=3), Parameter("wait_for_subscribers_s", value=5.0)])
    listener.add_node(node)
    listener.joints = listener.listen(JointState, WIDOWX.joint_state_topic)
    listener.images = listener.listen(Image, WIDOWX.image_topics[0], qos_profile_sensor_data)
    listener.events = listener.listen(String, EPISODE_TOPIC, EVENT_QOS,
                                      convert=lambda m: json.loads(m.data))
    listener.instructions = listener.listen(String, WIDOWX.instruction_topic,
                                            convert=lambda m: m.data)
    listener.success = listener.listen(Bool, SUCCESS_TOPIC, convert=lambda m: m.data)
    listener.arm = listener.node.create_publisher(JointTrajectory, WIDOWX.trajectory_topic, 10)
    listener.gripper_pub = listener.node.create_publisher(JointTrajectory, WIDOWX.gripper_topic,
                                                          10)
    listener.reset = listener.node.create_publisher(String, "/sim/reset", 10)
    yield node, listener
    listener.close()
    rclpy.shutdown(context=context)


def test_bridge_publishes_the_robot_and_executes_trajectories(bridge):
    from twinbrain_ros.ros.conversions import image_to_rgb, make_trajectory

    node, listener = bridge
    listener.spin_until(lambda: listener.events and listener.images and len(listener.joints) > 5,
                        30.0, "the first episode's observations")
    start = listener.events[0]
    assert start["event"] == "start" and start["seed"] == 3
    assert start["info"]["target"] in start["instruction"]
    listener.spin_until(lambda: listener.instructions, 10.0, "the episode's instruction")
    assert listener.instructions[-1] == start["instruction"]
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
    listener.gripper_pub.publish(make_trajectory([WIDOWX.gripper_joint], [[0.022]], 0.6))

    def reached():
        q = np.array(listener.joints[-1].position)
        return np.all(np.abs(q[:6] - arm_target) < 0.03) and abs(q[6] - 0.022) < 0.004

    listener.spin_until(reached, 20.0, "the joints to reach the trajectory's targets",
                        show=lambda: list(listener.joints[-1].position))

    # A bad trajectory is ignored and the robot holds where it is.
    listener.arm.publish(make_trajectory(["waist", "no_such_joint"], [[0.0, 0.0]], 0.2))
    listener.spin_until(lambda: node.ignored["trajectory"] >= 1, 10.0, "the trajectory ignored")
    seen = len(listener.joints)
    listener.spin_until(lambda: len(listener.joints) >= seen + 10, 10.0,
                        "ten joint states after it")
    q = np.array(listener.joints[-1].position)
    assert np.all(np.abs(q[:6] - arm_target) < 0.03)


def test_reset_requests_start_new_seeded_episodes(bridge):
    from std_msgs.msg import String

    node, listener = bridge
    listener.spin_until(lambda: listener.events and listener.joints, 30.0, "the first episode")
    before = listener.joints[-1].header.stamp
    listener.reset.publish(String(data=json.dumps({"seed": 42})))
    listener.spin_until(lambda: any(e["seed"] == 42 for e in listener.events), 30.0,
                        "episode seed 42", show=lambda: listener.events)
    # Simulated time skips episode_gap_s (5 s) at the reset: no plan outlives its episode.
    start = next(e for e in listener.events if e["seed"] == 42)
    assert start["sim_time"] >= before.sec + before.nanosec * 1e-9 + 5.0
    listener.reset.publish(String(data="not json"))                 # logged and ignored
    listener.reset.publish(String(data=json.dumps({"task": "no_such_task"})))
    listener.spin_until(lambda: node.ignored["reset"] == 2, 10.0, "both requests ignored",
                        show=lambda: dict(node.ignored))
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
