"""The policy node: camera + joint states + instruction in, JointTrajectory out.

Run with `ros2 run twinbrain_ros policy_node --ros-args -p checkpoint:=DIR ...` or
`python -m twinbrain_ros.ros.policy_node --ros-args ...`.

Subscription callbacks only store the latest messages; inference runs in a worker thread, so the
node keeps receiving while the model runs. Each cycle takes the latest snapshot, skips it when an
input is missing or older than `max_input_age_s`, and publishes the chunk as a trajectory at the
control rate.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from ..policy.runtime import Observation, PolicyRuntime
from .conversions import InputError, image_to_rgb, joint_positions, make_trajectory

_PARAMETERS = {
    # name: (default, description)
    "checkpoint": ("", "TwinBrainVLA checkpoint directory (required)"),
    "backbone_path": ("", "override of the base Qwen-VL checkpoint directory stored in the "
                          "checkpoint (empty: use the stored one)"),
    "embodiment": ("widowx", "embodiment name in the checkpoint (selects state encoder and "
                             "normalization statistics)"),
    "joint_names": (["waist", "shoulder", "elbow", "forearm_roll", "wrist_angle",
                     "wrist_rotate", "gripper"],
                    "joints the model's state and actions refer to, in model order"),
    "image_topic": ("/camera/image_raw", "sensor_msgs/Image camera topic"),
    "joint_state_topic": ("/joint_states", "sensor_msgs/JointState topic"),
    "instruction_topic": ("/instruction", "std_msgs/String language instruction topic"),
    "trajectory_topic": ("/policy/joint_trajectory", "trajectory_msgs/JointTrajectory output"),
    "control_rate_hz": (5.0, "rate of the actions in a chunk (time between trajectory points)"),
    "inference_period_s": (0.5, "time between the starts of two inference cycles"),
    "max_input_age_s": (1.0, "an image or joint state older than this is stale: no new "
                             "trajectory is made from it"),
    "device": ("auto", "torch device: auto, cpu, cuda or cuda:N"),
    "seed": (-1, "seed of the flow-matching noise (-1: a fresh draw every chunk)"),
}


class PolicyNode(Node):
    """Runs a TwinBrainVLA checkpoint on live topics."""

    def __init__(self, runtime: PolicyRuntime | None = None):
        """Declare parameters, load the model (unless given), and wire topics and the worker."""
        super().__init__("policy_node")
        for name, (default, description) in _PARAMETERS.items():
            descriptor = ParameterDescriptor(description=description)
            if isinstance(default, list):
                descriptor.type = ParameterType.PARAMETER_STRING_ARRAY
            self.declare_parameter(name, default, descriptor)
        p = {name: self.get_parameter(name).value for name in _PARAMETERS}
        self.joint_names = list(p["joint_names"])
        self.dt = 1.0 / float(p["control_rate_hz"])
        self.period = float(p["inference_period_s"])
        self.max_age = float(p["max_input_age_s"])
        if runtime is None:
            if not p["checkpoint"]:
                raise ValueError("parameter 'checkpoint' is required (a checkpoint directory)")
            seed = None if p["seed"] < 0 else int(p["seed"])
            runtime = PolicyRuntime(p["checkpoint"], p["embodiment"], device=p["device"],
                                    backbone_path=p["backbone_path"] or None, seed=seed)
        self.runtime = runtime
        if runtime.spec.state_dim != len(self.joint_names):
            raise ValueError(f"embodiment {runtime.embodiment!r} has state_dim "
                             f"{runtime.spec.state_dim} but {len(self.joint_names)} joint_names")
        if runtime.spec.action_dim != len(self.joint_names):
            raise ValueError(f"embodiment {runtime.embodiment!r} has action_dim "
                             f"{runtime.spec.action_dim} but {len(self.joint_names)} joint_names")

        self._lock = threading.Lock()
        self._image = None          # (rgb array, monotonic receipt time)
        self._joints = None         # (positions, monotonic receipt time)
        self._instruction = None
        self._logged_causes: dict[str, float] = {}
        self.create_subscription(Image, p["image_topic"], self._on_image,
                                 qos_profile_sensor_data)
        self.create_subscription(JointState, p["joint_state_topic"], self._on_joints, 10)
        self.create_subscription(String, p["instruction_topic"], self._on_instruction, 10)
        self.publisher = self.create_publisher(JointTrajectory, p["trajectory_topic"], 10)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="inference", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"policy node ready: embodiment {runtime.embodiment}, device {runtime.device}, "
            f"publishing on {p['trajectory_topic']}")

    # -- callbacks: convert, check, store; never run the model here --------------------------

    def _reject(self, error: InputError) -> None:
        """Log a rejected input, at most once per cause every 5 s."""
        now = time.monotonic()
        if now - self._logged_causes.get(error.cause, -1e9) >= 5.0:
            self._logged_causes[error.cause] = now
            self.get_logger().warning(f"dropped input: {error}")

    def _on_image(self, msg: Image) -> None:
        try:
            rgb = image_to_rgb(msg)
        except InputError as error:
            self._reject(error)
            return
        with self._lock:
            self._image = (rgb, time.monotonic())

    def _on_joints(self, msg: JointState) -> None:
        try:
            positions = joint_positions(msg, self.joint_names)
        except InputError as error:
            self._reject(error)
            return
        with self._lock:
            self._joints = (positions, time.monotonic())

    def _on_instruction(self, msg: String) -> None:
        text = msg.data.strip()
        if not text:
            self._reject(InputError("empty_instruction", "empty instruction ignored"))
            return
        with self._lock:
            previous, self._instruction = self._instruction, text
        if text != previous:
            self.get_logger().info(f"instruction: {text!r}")

    # -- inference worker --------------------------------------------------------------------

    def _snapshot(self) -> Observation | None:
        with self._lock:
            image, joints, instruction = self._image, self._joints, self._instruction
        if image is None or joints is None or instruction is None:
            return None
        now = time.monotonic()
        if now - image[1] > self.max_age or now - joints[1] > self.max_age:
            self._reject(InputError("stale_input", "inputs older than max_input_age_s"))
            return None
        return Observation(images=[image[0]], state=joints[0], instruction=instruction)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            observation = self._snapshot()
            if observation is not None:
                self._cycle(observation)
            self._stop.wait(max(0.0, self.period - (time.monotonic() - start)))

    def _cycle(self, observation: Observation) -> None:
        try:
            chunk = self.runtime.infer(observation)
        except Exception as error:  # noqa: BLE001 - the node must stay up and keep still
            self.get_logger().error(f"inference failed, no trajectory published: {error}")
            return
        positions = chunk.actions.astype(np.float64)
        previous = np.vstack([observation.state[None], positions[:-1]])
        velocities = (positions - previous) / self.dt
        self.publisher.publish(make_trajectory(self.joint_names, positions, self.dt, velocities))

    def destroy_node(self) -> None:
        """Stop the worker before the node goes away."""
        self._stop.set()
        self._worker.join(timeout=5.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Entry point of `ros2 run twinbrain_ros policy_node`."""
    rclpy.init(args=args)
    node = None
    try:
        node = PolicyNode()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ValueError as error:
        print(f"policy_node: {error}")
        return 1
    finally:
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
