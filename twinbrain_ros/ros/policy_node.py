"""The policy node: camera image(s) + joint states + instruction in, JointTrajectory out.

`ros2 launch twinbrain_ros policy.launch.py embodiment:=widowx checkpoint:=DIR`, or
`ros2 run twinbrain_ros policy_node --ros-args --params-file config/widowx.yaml -p checkpoint:=DIR`
(also `python -m twinbrain_ros.ros.policy_node --ros-args ...`).

Subscription callbacks only convert, check and store the latest messages; inference runs in a
worker thread, so the node keeps receiving while the model runs. Every `actions_per_inference`
control periods the worker takes the latest consistent snapshot and runs one
`PolicyPipeline` cycle (model, inverse kinematics for end-effector actions, latency
compensation, blending, safety). Trajectories go to the controller only when `enable_actuation`
is true, otherwise to the dry-run topic. A failed cycle holds the robot where it is; stale or
unsynchronised inputs produce no trajectory. `/diagnostics` reports latency, rate, rejected
inputs by cause, the last error and the model's identity.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import fields

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from ..embodiment import Embodiment, EmbodimentError
from ..policy.pipeline import ChunkRejected, PolicyPipeline
from ..policy.runtime import Observation, PolicyRuntime
from ..policy.scheduler import Trajectory
from .conversions import (
    InputError,
    controller_trajectories,
    declare_parameters,
    image_to_rgb,
    joint_positions,
    make_trajectory,
    run_node,
)

JOINT_HISTORY = 100  # joint states kept for stamp matching (2 s at 50 Hz)

# Embodiment parameters come from the embodiment's YAML (config/<embodiment>.yaml): declared with
# a type and no default, so a missing one is an error that names it.
_EMBODIMENT_TYPES = {
    "embodiment": Parameter.Type.STRING,
    "joint_names": Parameter.Type.STRING_ARRAY,
    "joint_lower_limits": Parameter.Type.DOUBLE_ARRAY,
    "joint_upper_limits": Parameter.Type.DOUBLE_ARRAY,
    "max_joint_step": Parameter.Type.DOUBLE_ARRAY,
    "control_rate_hz": Parameter.Type.DOUBLE,
    "action_space": Parameter.Type.STRING,
    "state_space": Parameter.Type.STRING,
    "normalization_key": Parameter.Type.STRING,
    "action_normalization": Parameter.Type.STRING,
    "state_normalization": Parameter.Type.STRING,
    "gripper_joint": Parameter.Type.STRING,
    "gripper_open_position": Parameter.Type.DOUBLE,
    "gripper_closed_position": Parameter.Type.DOUBLE,
    "image_topics": Parameter.Type.STRING_ARRAY,
    "joint_state_topic": Parameter.Type.STRING,
    "instruction_topic": Parameter.Type.STRING,
    "trajectory_topic": Parameter.Type.STRING,
    "gripper_topic": Parameter.Type.STRING,
    "dry_run_topic": Parameter.Type.STRING,
}
# Node parameters with defaults: name -> (default, description).
_NODE_PARAMETERS = {
    "checkpoint": ("", "TwinBrainVLA checkpoint directory (required)"),
    "backbone_path": ("", "override of the base Qwen-VL directory stored in the checkpoint"),
    "device": ("auto", "torch device: auto, cpu, cuda or cuda:N (bf16 on CUDA)"),
    "seed": (-1, "seed of the flow-matching noise; -1 draws fresh noise every chunk"),
    "enable_actuation": (False, "publish to the controller topics; false sends every "
                                "trajectory to dry_run_topic instead"),
    "actions_per_inference": (4, "control periods executed from a chunk before the next one "
                                 "is requested (the replanning period)"),
    "blend_steps": (2, "points of a new chunk cross-faded with the executing plan"),
    "max_input_age_s": (0.5, "an image or joint state older than this is stale"),
    "max_sync_skew_s": (0.1, "largest allowed stamp difference between image(s) and joint state"),
    "stamp_trajectories": (False, "stamp trajectories with the plan's start time instead of "
                                  "zero (zero means 'start now' to the controller)"),
    "diagnostics_period_s": (1.0, "period of /diagnostics messages"),
}


class PolicyNode(Node):
    """Runs a TwinBrainVLA checkpoint on live topics (see the module docstring)."""

    def __init__(self, runtime=None, **node_kwargs):
        """Declare parameters, load the model (unless `runtime` is given), wire the topics."""
        super().__init__("policy_node", **node_kwargs)
        self.embodiment = self._declare_embodiment()
        self.params = p = declare_parameters(self, _NODE_PARAMETERS)
        if runtime is None:
            if not p["checkpoint"]:
                raise ValueError("parameter 'checkpoint' is required (a checkpoint directory)")
            runtime = PolicyRuntime(p["checkpoint"], self.embodiment, device=p["device"],
                                    backbone_path=p["backbone_path"] or None,
                                    seed=None if p["seed"] < 0 else int(p["seed"]))
        self.runtime = runtime
        self.pipeline = PolicyPipeline(runtime, self.embodiment, blend_steps=p["blend_steps"])
        self.period = self.embodiment.dt * max(1, int(p["actions_per_inference"]))

        self._lock = threading.Lock()
        emb = self.embodiment
        self._images: dict[str, tuple] = {}     # topic -> (rgb, receipt time, stamp)
        self._image_shapes: dict[str, tuple] = {}
        # Recent joint states (positions, receipt time, stamp), newest last: joint states come
        # much faster than images, so the one stamped nearest the images is used.
        self._joints = collections.deque(maxlen=JOINT_HISTORY)
        self._instruction = None
        self.rejected = collections.Counter()
        self._last_log: dict[str, float] = {}
        self.last_error = ""
        self.latencies = collections.deque(maxlen=200)
        self.cycles = collections.deque(maxlen=200)  # per-cycle timing records (clock seconds)
        self.chunk_times = collections.deque(maxlen=200)
        for topic in emb.image_topics:
            self.create_subscription(Image, topic, lambda m, t=topic: self._on_image(t, m),
                                     qos_profile_sensor_data)
        self.create_subscription(JointState, emb.joint_state_topic, self._on_joints, 10)
        self.create_subscription(String, emb.instruction_topic, self._on_instruction, 10)
        actuate = bool(p["enable_actuation"])
        # Actuated: the arm (and a separate gripper) controller; otherwise every joint in one
        # trajectory on the dry-run topic.
        self.actuate = actuate
        topics = ([emb.trajectory_topic] + ([emb.gripper_topic] if emb.gripper_topic else [])
                  if actuate else [emb.dry_run_topic])
        self._publishers_by_topic = {t: self.create_publisher(JointTrajectory, t, 10)
                                     for t in topics}
        self.diagnostics_publisher = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(float(p["diagnostics_period_s"]), self._publish_diagnostics)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="inference", daemon=True)
        self._worker.start()
        output = (f"ACTUATION ENABLED on {emb.trajectory_topic}" if actuate
                  else f"dry run on {emb.dry_run_topic}")
        self.get_logger().info(
            f"policy node ready: embodiment {emb.name} ({emb.action_space}), {output}")

    def _declare_embodiment(self) -> Embodiment:
        values = {}
        for name, kind in _EMBODIMENT_TYPES.items():
            descriptor = ParameterDescriptor(description=_field_doc(name))
            self.declare_parameter(name, kind, descriptor)
            try:
                values[name] = self.get_parameter(name).value
            except ParameterUninitializedException:
                pass  # optional ones keep the Embodiment default, required ones are named
        try:
            return Embodiment.from_parameters(values)
        except EmbodimentError as error:
            raise ValueError(f"{error}: pass the embodiment's params file "
                             "(--params-file config/<embodiment>.yaml)") from error

    # -- callbacks: convert, check, store; the model never runs here -------------------------

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _reject(self, cause: str, message: str, level: str = "warning") -> None:
        """Count a rejected input or cycle and log it at most once per cause every 5 s."""
        self.rejected[cause] += 1
        now = time.monotonic()
        if now - self._last_log.get(cause, -1e9) >= 5.0:
            self._last_log[cause] = now
            getattr(self.get_logger(), level)(f"{message} [{cause}]")

    def _on_image(self, topic: str, msg: Image) -> None:
        try:
            rgb = image_to_rgb(msg)
        except InputError as error:
            self._reject(error.cause, f"dropped image on {topic}: {error}")
            return
        expected = self._image_shapes.setdefault(topic, rgb.shape)
        if rgb.shape != expected:
            self._reject("image_size_changed", f"dropped image on {topic}: size changed from "
                                               f"{expected[1]}x{expected[0]} to "
                                               f"{rgb.shape[1]}x{rgb.shape[0]}")
            return
        with self._lock:
            self._images[topic] = (rgb, self._now(), _stamp(msg))

    def _on_joints(self, msg: JointState) -> None:
        try:
            positions = joint_positions(msg, self.embodiment.joint_names)
        except InputError as error:
            self._reject(error.cause, f"dropped joint state: {error}")
            return
        with self._lock:
            self._joints.append((positions, self._now(), _stamp(msg)))

    def _on_instruction(self, msg: String) -> None:
        text = msg.data.strip()
        if not text:
            self._reject("empty_instruction", "rejected an empty instruction")
            return
        with self._lock:
            previous, self._instruction = self._instruction, text
        if text != previous:
            self.get_logger().info(f"instruction: {text!r}")

    # -- inference worker --------------------------------------------------------------------

    def _snapshot(self):
        """The latest consistent (observation, observation time), or None (cause counted)."""
        with self._lock:
            images = dict(self._images)
            history, instruction = list(self._joints), self._instruction
        topics = self.embodiment.image_topics
        if not history or instruction is None or any(t not in images for t in topics):
            return None
        joints = _matching_joint_state(history, [images[t][2] for t in topics])
        now, max_age = self._now(), float(self.params["max_input_age_s"])
        ages = [now - images[t][1] for t in topics] + [now - joints[1]]
        if max(ages) > max_age:
            self._reject("stale_input", f"inputs are {max(ages):.2f} s old (max_input_age_s "
                                        f"{max_age}): no new trajectory")
            return None
        stamps = [images[t][2] for t in topics] + [joints[2]]
        if all(s > 0 for s in stamps):
            skew = max(stamps) - min(stamps)
            if skew > float(self.params["max_sync_skew_s"]):
                self._reject("unsynchronised_input", f"image and joint state stamps differ by "
                                                     f"{skew:.3f} s: no new trajectory")
                return None
        observation = Observation(images=[images[t][0] for t in topics], state=joints[0],
                                  instruction=instruction)
        # The newest receipt time and the joint state's stamp travel with the cycle's record.
        inputs = {"received": max([images[t][1] for t in topics] + [joints[1]]),
                  "joint_stamp": joints[2]}
        return observation, joints[1], inputs

    def _run(self) -> None:
        # The replanning period is measured on the node's clock: with use_sim_time a simulator
        # running faster or slower than the wall clock gets a chunk every period of its time.
        # Without usable inputs it looks again after one control period, not a whole replanning
        # period: the first chunk follows the first usable observation closely.
        while not self._stop.is_set():
            start = self._now()
            snapshot = self._snapshot()
            if snapshot is not None:
                self._cycle(*snapshot)
            wait = self.period if snapshot is not None else self.embodiment.dt
            while not self._stop.is_set():
                elapsed = self._now() - start
                remaining = wait - elapsed
                if remaining <= 0 or elapsed < 0:  # elapsed < 0: the clock was reset
                    break
                self._stop.wait(min(remaining, 0.005))

    def _cycle(self, observation: Observation, observation_time: float, inputs: dict) -> None:
        started = self._now()
        try:
            result = self.pipeline.cycle(observation, observation_time, self._now)
        except Exception as error:  # noqa: BLE001 - whatever failed, the robot must hold still
            cause = getattr(error, "cause", "inference_error")
            self.last_error = f"{cause}: {error}"
            level = "warning" if isinstance(error, ChunkRejected) else "error"
            self._reject(cause, f"holding position: {error}", level=level)
            self._publish(self.pipeline.hold(observation.state, self._now()))
            return
        self.latencies.append(result.chunk.latency_s)
        self.chunk_times.append(time.monotonic())
        if result.dropped_actions:
            self.rejected["late_actions_dropped"] += result.dropped_actions
        self._publish(result.trajectory)
        # Time in the node beyond the model: snapshot, conversion, scheduling, safety, publish.
        published = self._now()
        overhead = published - started - result.chunk.latency_s
        self.cycles.append({**inputs, "started": started, "model_s": result.chunk.latency_s,
                            "published": published, "overhead_s": overhead})

    def _publish(self, trajectory: Trajectory) -> None:
        emb = self.embodiment
        stamp = None
        if self.params["stamp_trajectories"]:
            stamp = rclpy.time.Time(seconds=trajectory.start_time).to_msg()
        if not self.actuate:
            self._publishers_by_topic[emb.dry_run_topic].publish(make_trajectory(
                emb.joint_names, trajectory.positions, trajectory.time_from_start,
                trajectory.velocities, stamp=stamp))
            return
        for topic, message in controller_trajectories(
                emb, trajectory.positions, trajectory.time_from_start, trajectory.velocities,
                stamp=stamp):
            self._publishers_by_topic[topic].publish(message)

    # -- diagnostics ---------------------------------------------------------------------------

    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus(name="twinbrain_ros: policy_node",
                                  hardware_id=str(self.params["checkpoint"]))
        values = {}
        if self.latencies:
            lat = np.asarray(self.latencies) * 1000.0
            values["inference_latency_median_ms"] = f"{np.median(lat):.1f}"
            values["inference_latency_p95_ms"] = f"{np.percentile(lat, 95):.1f}"
        if self.cycles:
            overhead = np.asarray([c["overhead_s"] for c in self.cycles]) * 1000.0
            values["cycle_overhead_median_ms"] = f"{np.median(overhead):.2f}"
        recent = [t for t in self.chunk_times if time.monotonic() - t <= 10.0]
        values["achieved_rate_hz"] = f"{len(recent) / 10.0:.2f}"
        values["chunks_total"] = str(len(self.latencies))
        for cause, count in sorted(self.rejected.items()):
            values[f"rejected.{cause}"] = str(count)
        values["last_error"] = self.last_error
        values["actuation_enabled"] = str(bool(self.params["enable_actuation"]))
        values["embodiment"] = self.embodiment.name
        for key, value in getattr(self.runtime, "identity", {}).items():
            values[f"model.{key}"] = str(value)
        status.level = DiagnosticStatus.OK
        status.message = "running"
        if self.last_error:
            status.level, status.message = DiagnosticStatus.WARN, self.last_error[:200]
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_publisher.publish(array)

    def destroy_node(self) -> None:
        """Stop the worker before the node goes away."""
        self._stop.set()
        self._worker.join(timeout=10.0)
        super().destroy_node()


def _matching_joint_state(history: list[tuple], image_stamps: list[float]) -> tuple:
    """The joint state stamped nearest the newest image; the newest one without stamps."""
    newest_image = max(image_stamps)
    if newest_image <= 0 or history[-1][2] <= 0:
        return history[-1]
    return min(history, key=lambda joints: abs(joints[2] - newest_image))


def _stamp(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def _field_doc(name: str) -> str:
    known = {f.name for f in fields(Embodiment)}
    key = "name" if name == "embodiment" else name
    return (f"embodiment description field '{key}' (see twinbrain_ros.embodiment.Embodiment)"
            if key in known else name)


def main(args: list[str] | None = None) -> int:
    """Entry point of `ros2 run twinbrain_ros policy_node`."""
    return run_node(PolicyNode, "policy_node", args)


if __name__ == "__main__":
    raise SystemExit(main())
