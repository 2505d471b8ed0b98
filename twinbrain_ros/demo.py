"""Demo: the policy node on a small random-weight checkpoint against a short synthetic input.

1. makes a tiny random-weight Qwen3-VL backbone and a TwinBrainVLA checkpoint for the WidowX
   (Bridge end-effector delta actions; the weights are random: the motion is meaningless, the
   plumbing is real);
2. starts the policy node in its own process with `config/widowx.yaml` (actuation off, so the
   trajectory goes to the dry-run topic), which turns the deltas into joint targets by inverse
   kinematics of the WX250s, schedules and safety-checks them;
3. publishes a 640x480 camera image, joint states and an instruction over ROS 2, and prints the
   JointTrajectory the node publishes.

Usage: `make demo`, `ros2 run twinbrain_ros demo` or `python -m twinbrain_ros.demo`.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_demo_checkpoint(root: Path, embodiment) -> Path:
    """A tiny twin-brain checkpoint for `embodiment` (random weights)."""
    from .model.tiny import make_tiny_checkpoint, make_tiny_policy_checkpoint
    from .model.twinbrain import EmbodimentSpec

    backbone = make_tiny_checkpoint("qwen3_vl", root / "backbone")
    spec = EmbodimentSpec(state_dim=embodiment.state_dim, action_dim=embodiment.action_dim,
                          action_space=embodiment.action_space)
    return make_tiny_policy_checkpoint(backbone, root / "checkpoint",
                                       embodiment.normalization_key, spec)


def synthetic_image(height: int = 480, width: int = 640) -> np.ndarray:
    """A colour gradient with a red square: a stand-in camera frame."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 96)], -1)
    rgb[200:280, 300:380] = (220, 30, 30)
    return rgb.astype(np.uint8)


def run_demo(timeout_s: float = 120.0) -> int:
    """Run the demo; returns a process exit code."""
    import rclpy
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    from .embodiment import Embodiment, config_dir
    from .ros.conversions import rgb_to_image

    embodiment = Embodiment.load("widowx")
    params_file = config_dir() / "widowx.yaml"
    with tempfile.TemporaryDirectory(prefix="twinbrain_demo_") as tmp:
        root = Path(tmp)
        print("[1/3] making a tiny random-weight checkpoint ...", flush=True)
        checkpoint = make_demo_checkpoint(root, embodiment)
        env = dict(os.environ)
        env.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 200)))
        env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        env.setdefault("ROS_LOG_DIR", str(root / "ros_log"))
        os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE",
                                                "ROS_LOG_DIR")})
        print(f"[2/3] starting the policy node with {params_file} "
              f"(ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']}) ...", flush=True)
        node_proc = subprocess.Popen(
            [sys.executable, "-m", "twinbrain_ros.ros.policy_node", "--ros-args",
             "--params-file", str(params_file), "-p", f"checkpoint:={checkpoint}",
             "-p", "device:=cpu", "-p", "seed:=0"],
            env=env, start_new_session=True)
        received: list[JointTrajectory] = []
        rclpy.init()
        node = rclpy.create_node("demo_inputs")
        try:
            # Actuation is off by default: the node publishes on the dry-run topic.
            node.create_subscription(JointTrajectory, embodiment.dry_run_topic,
                                     received.append, 10)
            image_pub = node.create_publisher(Image, embodiment.image_topics[0], 10)
            joint_pub = node.create_publisher(JointState, embodiment.joint_state_topic, 10)
            text_pub = node.create_publisher(String, embodiment.instruction_topic, 10)
            image = synthetic_image()
            # Joint states arrive with extra joints and in another order, as on the robot.
            names = ["gripper", "right_finger"] + embodiment.joint_names[::-1]
            state = [0.0, 0.1, -0.2, 0.0, 0.4, 0.0, 0.03]
            positions = [0.0, -0.03] + state[::-1]
            print("[3/3] publishing camera, joint states and the instruction "
                  "'put the carrot on the plate' ...", flush=True)
            deadline = time.monotonic() + timeout_s
            while not received and time.monotonic() < deadline:
                if node_proc.poll() is not None:
                    print(f"the policy node exited with code {node_proc.returncode}")
                    return 1
                stamp = node.get_clock().now().to_msg()
                image_pub.publish(rgb_to_image(image, stamp))
                joint_state = JointState(name=names, position=positions)
                joint_state.header.stamp = stamp
                joint_pub.publish(joint_state)
                text_pub.publish(String(data="put the carrot on the plate"))
                rclpy.spin_once(node, timeout_sec=0.2)
            if not received:
                print(f"no trajectory within {timeout_s:.0f} s")
                return 1
            measured = dict(zip(embodiment.joint_names, state, strict=True))
            print(f"\nmeasured joint state: {measured}")
            print_trajectory(received[0])
            return 0
        finally:
            node.destroy_node()
            rclpy.shutdown()
            if node_proc.poll() is None:
                os.killpg(node_proc.pid, signal.SIGINT)
                try:
                    node_proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(node_proc.pid, signal.SIGKILL)


def print_trajectory(msg) -> None:
    """Print a JointTrajectory as a table."""
    print(f"\nJointTrajectory with {len(msg.points)} points, joints: {', '.join(msg.joint_names)}")
    print("  t [s] | " + " ".join(f"{name[:8]:>8}" for name in msg.joint_names))
    for point in msg.points:
        t = point.time_from_start.sec + point.time_from_start.nanosec * 1e-9
        print(f"  {t:5.2f} | " + " ".join(f"{x:8.3f}" for x in point.positions))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the first trajectory")
    args = parser.parse_args(argv)
    return run_demo(args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
