r"""End-to-end ROS overhead of the policy node: last input message -> trajectory, minus the model.

A PolicyNode (tiny random-weight checkpoint, CPU) and a robot-side node run in this process over
real rclpy / Fast DDS (not intra-process: every message is serialised and goes through the
middleware). The robot side publishes a 640x480 rgb8 image and a joint state (stamped with the
publish time) at `--input-hz`, plus the instruction. For every trajectory received:

    latency   = trajectory received - publish time of the newest input the cycle used
    waiting   = cycle start - receipt of that input (the node runs cycles on its period,
                so this is scheduling, not overhead)
    overhead  = latency - waiting - model time

i.e. the transport of image + joint state, their conversion, the snapshot, scheduling, safety,
building and publishing the trajectory, and its transport back. Prints medians and p95.

Usage:
  python benchmarks/bench_ros_overhead.py                 # GR1 (17 joints), 40 cycles
  python benchmarks/bench_ros_overhead.py --embodiment widowx --cycles 60
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main(argv=None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embodiment", default="gr1", choices=["gr1", "widowx"])
    parser.add_argument("--cycles", type=int, default=40)
    parser.add_argument("--input-hz", type=float, default=15.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 200)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

    import rclpy
    import yaml
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    from twinbrain_ros.model.tiny import make_tiny_checkpoint, make_tiny_policy_checkpoint
    from twinbrain_ros.policy.runtime import PolicyRuntime
    from twinbrain_ros.robot.embodiment import Embodiment, config_dir
    from twinbrain_ros.ros.conversions import rgb_to_image
    from twinbrain_ros.ros.policy_node import PolicyNode

    embodiment = Embodiment.load(args.embodiment)
    params = yaml.safe_load((config_dir() / f"{args.embodiment}.yaml").read_text())
    params = params["policy_node"]["ros__parameters"]
    with tempfile.TemporaryDirectory() as tmp:
        backbone = make_tiny_checkpoint("qwen2_5_vl", Path(tmp) / "backbone")
        spec = embodiment.spec()
        checkpoint = make_tiny_policy_checkpoint(backbone, Path(tmp) / "ck",
                                                 embodiment.normalization_key, spec)
        runtime = PolicyRuntime(str(checkpoint), embodiment, device="cpu", seed=0)
        rclpy.init()
        overrides = [Parameter(k, value=v) for k, v in params.items()]
        overrides += [Parameter("enable_actuation", value=True),
                      Parameter("checkpoint", value=str(checkpoint))]
        policy = PolicyNode(runtime=runtime, parameter_overrides=overrides)
        robot = rclpy.create_node("robot_side")
        received = []
        robot.create_subscription(
            JointTrajectory, embodiment.trajectory_topic,
            lambda m: received.append(robot.get_clock().now().nanoseconds * 1e-9), 10)
        image_pub = robot.create_publisher(type(rgb_to_image(np.zeros((1, 1, 3), np.uint8))),
                                           embodiment.image_topics[0], 10)
        joint_pub = robot.create_publisher(JointState, embodiment.joint_state_topic, 10)
        text_pub = robot.create_publisher(String, embodiment.instruction_topic, 10)
        executor = MultiThreadedExecutor(num_threads=2)
        executor.add_node(policy)
        executor.add_node(robot)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()
        rgb = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        state = np.clip(np.zeros(embodiment.state_dim), embodiment.lower, embodiment.upper)
        if args.embodiment == "widowx":
            state = np.array([0.0, 0.1, -0.2, 0.0, 0.4, 0.0, 0.03])
        deadline = time.monotonic() + 60 + args.cycles * policy.loop.period * 2
        while len(policy.loop.cycles) < args.cycles + 3 and time.monotonic() < deadline:
            now = robot.get_clock().now()
            stamp = now.to_msg()
            image_pub.publish(rgb_to_image(rgb, stamp))
            joint_pub.publish(JointState(header=_header(stamp),
                                         name=embodiment.joint_names,
                                         position=state.tolist()))
            text_pub.publish(String(data="pick up the cup"))
            time.sleep(1.0 / args.input_hz)
        time.sleep(0.5)
        cycles = list(policy.loop.cycles)[3:]  # the first cycles include lazy initialisation
        executor.shutdown()
        policy.destroy_node()
        robot.destroy_node()
        rclpy.shutdown()

    rows = []
    for cycle in cycles:
        after = [t for t in received if t >= cycle["published"]]
        if not after:
            continue
        latency = after[0] - cycle["joint_stamp"]
        waiting = cycle["started"] - cycle["received"]
        transport_in = cycle["received"] - cycle["joint_stamp"]
        rows.append({"latency": latency, "waiting": waiting, "model": cycle["model_s"],
                     "in_node": cycle["overhead_s"], "transport_in": transport_in,
                     "transport_out": after[0] - cycle["published"],
                     "overhead": latency - waiting - cycle["model_s"]})
    if not rows:
        print("no cycles measured")
        return 1
    print(f"policy node ROS overhead, {args.embodiment} ({embodiment.state_dim} joints), "
          f"640x480 rgb8 at {args.input_hz:g} Hz, {len(rows)} cycles, in-process nodes over "
          "Fast DDS (localhost)")
    print(f"{'stage':<44}{'median ms':>10}{'p95 ms':>10}")
    names = [("transport_in", "input transport + conversion (to receipt)"),
             ("waiting", "waiting for the cycle (scheduling)"),
             ("model", "model (predict_action)"),
             ("in_node", "node beyond the model (snapshot..publish)"),
             ("transport_out", "trajectory transport"),
             ("overhead", "OVERHEAD = latency - waiting - model"),
             ("latency", "latency (input publish -> trajectory)")]
    for key, label in names:
        values = np.asarray([r[key] for r in rows]) * 1000.0
        print(f"{label:<44}{np.median(values):>10.2f}{np.percentile(values, 95):>10.2f}")
    return 0


def _header(stamp):
    from std_msgs.msg import Header

    return Header(stamp=stamp)


if __name__ == "__main__":
    raise SystemExit(main())
