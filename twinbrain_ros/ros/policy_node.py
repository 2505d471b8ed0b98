"""The policy node: camera image(s) + joint states + instruction in, JointTrajectory out.

`ros2 launch twinbrain_ros policy.launch.py embodiment:=widowx checkpoint:=DIR`, or
`ros2 run twinbrain_ros policy_node --ros-args --params-file config/widowx.yaml -p checkpoint:=DIR`
(also `python -m twinbrain_ros.ros.policy_node --ros-args ...`).

The node is the ROS side of a `twinbrain_ros.policy.loop.PolicyLoop`: subscription callbacks
only convert, check and store the latest messages (`inputs.InputStore`); the loop runs in a
worker thread on the node's clock, takes the latest consistent snapshot every
`actions_per_inference` control periods and plans (model, inverse kinematics for end-effector
actions, latency compensation, blending or real-time chunking, safety). Trajectories go to the
controller only when `enable_actuation` is true, otherwise to the dry-run topic;
`enable_actuation` may be changed at run time (`ros2 param set`), effective from the next cycle.

Faults never stop the node: whatever fails in a cycle holds the robot at its newest measured
position (clipped into the joint limits), is logged once per cause and counted, and the next
cycle plans again. A watchdog restarts the worker should it ever end, and says so in
`/diagnostics` at ERROR level; a cycle that hangs is reported and the robot holds. Stale or
unsynchronised inputs produce no trajectory. An operator stops the robot with the `~/hold`
service and lets the policy plan again with `~/resume` (both `std_srvs/Trigger`). Questions on
`~/ask` are answered by the Left Brain between cycles (`ask.QuestionDesk`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import threading
import time

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from ..errors import CausedError, shorten
from ..policy.config import PolicyConfig
from ..policy.cycle_log import CycleLogs
from ..policy.loop import PolicyLoop
from ..policy.pipeline import PolicyPipeline
from ..policy.safety import within_limits
from ..policy.scheduler import Trajectory
from ..serving.runtimes import open_runtime
from .ask import QuestionDesk
from .conversions import (
    InputError,
    controller_trajectories,
    image_to_rgb,
    joint_positions,
    make_trajectory,
)
from .inputs import MAX_CAUSES, CauseCounter, InputStore, checked_instruction
from .parameters import NODE_PARAMETERS, declare_embodiment, declare_parameters
from .policy_status import policy_status
from .runner import run_node
from .topics import READY_QOS, READY_TOPIC
from .watch import InputWatch

__all__ = ["MAX_CAUSES", "PolicyNode", "main"]

RENAMED = {"record_path": "rerun_path"}  # old name -> new name


def _guarded(callback):
    """Executor callbacks never raise: `rclpy.spin` would end the node. Errors are counted."""

    @functools.wraps(callback)
    def wrapper(self, *args, **kwargs):
        try:
            return callback(self, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the node must keep holding the robot
            self._reject("callback_error", f"{callback.__name__} failed: "
                                           f"{type(error).__name__}: {shorten(str(error), 300)}",
                         level="error")
            return None

    return wrapper


class PolicyNode(Node):
    """Runs a TwinBrainVLA checkpoint on live topics (see the module docstring)."""

    def __init__(self, runtime=None, **node_kwargs):
        """Declare parameters, load the model (unless `runtime` is given), wire the topics."""
        super().__init__("policy_node", **node_kwargs)
        self._created = time.monotonic()
        self.embodiment = emb = declare_embodiment(self)
        renamed = sorted(set(RENAMED) & set(getattr(self, "_parameter_overrides", {})))
        if renamed:  # an old params file would otherwise lose them without a word
            raise ValueError(", ".join(f"parameter {old!r} is now {RENAMED[old]!r}"
                                       for old in renamed))
        self.params = p = declare_parameters(self, NODE_PARAMETERS)
        self.config = PolicyConfig(**{k: p[k] for k in PolicyConfig.__dataclass_fields__})
        if runtime is None:
            settings = {k: p[k] for k in inspect.signature(open_runtime).parameters if k in p}
            runtime = open_runtime(emb, **settings, log=self.get_logger().info)
        self.runtime = runtime
        protocol = getattr(runtime, "protocol", None)
        if protocol and p["release_protocol"]:
            self.config = dataclasses.replace(self.config, **protocol)
            self.get_logger().info(
                "released checkpoint: its authors' protocol replaces the loop settings: "
                + ", ".join(f"{k}={v}" for k, v in protocol.items())
                + " (release_protocol:=false keeps the parameters)")
        if self.config.rerun_path:
            CycleLogs.check_directory(self.config.rerun_path, "rerun_path")
        self.causes = CauseCounter(self._log)
        self.rejected = self.causes.counts
        self.inputs = InputStore(emb.image_topics)
        pipeline = PolicyPipeline(self.runtime, emb, self.config, notify=lambda cause, text:
                                  self.causes.log_limited(cause, text, "warning",
                                                          pipeline.divergences))
        self.actuate = bool(p["enable_actuation"])
        pipeline.track_plan = self.actuate  # in a dry run nothing follows the plan
        logs = (CycleLogs(emb.joint_names, self.config.rerun_path)
                if self.config.rerun_path else None)
        self.loop = PolicyLoop(pipeline, self.config, self, report=self._report, logs=logs)
        self.worker_restarts = 0
        self.worker_failure = ""            # why the watchdog last restarted the worker
        self.worker_failure_time = -1e9     # monotonic time of that restart
        self.stalled_since = None           # monotonic time a cycle was found hanging
        self.watched = InputWatch(self, float(p["input_silence_s"]), self._reject)
        for topic in emb.image_topics:
            self.watched.subscribe(topic, Image, lambda m, t=topic: self._on_image(t, m),
                                   qos_profile_sensor_data)
        self.watched.subscribe(emb.joint_state_topic, JointState, self._on_joints, 10)
        self.create_subscription(String, emb.instruction_topic, self._on_instruction, 10)
        # Both routes exist from the start, so that actuation can be switched at run time: the
        # arm (and a separate gripper) controller, and the dry-run topic with every joint.
        topics = [emb.trajectory_topic, emb.gripper_topic, emb.dry_run_topic]
        self._routes = {t: self.create_publisher(JointTrajectory, t, 10)
                            for t in dict.fromkeys(topics) if t}
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.questions = QuestionDesk(self, int(p["max_question_tokens"]))
        self.create_subscription(String, "~/ask", self.questions.on_question, 10)
        self.create_service(Trigger, "~/hold", self._on_hold)
        self.create_service(Trigger, "~/resume", self._on_resume)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.create_timer(float(p["diagnostics_period_s"]), self._publish_diagnostics)
        self._stop = threading.Event()
        self.heartbeat = time.monotonic()
        self._worker = self._start_worker()
        self.create_timer(0.5, self._watchdog)
        # Latched, so that a simulator (or anything) started earlier or later learns that the
        # model is loaded (and compiled) and the node plans from now on.
        self.ready_publisher = self.create_publisher(String, READY_TOPIC, READY_QOS)
        self.ready_publisher.publish(String(data=json.dumps({
            "node": self.get_fully_qualified_name(), "embodiment": emb.name,
            "inference": str(getattr(self.runtime, "inference_state", "")),
            "ready_after_s": round(time.monotonic() - self._created, 2)})))
        self.get_logger().info(
            f"policy node ready after {time.monotonic() - self._created:.1f} s: embodiment "
            f"{emb.name} ({emb.action_space}), {self._route()}")

    def _route(self) -> str:
        emb = self.embodiment
        return (f"ACTUATION ENABLED on {emb.trajectory_topic}" if self.actuate
                else f"dry run on {emb.dry_run_topic}")

    # -- the robot as the loop sees it (`PolicyIO`) --------------------------------------------

    def now(self) -> float:
        """The node's clock (simulated time with use_sim_time)."""
        return self.get_clock().now().nanoseconds * 1e-9

    def observe(self):
        """The latest consistent snapshot, or None (a stale or unsynchronised one is counted)."""
        try:
            snapshot = self.inputs.snapshot(self.now(), self.config.max_input_age_s,
                                            self.config.max_sync_skew_s)
        except CausedError as error:
            self._reject(error.cause, str(error))
            return None
        if snapshot is not None:
            snapshot.info["asking"] = self.questions.waiting
        return snapshot

    def measured(self, max_age: float | None = None):
        """The newest measured joint position (None if none, or older than `max_age`)."""
        return self.inputs.measured(self.now(), max_age)

    def send(self, trajectory: Trajectory) -> bool:
        """Publish to the current route; False after shutdown began (nothing is sent then)."""
        emb = self.embodiment
        if self._stop.is_set() or not self.context.ok():
            return False
        if not within_limits(trajectory.positions, emb.lower, emb.upper):
            # The safety filter makes this impossible; the check stays as the last gate.
            self._reject("command_outside_limits", "refused to publish a trajectory outside the "
                                                   "joint limits", level="error")
            return False
        stamp = None
        if self.params["stamp_trajectories"]:
            stamp = rclpy.time.Time(seconds=trajectory.start_time).to_msg()
        if self.actuate:
            messages = controller_trajectories(emb, trajectory.positions,
                                               trajectory.time_from_start,
                                               trajectory.velocities, stamp=stamp)
        else:
            messages = [(emb.dry_run_topic, make_trajectory(
                emb.joint_names, trajectory.positions, trajectory.time_from_start,
                trajectory.velocities, stamp=stamp))]
        try:
            for topic, message in messages:
                self._routes[topic].publish(message)
        except Exception:  # the context may end between the check and the call (Ctrl-C)
            if self._stop.is_set() or not self.context.ok():
                return False
            raise
        return True

    # -- logging and counting ------------------------------------------------------------------

    def _log(self, level: str, text: str) -> None:
        # rclpy refuses a call site whose severity changes between calls: one line per level.
        logger = self.get_logger()
        if level == "error":
            logger.error(text)
        elif level == "warning":
            logger.warning(text)
        else:
            logger.info(text)

    def _reject(self, cause: str, message: str, level: str = "warning") -> None:
        """Count a refused input or failed cycle; log it at most once per cause every 5 s."""
        self.causes.reject(cause, message, level)

    def _report(self, cause: str, message: str, level: str = "warning", count: int = 1) -> None:
        """The loop's reports: counted, and logged (rate limited) unless only counted."""
        if level == "count":
            self.causes.count(cause, count)
        else:
            self._reject(cause, message, level)

    # -- callbacks: convert, check, store; the model never runs here -------------------------

    @_guarded
    def _on_image(self, topic: str, msg: Image) -> None:
        try:
            rgb = image_to_rgb(msg)
        except InputError as error:
            self._reject(error.cause, f"dropped image on {topic}: {error}")
            return
        self.inputs.put_image(topic, rgb, self.now(), _stamp(msg))

    @_guarded
    def _on_joints(self, msg: JointState) -> None:
        try:
            positions = joint_positions(msg, self.embodiment.joint_names)
            self.loop.pipeline.safety.check_state(positions, self.embodiment.joint_names)
        except CausedError as error:
            self._reject(error.cause, f"dropped joint state: {error}")
            return
        self.inputs.put_joints(positions, self.now(), _stamp(msg))

    @_guarded
    def _on_instruction(self, msg: String) -> None:
        try:
            text = checked_instruction(msg.data, int(self.params["max_instruction_tokens"]),
                                       getattr(self.runtime, "check_instruction", None))
        except CausedError as error:
            # The robot must not go on with the previous task when a new one was meant: no
            # new plans, and the one executing stops where the robot is.
            had_one = self.inputs.clear_instruction()
            suffix = "; holding until a valid instruction arrives" if had_one else ""
            self._reject(error.cause, f"rejected an instruction: {error}{suffix}")
            with self.loop.lock:
                if self.loop.pipeline.scheduler.plan is not None:
                    self.loop.invalidate()
                    self.loop.hold("instruction rejected")
            return
        if self.inputs.set_instruction(text) != text:
            self.get_logger().info(f"instruction: {shorten(repr(text), 200)}")

    @_guarded
    def _on_hold(self, request, response):
        with self.loop.lock:
            self.loop.operator_hold = True
            self.loop.invalidate()
            held = self.loop.hold("operator hold", force=True)
        response.success = True
        response.message = ("holding at the measured position; call ~/resume to plan again"
                            if held else "holding: no plans will be published (no measured "
                                         "position to send a hold to)")
        self.get_logger().warning(f"operator hold: {response.message}")
        return response

    @_guarded
    def _on_resume(self, request, response):
        with self.loop.lock:
            was_held, self.loop.operator_hold = self.loop.operator_hold, False
            self.loop.invalidate()
            self.loop.pipeline.scheduler.reset()
        response.success = True
        response.message = ("resumed: planning from the next cycle" if was_held
                            else "was not held; planning continues")
        self.get_logger().info(f"operator resume: {response.message}")
        return response

    @_guarded
    def _on_set_parameters(self, parameters) -> SetParametersResult:
        for parameter in parameters:
            if parameter.name == "enable_actuation" and \
                    parameter.type_ != Parameter.Type.BOOL:
                return SetParametersResult(successful=False,
                                           reason="enable_actuation must be a bool")
        for parameter in parameters:
            if parameter.name == "enable_actuation":
                self._set_actuation(bool(parameter.value))
        return SetParametersResult(successful=True)

    def _set_actuation(self, enable: bool) -> None:
        loop = self.loop
        with loop.lock:
            if enable == self.actuate:
                return
            if not enable:
                # The controller would finish the plan it has: stop it where the robot is.
                loop.hold("actuation disabled", force=True)
            self.actuate = enable
            self.params["enable_actuation"] = enable
            loop.invalidate()
            loop.pipeline.track_plan = enable  # in a dry run nothing follows the plan
            loop.pipeline.scheduler.reset()
        self.get_logger().warning(f"enable_actuation set to {enable}: {self._route()} from "
                                  "the next cycle")

    # -- the worker: the loop on the node's clock --------------------------------------------

    def _start_worker(self) -> threading.Thread:
        worker = threading.Thread(target=self._run, name="inference", daemon=True)
        worker.start()
        return worker

    def shutting_down(self) -> bool:
        """Whether the node is stopping (nothing is published then)."""
        return self._stop.is_set() or not self.context.ok()

    def worker_alive(self) -> bool:
        """Whether the inference worker runs."""
        return self._worker.is_alive()

    def _run(self) -> None:
        # The loop's clock is the node's: with use_sim_time a simulator running faster or slower
        # than the wall clock gets a chunk every period of its time. Between cycles, a slice of
        # an answer to a question, sized to the gap.
        while not self._stop.is_set():
            self.heartbeat = wall_start = time.monotonic()
            start = self.now()
            due = self.loop.tick()
            try:
                self.questions.work(self._wall_gap(start, wall_start, due))
            except Exception as error:  # noqa: BLE001 - never let the worker end
                self._reject("ask_failed", f"answering failed: {type(error).__name__}: "
                                           f"{shorten(str(error), 200)}", level="error")
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()  # waiting (a paused /clock too) is not a stall
                now = self.now()
                if now >= due or now < start:  # now < start: the clock was reset
                    break
                self._stop.wait(min(due - now, 0.005))

    def _wall_gap(self, start: float, wall_start: float, due: float) -> float:
        """Wall-clock seconds until the loop's clock reaches `due` (it may run at any rate)."""
        elapsed_node, elapsed_wall = self.now() - start, time.monotonic() - wall_start
        rate = elapsed_node / elapsed_wall if elapsed_node > 0 and elapsed_wall > 1e-3 else 1.0
        return max(0.0, (due - self.now()) / rate)

    @_guarded
    def _watchdog(self) -> None:
        """Watch the inputs; restart the worker should it ever end; report a hung cycle."""
        if self._stop.is_set():
            return
        self.watched.check()
        if self._worker.is_alive():
            self._watch_stall()
            return
        self.worker_restarts += 1
        self.worker_failure = (f"inference worker stopped unexpectedly; restarted "
                               f"({self.worker_restarts} restarts)")
        self.worker_failure_time = time.monotonic()
        self.get_logger().error(self.worker_failure)
        with self.loop.lock:
            self.loop.invalidate()
            self.loop.hold("worker restart")
        self._worker = self._start_worker()

    def _watch_stall(self) -> None:
        """A cycle that hangs (a deadlocked device call) cannot be restarted: hold and say so.

        The limit: `stall_timeout_s`, at least 3 replanning periods plus the p95 latency.
        """
        latencies = [c["model_s"] for c in list(self.loop.cycles)]  # the worker appends
        p95 = float(np.percentile(latencies, 95)) if latencies else 0.0
        limit = max(float(self.params["stall_timeout_s"]), 3.0 * (self.loop.period + p95))
        idle = time.monotonic() - self.heartbeat
        if idle > limit:
            if self.stalled_since is None:
                self.stalled_since = time.monotonic()
                self.get_logger().error(f"the inference worker has not finished a cycle for "
                                        f"{idle:.1f} s: holding the robot")
                with self.loop.lock:
                    self.loop.invalidate()  # whatever the hung cycle returns is discarded
                    self.loop.hold("worker stalled")
        elif self.stalled_since is not None:
            self.stalled_since = None
            self.get_logger().info("the inference worker is cycling again")

    @_guarded
    def _publish_diagnostics(self) -> None:
        array = DiagnosticArray(status=[policy_status(self)])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics.publish(array)

    def destroy_node(self) -> None:
        """Stop and join the worker before the node goes away; nothing is published after."""
        self._stop.set()
        self._worker.join(timeout=10.0)
        if not self._worker.is_alive():
            self.loop.close()
        super().destroy_node()


def _stamp(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def main(args: list[str] | None = None) -> int:
    """Entry point of `ros2 run twinbrain_ros policy_node`."""
    return run_node(PolicyNode, "policy_node", args)


if __name__ == "__main__":
    raise SystemExit(main())
