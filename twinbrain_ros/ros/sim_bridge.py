"""The simulation bridge: a simulated robot behind the same topics as the real one.

    ros2 launch twinbrain_ros sim.launch.py embodiment:=widowx task:=pick_cube checkpoint:=DIR
    ros2 run twinbrain_ros sim_bridge --ros-args -p embodiment:=gr1 -p task:=pick_place_can

A simulation thread steps the backend (`twinbrain_ros.sim`) by its `sim_dt`, paced at
`real_time_factor` times the wall clock, and publishes:

- `/clock` (simulated time, monotonic across episodes) when `publish_clock` is true; each
  episode starts `episode_gap_s` of simulated time after the previous one ended, so that a
  policy node's plan, inputs and stamps from one episode never reach into the next (a
  trajectory still executing or blended into when the scene was reset; with `publish_clock`
  false, stamps are wall-clock time and this protection is absent);
- the embodiment's camera topics (`sensor_msgs/Image`, rgb8) at `camera_rate_hz`;
- the embodiment's `JointState` topic every simulator step;
- the episode's instruction on the instruction topic when an episode starts (when
  `publish_instruction` is true; otherwise the instruction comes from the user);
- `/sim/success` (`std_msgs/Bool`) every control period and `/sim/episode` (`std_msgs/String`
  with a JSON object) when an episode starts and ends.

It executes `trajectory_msgs/JointTrajectory` messages from the embodiment's trajectory topic
(and gripper topic) like a joint trajectory controller (`twinbrain_ros.sim.follower`). An episode
ends on success or after the task's step budget (only after the budget for a backend that judges
episodes at their end, `judge_at_end`); the robot then holds still, and nothing is
published until the next reset. Resets come from `/sim/reset` (`std_msgs/String`: a JSON object
`{"seed": int, "task": str}`, both optional; an empty string means the next seed of the current
task), or automatically with `auto_reset`.

With `expert` true the task's scripted expert drives the robot through the same trajectory
topics (privileged state, in this process): a check of the loop without a policy.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time

import numpy as np
import rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, String
from trajectory_msgs.msg import JointTrajectory

from ..evaluation.motion import MotionLog
from ..evaluation.results import jsonable
from ..robot.embodiment import Embodiment
from ..sim.base import SimError, make_backend
from ..sim.follower import TrajectoryError, TrajectoryFollower
from ..sim.rollout import substeps_per_control
from .conversions import controller_trajectories, rgb_to_image
from .parameters import Param, declare_parameters
from .runner import run_node
from .topics import READY_QOS, READY_TOPIC

EPISODE_TOPIC = "/sim/episode"
SUCCESS_TOPIC = "/sim/success"
RESET_TOPIC = "/sim/reset"
# Episode events must reach late subscribers (an evaluator that starts after the bridge).
EVENT_QOS = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.TRANSIENT_LOCAL)

_PARAMETERS = {
    "embodiment": Param("widowx", "robot: an embodiment name (config/<name>.yaml) or a YAML "
                                  "path"),
    "backend": Param("", "simulator backend (empty: the embodiment's CPU default, "
                         "widowx_mujoco or gr1_robosuite)"),
    "task": Param("", "task of the backend (empty: its first task)"),
    "seed": Param(0, "seed of the first episode; each later reset without a seed adds one",
                  (0, 2**31 - 1)),
    "image_width": Param(224, "camera image width in pixels", (8, 4096)),
    "image_height": Param(224, "camera image height in pixels", (8, 4096)),
    "camera_rate_hz": Param(0.0, "camera publishing rate (0: the embodiment's control rate)",
                            (0.0, 1000.0)),
    "real_time_factor": Param(1.0, "simulated seconds per wall-clock second (0: as fast as "
                                   "possible)", (0.0, 1000.0)),
    "publish_clock": Param(True, "publish simulated time on /clock (nodes with use_sim_time)"),
    "episode_gap_s": Param(5.0, "simulated time skipped before each episode; keep it longer "
                                "than the policy's plan (horizon x control period) so that "
                                "none carries across a reset", (0.0, 3600.0)),
    "episode_steps": Param(0, "length of every episode in control periods (0: the task's own "
                              "limit); shorter episodes for quick checks", (0, 10_000_000)),
    "publish_instruction": Param(True, "publish the task's instruction at each episode start"),
    "start_episode": Param(True, "start the first episode without waiting for a reset "
                                 "request"),
    "auto_reset": Param(False, "start the next episode as soon as one ends"),
    "wait_for_subscribers_s": Param(10.0, "at an episode start, wait this long for a "
                                          "subscriber of the instruction topic (the policy "
                                          "node)", (0.0, 3600.0)),
    "wait_for_policy": Param(False, "start the first episode only once a policy node has "
                                    "reported ready on /policy/ready (its model loaded), "
                                    "logging while it waits; sim.launch.py sets it when it "
                                    "starts a policy node"),
    "expert": Param(False, "drive the robot with the task's scripted expert through the "
                           "trajectory topics (no policy node needed)"),
}


class SimBridge(Node):
    """Steps a simulator and exposes it through the robot's ROS topics."""

    def __init__(self, backend=None, **node_kwargs):
        """Declare parameters, build the backend (unless given), wire topics, start the loop."""
        super().__init__("sim_bridge", **node_kwargs)
        self.params = p = declare_parameters(self, _PARAMETERS)
        if backend is None:
            embodiment = Embodiment.resolve(p["embodiment"])
            backend = make_backend(p["backend"] or embodiment.name, task=p["task"] or None,
                                   embodiment=embodiment, image_width=int(p["image_width"]),
                                   image_height=int(p["image_height"]))
        self.backend = backend
        self.embodiment = emb = backend.embodiment
        if len(backend.camera_names) != len(emb.image_topics):
            raise ValueError(f"backend has {len(backend.camera_names)} cameras for "
                             f"{len(emb.image_topics)} image topics")
        self._lock = threading.Lock()
        self._task = backend.task
        self._next_seed = int(p["seed"])
        self._episode = None            # current Episode while one runs
        self._episode_index = -1
        self._steps = 0                 # control steps of the current episode
        self._substeps_done = 0         # simulator steps of the current episode
        self._trajectories = 0          # trajectories executed in the current episode
        self._sim_time = 0.0            # monotonic simulated time (the /clock)
        self._reset_request = None      # (seed or None, task or None)
        self._wall_start = None
        self.episodes: list[dict] = []  # results of ended episodes
        # Messages refused (each logged): "trajectory" (malformed or not executable), "reset".
        self.ignored: collections.Counter = collections.Counter()

        q, _ = backend.joint_state()
        self.follower = TrajectoryFollower(emb.joint_names, emb.lower, emb.upper, q,
                                           max_velocity=emb.max_velocity)
        self._motion = MotionLog.for_embodiment(emb)
        self._substeps = substeps_per_control(backend)
        camera_rate = float(p["camera_rate_hz"]) or emb.control_rate_hz
        self._camera_every = max(1, round(1.0 / (camera_rate * backend.sim_dt)))

        self.image_publishers = [self.create_publisher(Image, t, qos_profile_sensor_data)
                                 for t in emb.image_topics]
        self.joint_publisher = self.create_publisher(JointState, emb.joint_state_topic, 10)
        self.clock_publisher = (self.create_publisher(Clock, "/clock", 10)
                                if p["publish_clock"] else None)
        self.instruction_publisher = self.create_publisher(String, emb.instruction_topic, 10)
        self.success_publisher = self.create_publisher(Bool, SUCCESS_TOPIC, 10)
        self.episode_publisher = self.create_publisher(String, EPISODE_TOPIC, EVENT_QOS)
        self.create_subscription(JointTrajectory, emb.trajectory_topic, self._on_trajectory, 10)
        if emb.gripper_topic:
            self.create_subscription(JointTrajectory, emb.gripper_topic, self._on_trajectory, 10)
        self.create_subscription(String, RESET_TOPIC, self._on_reset, 10)
        self._policy_ready = threading.Event()
        if p["wait_for_policy"] and not p["expert"]:
            self.create_subscription(String, READY_TOPIC, self._on_policy_ready, READY_QOS)
        else:
            self._policy_ready.set()

        self._expert = None
        if p["expert"]:
            self.expert_publishers = {
                topic: self.create_publisher(JointTrajectory, topic, 10)
                for topic in (emb.trajectory_topic, emb.gripper_topic) if topic}
        if p["start_episode"]:
            self._reset_request = (None, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="simulation", daemon=True)
        self._thread.start()
        self.get_logger().info(
            f"sim bridge ready: {backend.name} task {self._task}, sim_dt {backend.sim_dt:.3f} s, "
            f"cameras {list(backend.camera_names)} -> {emb.image_topics}, "
            f"commands on {emb.trajectory_topic}"
            + (f" and {emb.gripper_topic}" if emb.gripper_topic else "")
            + (", scripted expert driving" if p["expert"] else ""))

    # -- ROS callbacks -----------------------------------------------------------------------

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        times = [pt.time_from_start.sec + pt.time_from_start.nanosec * 1e-9 for pt in msg.points]
        rows = [list(pt.positions) for pt in msg.points]
        if len({len(row) for row in rows}) > 1:
            self.ignored["trajectory"] += 1
            self.get_logger().warning("ignored a trajectory: its points have different numbers "
                                      "of positions", throttle_duration_sec=2.0)
            return
        width = len(rows[0]) if rows else len(msg.joint_names)
        positions = np.array(rows, dtype=np.float64).reshape(len(rows), width)
        with self._lock:
            if self._episode is None:
                return  # between episodes the robot holds still
            now = self._sim_time
            try:
                self.follower.receive(list(msg.joint_names), np.asarray(times), positions,
                                      stamp if stamp > 0 else now, now)
            except TrajectoryError as error:
                self.ignored["trajectory"] += 1
                self.get_logger().warning(f"ignored a trajectory: {error}",
                                          throttle_duration_sec=2.0)
                return
            self._trajectories += 1
            # A hold is one point at rest (the policy node's hold trajectory).
            hold = len(msg.points) == 1 and not any(msg.points[0].velocities)
            self._motion.trajectory(now, hold=hold)

    def _on_policy_ready(self, msg: String) -> None:
        if not self._policy_ready.is_set():
            try:
                ready = json.loads(msg.data)
            except ValueError:
                ready = {}
            self.get_logger().info(f"policy node {ready.get('node', '?')} is ready "
                                   f"({ready.get('inference', '')}): episodes start")
        self._policy_ready.set()

    def _on_reset(self, msg: String) -> None:
        text = msg.data.strip()
        try:
            request = json.loads(text) if text else {}
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
            seed = request.get("seed")
            task = request.get("task")
            if seed is not None and not isinstance(seed, int):
                raise ValueError(f"seed must be an integer, got {seed!r}")
            if task is not None and task not in self.backend.tasks:
                raise ValueError(f"unknown task {task!r}; tasks: {list(self.backend.tasks)}")
        except ValueError as error:
            self.ignored["reset"] += 1
            self.get_logger().error(f"ignored reset request {text!r}: {error}")
            return
        with self._lock:
            self._reset_request = (seed, task)

    # -- simulation thread ---------------------------------------------------------------------

    def _stopping(self) -> bool:
        return self._stop.is_set() or not self.context.ok()

    def _loop(self) -> None:
        try:
            self._simulate()
        except Exception:
            # Ctrl-C shuts the context down while this thread may be publishing: that ends the
            # loop quietly. Anything else is a bug worth its traceback.
            if not self._stopping():
                raise

    def _simulate(self) -> None:
        rtf = float(self.params["real_time_factor"])
        while not self._stop.is_set() and rclpy.ok(context=self.context):
            with self._lock:
                request, self._reset_request = self._reset_request, None
                running = self._episode is not None
            if request is not None:
                try:
                    self._start_episode(*request)
                except Exception as error:  # noqa: BLE001 - report it, keep the node up
                    if self._stopping():
                        return
                    self.get_logger().error(f"episode start failed: {error!r}")
                    self._end_episode(False, error=repr(error))
                self._wall_start = (time.monotonic(), self._sim_time)
                continue
            if not running:
                self._stop.wait(0.01)
                continue
            try:
                self._step()
            except Exception as error:  # noqa: BLE001 - end the episode, keep the node up
                if self._stopping():
                    return
                self.get_logger().error(f"simulation failed, episode ended: {error!r}")
                self._end_episode(False, error=repr(error))
                continue
            if rtf > 0:
                wall0, sim0 = self._wall_start
                delay = wall0 + (self._sim_time - sim0) / rtf - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)

    def _wait_for_policy(self) -> None:
        """With `wait_for_policy`: no episode before the policy node has its model."""
        started, logged = time.monotonic(), -1e9
        while not self._policy_ready.is_set() and not self._stop.is_set():
            if time.monotonic() - logged >= 10.0:
                logged = time.monotonic()
                self.get_logger().info(f"waiting for the policy node to report ready on "
                                       f"{READY_TOPIC} before the episode starts "
                                       f"({logged - started:.0f} s so far)")
            self._policy_ready.wait(0.1)

    def _start_episode(self, seed, task) -> None:
        self._wait_for_policy()
        if self._stop.is_set():
            return
        if task is not None and task != self._task:
            self.backend = self._rebuild_backend(task)
        seed = self._next_seed if seed is None else int(seed)
        self._next_seed = seed + 1
        self._wait_for_instruction_subscriber()
        try:
            episode = self.backend.reset(seed)
        except Exception as error:  # noqa: BLE001 - a failed reset must not kill the bridge
            self.get_logger().error(f"reset of {self._task} seed {seed} failed: {error}")
            return
        if int(self.params["episode_steps"]) > 0:
            episode = dataclasses.replace(episode, max_steps=int(self.params["episode_steps"]))
        q, _ = self.backend.joint_state()
        with self._lock:
            self._sim_time += max(0.0, float(self.params["episode_gap_s"]))
            self.follower.reset(q, now=self._sim_time)
            self._motion = MotionLog.for_embodiment(self.embodiment)
            self._episode = episode
            self._episode_index += 1
            self._steps = 0
            self._substeps_done = 0     # control periods start with the episode
            self._trajectories = 0
        if self.params["expert"]:
            self._expert = self.backend.expert()
        if self.params["publish_instruction"]:
            self.instruction_publisher.publish(String(data=episode.instruction))
        self._publish_event("start", success=False)
        self.get_logger().info(f"episode {self._episode_index}: {episode.task} seed {seed}: "
                               f"{episode.instruction!r}")
        self._publish_observation(cameras=True)

    def _rebuild_backend(self, task: str):
        old = self.backend
        backend = make_backend(old.name, task=task, embodiment=self.embodiment,
                               image_width=int(self.params["image_width"]),
                               image_height=int(self.params["image_height"]))
        old.close()
        self._task = task
        return backend

    def _wait_for_instruction_subscriber(self) -> None:
        """A policy node that is not listening yet would miss the episode's instruction."""
        if not self.params["publish_instruction"]:
            return
        deadline = time.monotonic() + float(self.params["wait_for_subscribers_s"])
        while (self.instruction_publisher.get_subscription_count() == 0
               and time.monotonic() < deadline and not self._stop.is_set()):
            self._stop.wait(0.05)

    def _step(self) -> None:
        """One simulator step; the expert acts and success is judged once per control period."""
        backend = self.backend
        at_control = self._substeps_done % self._substeps == 0
        if at_control and self._expert is not None:
            self._expert_act()
        with self._lock:
            target = self.follower.advance(self._sim_time + backend.sim_dt)
        backend.step(target)
        with self._lock:
            self._sim_time += backend.sim_dt
            self._substeps_done += 1
        counter = self._substeps_done
        self._publish_observation(cameras=counter % self._camera_every == 0)
        if counter % self._substeps == 0:
            with self._lock:
                now = self._sim_time
                commanded = self.follower.sample(now)
            self._motion.sample(now, commanded, backend.joint_state()[0])
            self._steps += 1
            success = bool(backend.success())
            self.success_publisher.publish(Bool(data=success))
            if ((success and not backend.judge_at_end)
                    or self._steps >= self._episode.max_steps):
                self._end_episode(success)

    def _expert_act(self) -> None:
        emb = self.embodiment
        q, _ = self.backend.joint_state()
        action = np.asarray(self._expert.act(), dtype=np.float64)
        try:
            targets = emb.actions.decode(action[None], q)
        except Exception as error:  # noqa: BLE001 - log and let the robot hold
            self.get_logger().warning(f"expert action not executable: {error}",
                                      throttle_duration_sec=2.0)
            return
        for topic, message in controller_trajectories(emb, targets, emb.dt):
            self.expert_publishers[topic].publish(message)

    def _end_episode(self, success: bool, error: str = "") -> None:
        with self._lock:
            if self._episode is None:
                return
            self._publish_event("end", success=success, error=error)
            self.episodes.append(self._event("end", success, error))
            self._episode = None
            self._expert = None
            request = self._reset_request
            if self.params["auto_reset"] and request is None:
                self._reset_request = (None, None)
        self.get_logger().info(f"episode {self._episode_index} ended: "
                               f"{'success' if success else 'failure'} after {self._steps} "
                               "steps")

    def _event(self, event: str, success: bool, error: str = "") -> dict:
        ep = self._episode
        return {"event": event, "episode": self._episode_index, "task": ep.task,
                "seed": ep.seed, "instruction": ep.instruction, "success": success,
                "steps": self._steps, "trajectories": self._trajectories,
                "sim_time": round(self._sim_time, 6),
                "info": jsonable(ep.info),
                "outcome": jsonable(self.backend.outcome()) if event == "end" else {},
                "final_state": ([round(float(v), 5) for v in self.backend.joint_state()[0]]
                                if event == "end" else []),
                "motion": self._motion.metrics() if event == "end" else {},
                "error": error}

    def _publish_event(self, event: str, success: bool, error: str = "") -> None:
        self.episode_publisher.publish(String(data=json.dumps(self._event(event, success,
                                                                          error))))

    def _publish_observation(self, cameras: bool) -> None:
        stamp = rclpy.time.Time(seconds=self._sim_time).to_msg() if self.params[
            "publish_clock"] else self.get_clock().now().to_msg()
        if self.clock_publisher is not None:
            self.clock_publisher.publish(Clock(clock=stamp))
        q, v = self.backend.joint_state()
        msg = JointState(name=list(self.embodiment.joint_names), position=q.tolist(),
                         velocity=v.tolist())
        msg.header.stamp = stamp
        self.joint_publisher.publish(msg)
        if cameras:
            frames = self.backend.render()
            for publisher, frame, name in zip(self.image_publishers, frames,
                                              self.backend.camera_names, strict=True):
                publisher.publish(rgb_to_image(frame, stamp=stamp, frame_id=name))

    def destroy_node(self) -> None:
        """Stop and join the simulation thread, then close the simulator."""
        self._stop.set()
        self._thread.join(timeout=10.0)
        if not self._thread.is_alive():  # a simulator step in progress is never torn down
            self.backend.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Entry point of `ros2 run twinbrain_ros sim_bridge`."""
    return run_node(SimBridge, "sim_bridge", args, (ValueError, SimError, ImportError))


if __name__ == "__main__":
    raise SystemExit(main())
