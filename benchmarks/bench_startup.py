r"""Start-up of the policy node: where the time goes from launch to the first trajectory.

A random-weight WidowX policy (`make_tiny_checkpoint --policy widowx`) is started as
`python -m twinbrain_ros.ros.policy_node` (what `ros2 launch twinbrain_ros policy.launch.py`
runs), with a robot side in this process publishing a camera image, joint states and the
instruction. Measured per run, from the process start: the node's `/policy/ready` message
(model loaded) and the first trajectory on the dry-run topic. Then, in a fresh interpreter,
the stages one by one: importing rclpy and the messages, torch, transformers, the policy node
module, loading the embodiment (with its kinematics), loading the checkpoint, the first
inference. Medians over `--runs`.

Usage:
  python benchmarks/bench_startup.py
  python benchmarks/bench_startup.py --runs 5 --embodiment gr1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

STAGES = r"""
import json, sys, time
t = time.perf_counter(); marks = {}
def mark(name):
    global t
    now = time.perf_counter(); marks[name] = now - t; t = now
import rclpy, sensor_msgs.msg, trajectory_msgs.msg, std_msgs.msg, diagnostic_msgs.msg
mark("import rclpy and messages")
import torch
mark("import torch")
import transformers
mark("import transformers")
import twinbrain_ros.ros.policy_node
mark("import the policy node module")
from twinbrain_ros.robot.embodiment import Embodiment
from twinbrain_ros.robot.observation import Observation
embodiment = Embodiment.load(sys.argv[2]); embodiment.actions
if embodiment.kinematics:
    embodiment.actions.kinematics
mark("load the embodiment (and kinematics)")
from twinbrain_ros.policy.runtime import PolicyRuntime
runtime = PolicyRuntime(sys.argv[1], embodiment, device="cpu", seed=0)
mark("load the checkpoint")
import numpy as np
image = np.zeros((224, 224, 3), np.uint8)
state = np.clip(np.zeros(embodiment.state_dim), embodiment.lower, embodiment.upper)
runtime.infer(Observation(images=[image], state=state, instruction="pick up the cube"))
mark("first inference")
print(json.dumps(marks))
"""


def end_to_end(checkpoint: Path, embodiment_name: str, timeout_s: float = 180.0) -> dict:
    """Seconds from starting the node process to its ready message and first trajectory."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    from twinbrain_ros.robot.embodiment import Embodiment, description_file
    from twinbrain_ros.ros.conversions import rgb_to_image
    from twinbrain_ros.ros.processes import ros_environment, start_node, stop_node
    from twinbrain_ros.ros.topics import READY_QOS, READY_TOPIC

    emb = Embodiment.load(embodiment_name)
    env = ros_environment(Path(tempfile.mkdtemp(prefix="bench_startup_")))
    rclpy.init()
    node = rclpy.create_node("bench_robot")
    seen: dict[str, float] = {}
    node.create_subscription(String, READY_TOPIC,
                             lambda m: seen.setdefault("ready", time.monotonic()), READY_QOS)
    node.create_subscription(JointTrajectory, emb.dry_run_topic,
                             lambda m: seen.setdefault("trajectory", time.monotonic()), 10)
    image_pub = node.create_publisher(Image, emb.image_topics[0], 10)
    joint_pub = node.create_publisher(JointState, emb.joint_state_topic, 10)
    text_pub = node.create_publisher(String, emb.instruction_topic, 10)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    state = np.clip(np.zeros(emb.state_dim), emb.lower, emb.upper)
    frame = np.zeros((224, 224, 3), np.uint8)
    started = time.monotonic()
    process = start_node("policy_node", env, {"checkpoint": str(checkpoint), "device": "cpu"},
                         params_file=description_file(embodiment_name))
    try:
        while "trajectory" not in seen and time.monotonic() - started < timeout_s:
            if process.poll() is not None:
                raise RuntimeError(f"the policy node exited with {process.returncode}")
            stamp = node.get_clock().now().to_msg()
            image = rgb_to_image(frame, stamp=stamp)
            joints = JointState(name=list(emb.joint_names), position=[float(v) for v in state])
            joints.header.stamp = stamp
            image_pub.publish(image)
            joint_pub.publish(joints)
            text_pub.publish(String(data="pick up the red cube"))
            executor.spin_once(timeout_sec=0.02)
    finally:
        stop_node(process)
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown()
    return {key: value - started for key, value in seen.items()}


def main() -> int:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embodiment", default="widowx", choices=["widowx", "gr1"])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from twinbrain_ros.tools.make_tiny_checkpoint import make_tiny_policy

    checkpoint = make_tiny_policy(args.embodiment, tempfile.mkdtemp(prefix="tiny_policy_"))
    totals, stages = [], []
    for _ in range(args.runs):
        totals.append(end_to_end(checkpoint, args.embodiment))
        out = subprocess.run([sys.executable, "-c", STAGES, str(checkpoint), args.embodiment],
                             capture_output=True, text=True, check=True, cwd=REPO_ROOT)
        stages.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.embodiment}, tiny random-weight policy, CPU, median of {args.runs} runs")
    print("\n| from the process start to | seconds |\n|---|---|")
    for key, label in (("ready", "`/policy/ready` (model loaded)"),
                       ("trajectory", "the first trajectory")):
        values = [t[key] for t in totals if key in t]
        print(f"| {label} | {statistics.median(values):.1f} |")
    print("\n| stage (fresh interpreter, in order) | seconds |\n|---|---|")
    for name in stages[0]:
        print(f"| {name} | {statistics.median(s[name] for s in stages):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
