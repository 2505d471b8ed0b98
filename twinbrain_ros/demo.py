"""Demo: the policy node on a small random-weight checkpoint against a short synthetic input.

1. makes a tiny random-weight Qwen3-VL backbone and a TwinBrainVLA checkpoint for the WidowX
   joints (the weights are random: the motion is meaningless, the plumbing is real);
2. starts the policy node in its own process (`python -m twinbrain_ros.ros.policy_node`);
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

WIDOWX_JOINTS = ["waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate",
                 "gripper"]


def make_demo_checkpoint(root: Path) -> Path:
    """A tiny twin-brain checkpoint with a `widowx` embodiment (7 joints in, 7 out)."""
    import torch

    from .model.action_expert import ActionExpertConfig
    from .model.checkpoint import save_checkpoint
    from .model.tiny import make_tiny_checkpoint
    from .model.twinbrain import EmbodimentSpec, TwinBrainConfig, TwinBrainVLA

    backbone = make_tiny_checkpoint("qwen3_vl", root / "backbone")
    config = TwinBrainConfig(
        backbone_path=str(backbone), brain_mode="twin",
        embodiments={"widowx": EmbodimentSpec(state_dim=7, action_dim=7)},
        image_size=(112, 112),
        action_expert=ActionExpertConfig(action_dim=7, horizon=8, hidden_size=64,
                                         num_layers=4, num_heads=4))
    torch.manual_seed(0)
    model = TwinBrainVLA.from_backbone(config)
    with torch.no_grad():  # stand-in for training, so that the output is not pure noise
        for p in model.action_expert.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return save_checkpoint(model, root / "checkpoint")


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

    from .ros.conversions import rgb_to_image

    with tempfile.TemporaryDirectory(prefix="twinbrain_demo_") as tmp:
        root = Path(tmp)
        print("[1/3] making a tiny random-weight checkpoint ...", flush=True)
        checkpoint = make_demo_checkpoint(root)
        env = dict(os.environ)
        env.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 200)))
        env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        env.setdefault("ROS_LOG_DIR", str(root / "ros_log"))
        os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE",
                                                "ROS_LOG_DIR")})
        print(f"[2/3] starting the policy node (ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']}) ...",
              flush=True)
        joints = "[" + ",".join(f"'{j}'" for j in WIDOWX_JOINTS) + "]"
        node_proc = subprocess.Popen(
            [sys.executable, "-m", "twinbrain_ros.ros.policy_node", "--ros-args",
             "-p", f"checkpoint:={checkpoint}", "-p", "embodiment:=widowx",
             "-p", f"joint_names:={joints}", "-p", "device:=cpu", "-p", "seed:=0",
             "-p", "trajectory_topic:=/demo/joint_trajectory"],
            env=env, start_new_session=True)
        received: list[JointTrajectory] = []
        rclpy.init()
        node = rclpy.create_node("demo_inputs")
        try:
            node.create_subscription(JointTrajectory, "/demo/joint_trajectory",
                                     received.append, 10)
            image_pub = node.create_publisher(Image, "/camera/image_raw", 10)
            joint_pub = node.create_publisher(JointState, "/joint_states", 10)
            text_pub = node.create_publisher(String, "/instruction", 10)
            image = synthetic_image()
            # Joint states arrive with finger joints and in another order, as on the robot.
            names = ["left_finger", "right_finger"] + WIDOWX_JOINTS[::-1]
            positions = [0.01, -0.01] + [0.0, 0.1, -0.2, 0.3, 0.4, -0.1, 0.05][::-1]
            print("[3/3] publishing camera, joint states and the instruction "
                  "'put the carrot on the plate' ...", flush=True)
            deadline = time.monotonic() + timeout_s
            while not received and time.monotonic() < deadline:
                if node_proc.poll() is not None:
                    print(f"the policy node exited with code {node_proc.returncode}")
                    return 1
                stamp = node.get_clock().now().to_msg()
                image_pub.publish(rgb_to_image(image, stamp))
                joint_pub.publish(JointState(name=names, position=positions))
                text_pub.publish(String(data="put the carrot on the plate"))
                rclpy.spin_once(node, timeout_sec=0.2)
            if not received:
                print(f"no trajectory within {timeout_s:.0f} s")
                return 1
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
