"""The policy node: camera image(s) + joint states + instruction in, JointTrajectory out.

`ros2 launch twinbrain_ros policy.launch.py embodiment:=widowx checkpoint:=DIR`, or
`ros2 run twinbrain_ros policy_node --ros-args --params-file config/widowx.yaml -p checkpoint:=DIR`
(also `python -m twinbrain_ros.ros.policy_node --ros-args ...`).

Subscription callbacks only convert, check and store the latest messages; inference runs in a
worker thread, so the node keeps receiving while the model runs. Every `actions_per_inference`
control periods the worker takes the latest consistent snapshot and runs one
`PolicyPipeline` cycle (model, inverse kinematics for end-effector actions, latency
compensation, blending, safety). Trajectories go to the controller only when `enable_actuation`
is true, otherwise to the dry-run topic; `enable_actuation` may be changed at run time
(`ros2 param set`), effective from the next cycle.

Faults never stop the node: whatever fails in a cycle (bad input, the model, inverse
kinematics, the safety checks) holds the robot at its newest measured position (clipped into
the joint limits), is logged once per cause and counted, and the next cycle plans again. A
watchdog restarts the worker should it ever end, and says so in `/diagnostics` at ERROR level.
Stale or unsynchronised inputs produce no trajectory. An operator stops the robot with the
`~/hold` service and lets the policy plan again with `~/resume` (both `std_srvs/Trigger`).
`/diagnostics` reports latency, rate, rejected inputs by cause, the last error, the worker's
state and the model's identity.
"""

from __future__ import annotations

import collections
import functools
import json
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from ..errors import CausedError, shorten
from ..policy.pipeline import PolicyPipeline
from ..policy.recording import CycleRecorder
from ..policy.scheduler import Trajectory
from ..robot.embodiment import Embodiment
from ..robot.observation import Observation
from . import diagnostic_keys as keys
from .asking import QuestionDesk
from .conversions import (
    InputError,
    controller_trajectories,
    image_to_rgb,
    joint_positions,
    make_trajectory,
)
from .parameters import Param, declare_embodiment, declare_parameters
from .runner import run_node
from .topics import READY_QOS, READY_TOPIC

JOINT_HISTORY = 100  # joint states kept for stamp matching (2 s at 50 Hz)
MAX_CAUSES = 48      # distinct rejection causes kept apart in /diagnostics; the rest is "other"
LOG_EVERY_S = 5.0    # a cause is logged at most this often (its count is always kept)

# Node parameters with defaults: name -> (default, description).
_NODE_PARAMETERS = {
    "checkpoint": Param("", "TwinBrainVLA checkpoint directory (required unless 'server' is "
                            "given)"),
    "server": Param("", "HOST:PORT of a policy server to send observations to instead of "
                        "loading a checkpoint (this process then imports no torch)"),
    "server_token_file": Param("", "file with the token the policy server requires"),
    "server_timeout_s": Param(1.0, "a reply later than this is given up (the robot holds)",
                              (0.01, 60.0)),
    "image_transport": Param("jpeg", "how camera frames travel to the server: jpeg or png "
                                     "(lossless)"),
    "jpeg_quality": Param(90, "JPEG quality of the frames sent to the server", (1, 100)),
    "backbone_path": Param("", "override of the base Qwen-VL directory stored in the checkpoint"),
    "device": Param("auto", "torch device: auto, cpu, cuda or cuda:N (bf16 on CUDA)"),
    "inference": Param("auto", "auto (compiled on CUDA, eager on the CPU), eager, or compiled "
                               "(static shapes and torch.compile, warmed up before the node "
                               "reports ready; a compile failure falls back to eager)"),
    "seed": Param(-1, "seed of the flow-matching noise; -1 draws fresh noise every chunk",
                  (-1, 2**31 - 1)),
    "enable_actuation": Param(False, "publish to the controller topics; false sends every "
                                     "trajectory to dry_run_topic instead (may be changed at "
                                     "run time; turning it off holds the robot first)",
                              dynamic=True),
    "actions_per_inference": Param(4, "control periods executed from a chunk before the next "
                                      "one is requested (the replanning period)", (1, 1000)),
    "blend_steps": Param(2, "points of a new chunk cross-faded with the executing plan "
                            "(chunk_transition blend)", (0, 64)),
    "chunk_transition": Param("blend", "how a new chunk takes over the executing plan: blend "
                                       "(drop the stale actions, cross-fade blend_steps points) "
                                       "or rtc (real-time chunking: the model inpaints the "
                                       "actions that execute while it runs, sized by the "
                                       "measured latency's 95th percentile)"),
    "rtc_schedule": Param("exp", "real-time chunking's guidance weights over the rest of the "
                                 "overlap: exp, linear or hard (frozen prefix only)"),
    "inference_delay_s": Param(0.0, "for evaluation only: seconds added to every inference "
                                    "(the node's clock), to see the behaviour at realistic "
                                    "latencies with a fast model", (0.0, 60.0)),
    "record_path": Param("", "directory for rerun recordings of the policy's cycles, one file "
                             "per instruction (an instruction repeated within 2 s continues "
                             "the file); empty: no recording"),
    "ask_max_new_tokens": Param(64, "longest answer to a question on ~/ask, in tokens",
                                (1, 4096)),
    "ask_tokens_per_slice": Param(8, "most answer tokens generated between two inference "
                                     "cycles (fewer when the time to the next cycle is short; "
                                     "the prompt pass is one slice)", (1, 4096)),
    "max_question_tokens": Param(256, "longest question on ~/ask in tokens; longer ones get an "
                                      "error answer", (1, 8192)),
    "ask_timeout_s": Param(120.0, "with a policy server: how long to wait for its answer",
                           (0.1, 3600.0)),
    "max_input_age_s": Param(0.5, "an image or joint state older than this is stale",
                             (0.001, 60.0)),
    "max_sync_skew_s": Param(0.1, "largest allowed stamp difference between image(s) and joint "
                                  "state", (0.0, 60.0)),
    "max_instruction_tokens": Param(128, "longest instruction in tokens of the checkpoint's "
                                         "tokenizer; longer ones are rejected", (1, 8192)),
    "stamp_trajectories": Param(False, "stamp trajectories with the plan's start time instead "
                                       "of zero (zero means 'start now' to the controller)"),
    "stall_timeout_s": Param(10.0, "a cycle still running after this long (wall clock; at "
                                   "least 3 replanning periods plus the p95 latency) is "
                                   "reported at ERROR and the robot holds", (0.1, 3600.0)),
    "input_silence_s": Param(2.0, "an input topic with a matched publisher but no message for "
                                  "this long (wall clock) gets its subscription recreated",
                             (0.1, 3600.0)),
    "diagnostics_period_s": Param(1.0, "period of /diagnostics messages", (0.01, 60.0)),
}


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
        self.embodiment = declare_embodiment(self)
        self.params = p = declare_parameters(self, _NODE_PARAMETERS)
        if runtime is None and p["server"]:
            runtime = self._remote_runtime(p)
        if runtime is None:
            if not p["checkpoint"]:
                raise ValueError("parameter 'checkpoint' is required (a checkpoint directory), "
                                 "or 'server' (HOST:PORT of a policy server)")
            from ..policy.runtime import PolicyRuntime

            runtime = PolicyRuntime(p["checkpoint"], self.embodiment, device=p["device"],
                                    backbone_path=p["backbone_path"] or None,
                                    seed=None if p["seed"] < 0 else int(p["seed"]),
                                    inference=p["inference"],
                                    max_instruction_tokens=int(p["max_instruction_tokens"]),
                                    max_question_tokens=int(p["max_question_tokens"]),
                                    log=self.get_logger().info)
        self.runtime = runtime
        if p["record_path"]:
            # Recording needs rerun-sdk and a writable directory: say so at start.
            try:
                import rerun  # noqa: F401
            except ImportError as error:
                raise ValueError("record_path needs rerun-sdk (pip install rerun-sdk)") \
                    from error
            try:
                Path(p["record_path"]).mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ValueError(f"record_path {p['record_path']!r} cannot be created: "
                                 f"{error.strerror}") from error
        if p["chunk_transition"] not in ("blend", "rtc"):
            raise ValueError(f"chunk_transition must be blend or rtc, got "
                             f"{p['chunk_transition']!r}")
        self.pipeline = PolicyPipeline(runtime, self.embodiment, blend_steps=p["blend_steps"],
                                       chunk_transition=p["chunk_transition"],
                                       rtc_schedule=p["rtc_schedule"],
                                       notify=lambda cause, text: self._log_limited(
                                           cause, text, "warning", self.pipeline.divergences))
        self.pipeline.track_plan = bool(p["enable_actuation"])
        self.period = self.embodiment.dt * max(1, int(p["actions_per_inference"]))
        if int(p["max_instruction_tokens"]) < 1:
            raise ValueError("max_instruction_tokens must be at least 1")

        self._lock = threading.Lock()       # the latest inputs
        # The plan and what is published from it: the worker after inference, the hold and
        # resume services and the actuation switch. Never held while the model runs.
        self._plan_lock = threading.RLock()
        self._stats_lock = threading.Lock()  # counters and timings read by /diagnostics
        emb = self.embodiment
        self._images: dict[str, tuple] = {}     # topic -> (rgb, receipt time, stamp)
        # Recent joint states (positions, receipt time, stamp), newest last: joint states come
        # much faster than images, so the one stamped nearest the images is used.
        self._joints = collections.deque(maxlen=JOINT_HISTORY)
        self._instruction = None
        self.rejected = collections.Counter()
        self._last_log: dict[str, tuple[float, int]] = {}  # cause -> (time logged, count then)
        self.last_error = ""
        self.latencies = collections.deque(maxlen=200)
        self.cycles = collections.deque(maxlen=200)  # per-cycle timing records (clock seconds)
        self.chunk_times = collections.deque(maxlen=200)
        self.holds = 0
        self.worker_restarts = 0
        self._worker_failure = ""            # why the watchdog last restarted the worker
        self._worker_failure_time = -1e9     # monotonic time of that restart
        self._stalled_since = None           # monotonic time a cycle was found hanging
        self._operator_hold = False
        self._held_at = None                 # where the last hold (since the last plan) went
        self._generation = 0                 # bumped by hold/resume/actuation changes
        self._episode = 0                    # bumped by a new instruction (recording files)
        self._instruction_time = -1e9        # monotonic receipt time of the last instruction
        self._recorder = None                # the open rerun recording and its episode
        self._recorded_episode = 0
        self._recorded_joints = -1e18        # receipt time of the last joint state recorded
        # Camera and joint-state subscriptions are watched: one that stays silent while a
        # publisher is matched is recreated (see `_watch_inputs`).
        self._inputs: dict[str, dict] = {}
        for topic in emb.image_topics:
            self._subscribe(topic, Image, lambda m, t=topic: self._on_image(t, m),
                            qos_profile_sensor_data)
        self._subscribe(emb.joint_state_topic, JointState, self._on_joints, 10)
        self.create_subscription(String, emb.instruction_topic, self._on_instruction, 10)
        # Both routes exist from the start, so that actuation can be switched at run time: the
        # arm (and a separate gripper) controller, and the dry-run topic with every joint.
        self.actuate = bool(p["enable_actuation"])
        topics = [emb.trajectory_topic, emb.gripper_topic, emb.dry_run_topic]
        self._publishers_by_topic = {t: self.create_publisher(JointTrajectory, t, 10)
                                     for t in dict.fromkeys(topics) if t}
        self.diagnostics_publisher = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.asking = QuestionDesk(self, int(p["max_question_tokens"]))
        self.create_subscription(String, "~/ask", self.asking.on_question, 10)
        self.create_service(Trigger, "~/hold", self._on_hold)
        self.create_service(Trigger, "~/resume", self._on_resume)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.create_timer(float(p["diagnostics_period_s"]), self._publish_diagnostics)
        self._stop = threading.Event()
        self._heartbeat = time.monotonic()
        self._worker = self._start_worker()
        self.create_timer(0.5, self._watchdog)
        # Latched, so that a simulator (or anything) started earlier or later learns that the
        # model is loaded (and compiled) and the node plans from now on.
        self.ready_publisher = self.create_publisher(String, READY_TOPIC, READY_QOS)
        self.ready_publisher.publish(String(data=json.dumps({
            "node": self.get_fully_qualified_name(), "embodiment": emb.name,
            "inference": str(getattr(runtime, "inference_state", "")),
            "ready_after_s": round(time.monotonic() - self._created, 2)})))
        self.get_logger().info(
            f"policy node ready after {time.monotonic() - self._created:.1f} s: embodiment "
            f"{emb.name} ({emb.action_space}), {self._route()}")

    def _remote_runtime(self, p: dict):
        from ..serving.client import RemoteRuntime
        from ..serving.protocol import read_token

        if p["image_transport"] not in ("jpeg", "png"):
            raise ValueError(f"image_transport must be jpeg or png, got {p['image_transport']!r}")
        token = read_token(p["server_token_file"]) if p["server_token_file"] else None
        return RemoteRuntime(p["server"], self.embodiment, token=token,
                             timeout_s=float(p["server_timeout_s"]),
                             ask_timeout_s=float(p["ask_timeout_s"]),
                             image_format=p["image_transport"],
                             jpeg_quality=int(p["jpeg_quality"]),
                             seed=None if p["seed"] < 0 else int(p["seed"]),
                             log=self.get_logger().info)

    def _route(self) -> str:
        emb = self.embodiment
        return (f"ACTUATION ENABLED on {emb.trajectory_topic}" if self.actuate
                else f"dry run on {emb.dry_run_topic}")

    # -- logging and counting ------------------------------------------------------------------

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _count(self, cause: str, n: int = 1) -> None:
        """Count under a bounded set of keys: causes past MAX_CAUSES go to 'other'."""
        with self._stats_lock:
            if cause not in self.rejected and len(self.rejected) >= MAX_CAUSES:
                cause = "other"
            self.rejected[cause] += n

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
        """Count a rejected input or cycle; log it at most once per cause every LOG_EVERY_S."""
        self._count(cause)
        with self._stats_lock:
            if cause not in self.rejected:
                cause = "other"  # past MAX_CAUSES: counted and rate-limited as one
            total = self.rejected[cause]
        self._log_limited(cause, message, level, total)

    def _log_limited(self, cause: str, message: str, level: str, total: int) -> None:
        """Log at most once per cause every LOG_EVERY_S; `total`: how often it happened."""
        now = time.monotonic()
        with self._stats_lock:
            logged_at, logged_count = self._last_log.get(cause, (-1e9, 0))
            due = now - logged_at >= LOG_EVERY_S
            if due:
                self._last_log[cause] = (now, total)
        if due:
            since = total - logged_count - 1
            more = f" ({since} more since the last report)" if logged_count and since > 0 else ""
            self._log(level, f"{message} [{cause}]{more}")

    # -- callbacks: convert, check, store; the model never runs here -------------------------

    def _subscribe(self, topic: str, message_type, callback, qos) -> None:
        def received(msg, callback=callback, topic=topic):
            self._inputs[topic]["received"] = time.monotonic()
            callback(msg)

        entry = self._inputs.setdefault(topic, {"received": None, "resubscribed": 0,
                                                "backoff": 1.0, "type": message_type,
                                                "callback": callback, "qos": qos})
        entry["subscription"] = self.create_subscription(message_type, topic, received, qos)
        entry["since"] = time.monotonic()

    def _watch_inputs(self) -> None:
        """Recreate the subscription of an input that went silent while a publisher is matched.

        A DDS reader can stop receiving for good while its publisher goes on (seen with large
        images over shared memory on a loaded machine while other subscribers came and went);
        a new subscription is a new reader. Silence is measured on the wall clock, and each
        recreation doubles the wait before the next one (up to 32x), so a publisher that is
        merely paused (a simulator between episodes) costs a log line now and then.
        """
        limit = float(self.params["input_silence_s"])
        now = time.monotonic()
        for topic, entry in self._inputs.items():
            last = entry["received"]
            if last is not None and last >= entry["since"]:
                entry["backoff"] = 1.0
            reference = max(entry["since"], last or entry["since"])
            if now - reference < limit * entry["backoff"]:
                continue
            publishers = self.count_publishers(topic)
            if publishers == 0:
                continue
            self.destroy_subscription(entry["subscription"])
            self._subscribe(topic, entry["type"], entry["callback"], entry["qos"])
            entry["resubscribed"] += 1
            entry["backoff"] = min(entry["backoff"] * 2.0, 32.0)
            self._reject("input_resubscribed",
                         f"no message on {topic} for {now - reference:.1f} s while {publishers} "
                         "publisher(s) are matched: subscription recreated")

    @_guarded
    def _on_image(self, topic: str, msg: Image) -> None:
        try:
            rgb = image_to_rgb(msg)
        except InputError as error:
            self._reject(error.cause, f"dropped image on {topic}: {error}")
            return
        # Any size is usable (the model's processor resizes every frame to its input size), so a
        # camera that changes resolution keeps working.
        with self._lock:
            self._images[topic] = (rgb, self._now(), _stamp(msg))

    @_guarded
    def _on_joints(self, msg: JointState) -> None:
        try:
            positions = joint_positions(msg, self.embodiment.joint_names)
            self.pipeline.safety.check_state(positions, self.embodiment.joint_names)
        except CausedError as error:
            self._reject(error.cause, f"dropped joint state: {error}")
            return
        with self._lock:
            self._joints.append((positions, self._now(), _stamp(msg)))

    @_guarded
    def _on_instruction(self, msg: String) -> None:
        text = msg.data
        max_tokens = int(self.params["max_instruction_tokens"])
        try:
            if len(text) > 8 * max_tokens:  # refused before any work on it (see QwenVLProcessor)
                raise CausedError("instruction_too_long",
                                  f"instruction of {len(text)} characters is longer than "
                                  f"{max_tokens} tokens (max_instruction_tokens)")
            text = text.strip()
            if not text:
                raise CausedError("empty_instruction", "rejected an empty instruction")
            check = getattr(self.runtime, "check_instruction", None)
            if check is not None:
                check(text, max_tokens)
        except CausedError as error:
            # The robot must not go on with the previous task when a new one was meant: no
            # new plans, and the one executing stops where the robot is.
            with self._lock:
                had_one, self._instruction = self._instruction is not None, None
            suffix = "; holding until a valid instruction arrives" if had_one else ""
            self._reject(error.cause, f"rejected an instruction: {error}{suffix}")
            with self._plan_lock:
                if self.pipeline.scheduler.plan is not None:
                    self._generation += 1
                    self._hold("instruction rejected")
            return
        with self._lock:
            previous, self._instruction = self._instruction, text
            now = time.monotonic()
            if text != previous or now - self._instruction_time > 2.0:
                self._episode += 1  # a new task, or the same one given again after a pause
            self._instruction_time = now
        if text != previous:
            self.get_logger().info(f"instruction: {shorten(repr(text), 200)}")

    @_guarded
    def _on_hold(self, request, response):
        with self._plan_lock:
            self._operator_hold = True
            self._generation += 1
            held = self._hold("operator hold", force=True)
        response.success = True
        response.message = ("holding at the measured position; call ~/resume to plan again"
                            if held else "holding: no plans will be published (no measured "
                                         "position to send a hold to)")
        self.get_logger().warning(f"operator hold: {response.message}")
        return response

    @_guarded
    def _on_resume(self, request, response):
        with self._plan_lock:
            was_held, self._operator_hold = self._operator_hold, False
            self._generation += 1
            self.pipeline.scheduler.reset()
        response.success = True
        response.message = "resumed: planning from the next cycle" if was_held else \
            "was not held; planning continues"
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
        with self._plan_lock:
            if enable == self.actuate:
                return
            if not enable:
                # The controller would finish the plan it has: stop it where the robot is.
                self._hold("actuation disabled", force=True)
            self.actuate = enable
            self.params["enable_actuation"] = enable
            self._generation += 1
            self.pipeline.track_plan = enable  # in a dry run nothing follows the plan
            self.pipeline.scheduler.reset()
        self.get_logger().warning(f"enable_actuation set to {enable}: {self._route()} from "
                                  "the next cycle")

    # -- inference worker --------------------------------------------------------------------

    def _start_worker(self) -> threading.Thread:
        worker = threading.Thread(target=self._run, name="inference", daemon=True)
        worker.start()
        return worker

    def _measured(self, max_age: float | None = None) -> np.ndarray | None:
        """The newest measured joint position (None if none, or older than `max_age`)."""
        with self._lock:
            newest = self._joints[-1] if self._joints else None
        if newest is None or (max_age is not None and self._now() - newest[1] > max_age):
            return None
        return newest[0].copy()

    def _snapshot(self):
        """The latest consistent (observation, observation time, inputs), or None."""
        with self._lock:
            images = dict(self._images)
            history, instruction = list(self._joints), self._instruction
            episode = self._episode
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
                  "joint_stamp": joints[2], "episode": episode}
        return observation, joints[1], inputs

    def _run(self) -> None:
        # The replanning period is measured on the node's clock: with use_sim_time a simulator
        # running faster or slower than the wall clock gets a chunk every period of its time.
        # Without usable inputs it looks again after one control period, not a whole replanning
        # period: the first chunk follows the first usable observation closely.
        while not self._stop.is_set():
            self._heartbeat = wall_start = time.monotonic()
            start = self._now()
            planned = False
            try:
                planned = self._plan_once()
            except Exception as error:  # noqa: BLE001 - whatever failed, the robot must hold
                try:
                    self._fail(error)
                except Exception as failure:  # noqa: BLE001 - never let the worker end
                    self._reject("hold_failed", f"could not hold after {type(error).__name__}: "
                                                f"{shorten(str(failure), 200)}", level="error")
            wait = self.period if planned else self.embodiment.dt
            try:  # a question to the Left Brain: one slice, sized to the gap
                self.asking.work(self._wall_gap(start, wall_start, wait))
            except Exception as error:  # noqa: BLE001 - never let the worker end
                self._reject("ask_failed", f"answering failed: {type(error).__name__}: "
                                           f"{shorten(str(error), 200)}", level="error")
            while not self._stop.is_set():
                self._heartbeat = time.monotonic()  # waiting (a paused /clock too) is not a stall
                elapsed = self._now() - start
                remaining = wait - elapsed
                if remaining <= 0 or elapsed < 0:  # elapsed < 0: the clock was reset
                    break
                self._stop.wait(min(remaining, 0.005))

    def _wall_gap(self, start: float, wall_start: float, wait: float) -> float:
        """Wall-clock seconds until the next cycle, due `wait` node-clock seconds after `start`.

        A simulated clock may run faster or slower than the wall clock.
        """
        elapsed_node, elapsed_wall = self._now() - start, time.monotonic() - wall_start
        rate = elapsed_node / elapsed_wall if elapsed_node > 0 and elapsed_wall > 1e-3 else 1.0
        return max(0.0, (start + wait - self._now()) / rate)

    def _plan_once(self) -> bool:
        """One cycle; True when a chunk was inferred (published or refused)."""
        if self._operator_hold:
            return False
        snapshot = self._snapshot()
        if snapshot is None:
            # Inputs went stale or unusable while a plan runs: the controller would go on
            # blind to its end. Stop it where the robot is, once.
            with self._plan_lock:
                if self.pipeline.scheduler.plan is not None:
                    self._hold("unusable inputs")
                    self._reject("held_on_unusable_inputs", "holding position: no usable "
                                                            "inputs for the next plan")
            return False
        observation, observation_time, inputs = snapshot
        generation = self._generation
        started = self._now()
        inputs["asking"] = self.asking.waiting
        with self._plan_lock:
            prefix = self.pipeline.prepare(observation, observation_time)
        recorder = self._record_observation(observation, observation_time, inputs["episode"])
        chunk = self.pipeline.infer(observation, prefix)
        self._wait_inference_delay(started)
        targets = self.pipeline.decode(chunk, observation)  # IK runs outside the lock
        with self._plan_lock:
            if generation != self._generation or self._operator_hold:
                self._count("discarded_after_hold")
                return True
            result = self.pipeline.schedule(
                chunk, targets, observation, observation_time, self._now,
                measured=lambda: self._measured_or(observation.state))
            published = self._publish(result.trajectory)
            if published:
                self._held_at = None
                if recorder is not None:
                    trajectory = result.trajectory
                    self._record("chunk", observation_time, result.targets,
                                 self.embodiment.dt, chunk.latency_s, trajectory.start_time)
                    self._record("sent", trajectory.start_time, trajectory.time_from_start,
                                 trajectory.positions)
        now = self._now()
        with self._stats_lock:
            if self.cycles:
                inputs["period_s"] = started - self.cycles[-1]["started"]
            self.latencies.append(result.chunk.latency_s)
            self.chunk_times.append(time.monotonic())
            # Time in the node beyond the model: snapshot, conversion, scheduling, safety,
            # publishing.
            self.cycles.append({**inputs, "started": started, "model_s": result.chunk.latency_s,
                                "published": now,
                                "overhead_s": now - started - result.chunk.latency_s})
        if result.dropped_actions:
            self._count("late_actions_dropped", result.dropped_actions)
        return published

    def _wait_inference_delay(self, started: float) -> None:
        """Evaluation only: hold the chunk back until `inference_delay_s` has passed."""
        delay = float(self.params["inference_delay_s"])
        while delay > 0 and not self._stop.is_set():
            self._heartbeat = time.monotonic()
            remaining = started + delay - self._now()
            if remaining <= 0:
                break
            self._stop.wait(min(remaining, 0.005))

    def _record_observation(self, observation: Observation, observation_time: float,
                            episode: int):
        """The episode's recorder (opened on a new instruction) with this cycle's inputs.

        Recording never stops the robot: a recorder that fails is closed and recording is
        turned off, with one error line.
        """
        if not self.params["record_path"]:
            return None
        with self._lock:
            history = list(self._joints)
        with self._plan_lock:  # holds (executor threads) record through the same recorder
            if self._recorder is None or self._recorded_episode != episode:
                if self._recorder is not None:
                    self._record("close")
                name = "".join(c if c.isalnum() else "_" for c in observation.instruction[:40])
                try:
                    self._recorder = CycleRecorder(
                        f"{self.params['record_path']}/{episode:04d}_{name}.rrd",
                        self.embodiment.joint_names)
                except Exception as error:  # noqa: BLE001 - never a reason to hold
                    self._recording_failed(error)
                    return None
                self._recorded_episode = episode
                self._record("instruction", observation_time, observation.instruction)
            self._record("observation", observation_time, observation.images)
            for positions, received, _ in history:
                if received > self._recorded_joints:
                    self._record("measured", received, positions)
                    self._recorded_joints = received
            return self._recorder

    def _record(self, method: str, *args) -> None:
        """Call the recorder (if any); a failure turns recording off, the robot goes on."""
        recorder = self._recorder
        if recorder is None:
            return
        try:
            getattr(recorder, method)(*args)
        except Exception as error:  # noqa: BLE001 - a full disk must not stop the robot
            self._recording_failed(error)

    def _recording_failed(self, error: Exception) -> None:
        recorder, self._recorder = self._recorder, None
        self.params["record_path"] = ""
        self._log("error", f"recording stopped: {type(error).__name__}: "
                           f"{shorten(str(error), 300)}")
        if recorder is not None:
            try:
                recorder.close()
            except Exception:  # noqa: BLE001, S110 - already failing; nothing more to save
                pass

    def _measured_or(self, fallback: np.ndarray) -> np.ndarray:
        measured = self._measured()
        return fallback if measured is None else measured

    def _fail(self, error: Exception) -> None:
        """A failed cycle: log and count its cause, hold the robot where it is measured."""
        cause = error.cause if isinstance(error, CausedError) else "inference_error"
        text = shorten(str(error) or type(error).__name__, 300)
        with self._stats_lock:
            self.last_error = f"{cause}: {text}"
        self._reject(cause, f"holding position: {text}",
                     level="warning" if isinstance(error, CausedError) else "error")
        with self._plan_lock:
            self._hold(cause)

    def _hold(self, reason: str, force: bool = False) -> bool:
        """Publish a hold at the newest measured position (call with `_plan_lock` held).

        A measured position older than `max_input_age_s` is not trusted while a plan runs: the
        robot then holds at the commanded position. While the robot already holds (no plan
        since the last hold) and has not moved by a quarter step, the hold is not sent again:
        failing cycles in a row do not flood the controller. Returns whether a hold was sent.
        """
        now = self._now()
        executing = self.pipeline.scheduler.plan is not None
        position = self._measured(float(self.params["max_input_age_s"]))
        if position is None:
            position = self.pipeline.scheduler.commanded_position(now)
        if position is None:
            position = self._measured()
        self.pipeline.scheduler.reset()
        if position is None:
            return False
        held_at = self._held_at
        if (not force and not executing and held_at is not None
                and np.all(np.abs(position - held_at) < 0.25 * self.embodiment.max_step)):
            return True
        try:
            trajectory = self.pipeline.hold(position, now)
        except ValueError as error:
            self._reject(getattr(error, "cause", "hold_refused"),
                         f"cannot hold ({reason}): {error}")
            return False
        with self._stats_lock:
            self.holds += 1
        published = self._publish(trajectory)
        self._held_at = trajectory.positions[0].copy() if published else None
        if published:
            self._record("sent", trajectory.start_time, trajectory.time_from_start,
                         trajectory.positions, reason)
        return published

    def _publish(self, trajectory: Trajectory) -> bool:
        """Publish to the current route; False after shutdown began (nothing is sent then)."""
        emb = self.embodiment
        if self._stop.is_set() or not self.context.ok():
            return False
        if not _within_limits(trajectory.positions, emb):
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
                self._publishers_by_topic[topic].publish(message)
        except Exception:  # the context may end between the check and the call (Ctrl-C)
            if self._stop.is_set() or not self.context.ok():
                return False
            raise
        return True

    @_guarded
    def _watchdog(self) -> None:
        """Watch the inputs; restart the worker should it ever end (see `_watch_inputs`)."""
        if self._stop.is_set():
            return
        self._watch_inputs()
        if self._worker.is_alive():
            self._watch_stall()
            return
        self.worker_restarts += 1
        self._worker_failure = (f"inference worker stopped unexpectedly; restarted "
                                f"({self.worker_restarts} restarts)")
        self._worker_failure_time = time.monotonic()
        self.get_logger().error(self._worker_failure)
        with self._plan_lock:
            self._generation += 1
            self._hold("worker restart")
        self._worker = self._start_worker()

    def _stall_limit_s(self) -> float:
        with self._stats_lock:
            latencies = list(self.latencies)
        p95 = float(np.percentile(latencies, 95)) if latencies else 0.0
        return max(float(self.params["stall_timeout_s"]), 3.0 * (self.period + p95))

    def _watch_stall(self) -> None:
        """A cycle that hangs (a deadlocked device call) cannot be restarted: hold and say so."""
        idle = time.monotonic() - self._heartbeat
        if idle > self._stall_limit_s():
            if self._stalled_since is None:
                self._stalled_since = time.monotonic()
                self.get_logger().error(f"the inference worker has not finished a cycle for "
                                        f"{idle:.1f} s: holding the robot")
                with self._plan_lock:
                    self._generation += 1  # whatever the hung cycle returns is discarded
                    self._hold("worker stalled")
        elif self._stalled_since is not None:
            self._stalled_since = None
            self.get_logger().info("the inference worker is cycling again")

    # -- diagnostics ---------------------------------------------------------------------------

    @_guarded
    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus(name=keys.STATUS_NAME,
                                  hardware_id=str(self.params["server"]
                                                  or self.params["checkpoint"]))
        values = {}
        with self._stats_lock:
            latencies = list(self.latencies)
            overheads = [c["overhead_s"] for c in self.cycles]
            cycles = list(self.cycles)
            chunk_times = list(self.chunk_times)
            rejected = sorted(self.rejected.items())
            last_error, holds = self.last_error, self.holds
        if latencies:
            lat = np.asarray(latencies) * 1000.0
            values[keys.INFERENCE_LATENCY_MEDIAN_MS] = f"{np.median(lat):.1f}"
            values[keys.INFERENCE_LATENCY_P95_MS] = f"{np.percentile(lat, 95):.1f}"
        if overheads:
            values[keys.CYCLE_OVERHEAD_MEDIAN_MS] = f"{np.median(overheads) * 1000.0:.2f}"
        recent = [t for t in chunk_times if time.monotonic() - t <= 10.0]
        values[keys.ACHIEVED_RATE_HZ] = f"{len(recent) / 10.0:.2f}"
        values[keys.CHUNKS_TOTAL] = str(len(latencies))
        for cause, count in rejected:
            values[keys.rejected(cause)] = str(count)
        values[keys.HOLDS_TOTAL] = str(holds)
        pipeline = self.pipeline
        values[keys.CHUNK_TRANSITION] = pipeline.chunk_transition
        if pipeline.chunk_transition == "rtc":
            values[keys.RTC_EXPECTED_LATENCY_S] = f"{pipeline.expected_latency():.3f}"
        values[keys.PLAN_LEFT_TOTAL] = str(pipeline.divergences)
        values[keys.PLAN_LEFT_LAST] = pipeline.last_divergence
        values[keys.LAST_ERROR] = last_error
        values[keys.WORKER_ALIVE] = str(self._worker.is_alive())
        values[keys.WORKER_RESTARTS] = str(self.worker_restarts)
        values[keys.WORKER_IDLE_S] = f"{time.monotonic() - self._heartbeat:.1f}"
        values[keys.OPERATOR_HOLD] = str(self._operator_hold)
        now = time.monotonic()
        for topic, entry in self._inputs.items():
            age = "never" if entry["received"] is None else f"{now - entry['received']:.2f}"
            values[keys.input_silent_s(topic)] = age
            values[keys.input_resubscribed(topic)] = str(entry["resubscribed"])
        values.update(self.asking.diagnostics(cycles))
        values[keys.ACTUATION_ENABLED] = str(self.actuate)
        values[keys.EMBODIMENT] = self.embodiment.name
        for key, value in dict(getattr(self.runtime, "identity", {})).items():
            values[keys.model(key)] = str(value)
        status.level = DiagnosticStatus.OK
        status.message = "running"
        if self._operator_hold:
            status.level, status.message = DiagnosticStatus.WARN, "held by the operator"
        elif last_error:
            status.level, status.message = DiagnosticStatus.WARN, last_error[:200]
        if self._stalled_since is not None:
            status.level = DiagnosticStatus.ERROR
            status.message = (f"inference worker stalled for "
                              f"{time.monotonic() - self._heartbeat:.0f} s; holding")
        recently_restarted = time.monotonic() - self._worker_failure_time < 60.0
        if recently_restarted or not self._worker.is_alive():
            status.level = DiagnosticStatus.ERROR
            status.message = self._worker_failure or "inference worker is not running"
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_publisher.publish(array)

    def destroy_node(self) -> None:
        """Stop and join the worker before the node goes away; nothing is published after."""
        self._stop.set()
        self._worker.join(timeout=10.0)
        if not self._worker.is_alive():
            with self._plan_lock:
                self._record("close")
        super().destroy_node()


def _within_limits(positions: np.ndarray, embodiment: Embodiment) -> bool:
    positions = np.asarray(positions, dtype=np.float64)
    return bool(np.isfinite(positions).all()
                and np.all(positions >= embodiment.lower - 1e-9)
                and np.all(positions <= embodiment.upper + 1e-9))


def _matching_joint_state(history: list[tuple], image_stamps: list[float]) -> tuple:
    """The joint state stamped nearest the newest image; the newest one without stamps."""
    newest_image = max(image_stamps)
    if newest_image <= 0 or history[-1][2] <= 0:
        return history[-1]
    return min(history, key=lambda joints: abs(joints[2] - newest_image))


def _stamp(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def main(args: list[str] | None = None) -> int:
    """Entry point of `ros2 run twinbrain_ros policy_node`."""
    return run_node(PolicyNode, "policy_node", args)


if __name__ == "__main__":
    raise SystemExit(main())
