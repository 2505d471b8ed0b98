"""The robot side of the ROS and process tests, written once.

- `RobotSide`: the test's own rclpy node. It is the robot (camera frames, joint states, the
  instruction) and records what comes back (controller, gripper and dry-run trajectories, the
  policy node's `/diagnostics`, any topic asked for). Its executor runs in the test's thread:
  a wait spins it (feeding the robot's inputs when asked) until a condition holds.
- `NodeProcess`, `policy_node_process`, `ServerProcess`: a node or the policy server in its own
  process group, its output in a log file, stopped as `ros2 launch` stops it (one SIGINT).
- `in_process_policy_node`: a `PolicyNode` built around a given runtime, spun by the robot's
  executor (for faults injected into the model).
- `waiting.wait_until` (re-exported here): a wait with nothing to spin (a log line, a thread).

Every wait is a condition with a timeout. A wait that times out, or whose watched process
dies, fails with what it waited for, the last value it saw and the tail of every watched log.
Diagnostics are read by the names in `twinbrain_ros.ros.diagnostic_keys`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from waiting import failure_report, log_tail, wait_until

from twinbrain_ros.robot.embodiment import Embodiment, config_dir
from twinbrain_ros.ros import diagnostic_keys as keys

INSTRUCTION = "pick up the red cup"


# -- processes -------------------------------------------------------------------------------


class NodeProcess:
    """`python -m MODULE ARGS` in its own process group, output to `log`; a context manager.

    With `module=None`, `python ARGS` (a script, or `-c CODE`).
    """

    def __init__(self, log: Path, module: str | None, args: list[str], env: dict | None = None,
                 name: str | None = None, cwd: Path | None = None):
        self.log = Path(log)
        self.name = name or (module or "python").rsplit(".", 1)[-1]
        self.ended_on_purpose = False  # stopped, signalled or killed by the test
        self._handle = open(self.log, "a")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, *(["-m", module] if module else []), *args]
        self.proc = subprocess.Popen(command, cwd=cwd,
                                     stdout=self._handle, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     env=dict(os.environ) if env is None else env)

    @property
    def pid(self) -> int:
        """The process id (and process group id)."""
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit code, None while running."""
        return self.proc.poll()

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def text(self) -> str:
        """Everything the process has written so far."""
        return self.log.read_text(errors="replace")

    def wait_for_text(self, text: str, timeout: float, since: int = 0) -> int:
        """Wait until `text` appears in the log (after character `since`); its position."""
        def found():
            position = self.text().find(text, since)
            return position + 1 if position >= 0 else 0
        return wait_until(found, timeout, f"{text!r} in {self.name}'s log",
                          show=lambda: log_tail(self.log, 300), watch=[self]) - 1

    def signal(self, signum: int = signal.SIGINT) -> None:
        """Send `signum` to the whole process group, as a terminal's Ctrl-C does."""
        self.ended_on_purpose = True
        if self.alive():
            os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float) -> int:
        """Wait for the process to end by itself; its exit code."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise AssertionError(failure_report(
                f"{self.name} still running {timeout:g} s later", None, [self])) from error

    def stop(self, timeout: float = 20.0) -> int:
        """One SIGINT to the process group (how ros2 run/launch stop), SIGKILL if it hangs."""
        self.ended_on_purpose = True
        code = stop_process_group(self.proc, timeout)
        if not self._handle.closed:
            self._handle.close()
        return code

    def kill(self) -> None:
        """SIGKILL the process group (a crash)."""
        self.ended_on_purpose = True
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_process_group(proc: subprocess.Popen, timeout: float) -> int:
    """One SIGINT to the process group, SIGKILL if it is still running `timeout` s later."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def policy_node_process(log: Path, embodiment: str, *, env: dict | None = None,
                        **params) -> NodeProcess:
    """The policy node with the embodiment's params file, on the CPU, plus `params`.

    Inputs count as fresh for 2 s (a loaded test machine delays messages) and the diagnostics
    come twice a second. A `checkpoint=` or a `server=` is expected among `params`.
    """
    params = {"device": "cpu", "max_input_age_s": 2.0, "diagnostics_period_s": 0.5, **params}
    args = ["--ros-args", "--params-file", str(config_dir() / f"{embodiment}.yaml")]
    for key, value in params.items():
        args += ["-p", f"{key}:={value}"]
    return NodeProcess(log, "twinbrain_ros.ros.policy_node", args, env=env)


class ServerProcess(NodeProcess):
    """`python -m twinbrain_ros.serving.server` on a free (or given) loopback port, ready."""

    READY = "policy server on ws://127.0.0.1:"

    def __init__(self, checkpoint: Path, log: Path, port: int = 0, *extra: str,
                 timeout: float = 120.0):
        since = len(log_tail(log, 10**9))  # a restarted server appends to the same log
        super().__init__(log, "twinbrain_ros.serving.server",
                         ["--checkpoint", str(checkpoint), "--device", "cpu", "--port",
                          str(port), *extra], name="policy_server")
        at = self.wait_for_text(self.READY, timeout, since) + len(self.READY)
        self.port = int(self.text()[at:].split()[0])
        self.address = f"127.0.0.1:{self.port}"


# -- the robot -------------------------------------------------------------------------------


DEFAULT_STATE = {"widowx": [0.0, 0.1, -0.2, 0.0, 0.4, 0.0, 0.03]}


def camera_frame(seed: int = 0, height: int = 48, width: int = 64) -> np.ndarray:
    """A deterministic random RGB frame."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


class Diagnostics(dict):
    """The policy node's status values, by `diagnostic_keys` name, with its level and message."""

    def __init__(self, status=None):
        super().__init__({kv.key: kv.value for kv in status.values} if status else {})
        self.level = status.level if status else None
        self.message = status.message if status else ""

    def number(self, key: str, default: float = 0.0) -> float:
        """A numeric value (`default` when absent)."""
        return float(self.get(key, default))


class RobotSide:
    """The robot's inputs to the policy node and recorders of everything it sends."""

    def __init__(self, embodiment: str | Embodiment, *, name: str = "robot_side", context=None,
                 frame: np.ndarray | None = None, watch=()):
        """A node in `context` (the default context, initialised here, when None).

        Args:
            embodiment: the robot (a name in config/ or an `Embodiment`).
            name: the node's name.
            context: an initialised rclpy context to use (its owner shuts it down).
            frame: the camera frame every camera publishes (default: `camera_frame(0)`).
            watch: processes whose death ends a wait and whose logs a failure shows.
        """
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        self.rclpy = rclpy
        self.Image, self.JointState, self.String = Image, JointState, String
        self.emb = emb = (embodiment if isinstance(embodiment, Embodiment)
                          else Embodiment.load(embodiment))
        self._owns_context = context is None
        if context is None:
            rclpy.init()
            context = rclpy.get_default_context()
        self.context = context
        self.node = rclpy.create_node(name, context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._guests = []  # in-process nodes this executor spins (destroyed in close())
        self.watched = list(watch)
        self.controller = self.listen(JointTrajectory, emb.trajectory_topic)
        self.gripper = (self.listen(JointTrajectory, emb.gripper_topic)
                        if emb.gripper_topic and emb.gripper_topic != emb.trajectory_topic
                        else [])
        self.dry_run = self.listen(JointTrajectory, emb.dry_run_topic)
        self.diagnostics: list[Diagnostics] = []
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 50)
        self.image_pubs = [self.node.create_publisher(Image, topic, 10)
                           for topic in emb.image_topics]
        self.joint_pub = self.node.create_publisher(JointState, emb.joint_state_topic, 10)
        self.text_pub = self.node.create_publisher(String, emb.instruction_topic, 10)
        state = DEFAULT_STATE.get(emb.name, np.linspace(-0.3, 0.3, emb.state_dim))
        self.state = np.clip(np.asarray(state, dtype=np.float64), emb.lower, emb.upper)
        self.frame = camera_frame(0) if frame is None else frame
        self.instruction = INSTRUCTION
        self._fed_at = -1e9

    # -- recording -----------------------------------------------------------------------------

    def listen(self, message_type, topic: str, qos=50, convert=None) -> list:
        """Record every message on `topic` (through `convert` when given) in the returned list."""
        received: list = []
        self.node.create_subscription(
            message_type, topic,
            received.append if convert is None else lambda m: received.append(convert(m)), qos)
        return received

    def _on_diagnostics(self, array) -> None:
        for status in array.status:
            if status.name == keys.STATUS_NAME:
                self.diagnostics.append(Diagnostics(status))

    def values(self) -> Diagnostics:
        """The policy node's newest diagnostics (empty before the first)."""
        return self.diagnostics[-1] if self.diagnostics else Diagnostics()

    # -- inputs --------------------------------------------------------------------------------

    def stamp(self):
        """Now on the robot's clock, as a message stamp."""
        return self.node.get_clock().now().to_msg()

    def image(self, height: int | None = None, width: int | None = None,
              encoding: str = "rgb8", step: int | None = None, data: bytes | None = None):
        """A camera Image: the robot's frame (resized by repetition to any other size)."""
        frame = self.frame
        if height is not None or width is not None:
            rows = np.resize(np.arange(frame.shape[0]), height or frame.shape[0])
            cols = np.resize(np.arange(frame.shape[1]), width or frame.shape[1])
            frame = frame[rows][:, cols]
        msg = self.Image(height=frame.shape[0], width=frame.shape[1], encoding=encoding)
        msg.header.stamp = self.stamp()
        msg.step = frame.shape[1] * 3 if step is None else step
        msg.data = data if data is not None else (
            frame.tobytes() if msg.step == frame.shape[1] * 3
            else bytes(msg.step * frame.shape[0]))
        return msg

    def joints(self, positions=None, names=None):
        """A JointState as a real robot publishes it: an extra joint, the order reversed."""
        names = list(self.emb.joint_names if names is None else names)
        values = [float(v) for v in (self.state if positions is None else positions)]
        msg = self.JointState(name=["head_yaw"] + names[::-1],
                              position=[0.0] + values[::-1])
        msg.header.stamp = self.stamp()
        return msg

    def publish(self, image=True, joints=True, text=True) -> None:
        """Publish the robot's inputs: True the current ones, None/False none, else this one.

        `image` may be an Image, `joints` a JointState or positions, `text` a string.
        """
        if image is not None and image is not False:
            msg = self.image() if image is True else image
            for publisher in self.image_pubs:
                publisher.publish(msg)
        if joints is not None and joints is not False:
            if joints is True:
                joints = self.joints()
            elif not isinstance(joints, self.JointState):
                joints = self.joints(joints)
            self.joint_pub.publish(joints)
        if text is not None and text is not False:
            self.text_pub.publish(self.String(data=self.instruction if text is True else text))

    # -- waiting -------------------------------------------------------------------------------

    def spin_once(self, timeout: float = 0.05) -> None:
        """Run the callbacks that are ready (waiting up to `timeout` for one)."""
        self.executor.spin_once(timeout_sec=timeout)

    def _step(self, feed, period: float = 0.05) -> Callable[[], None]:
        """One round of a wait: feed the inputs (at most every `period` s), spin."""
        def step():
            now = time.monotonic()
            if feed and now - self._fed_at >= period:
                self._fed_at = now
                if callable(feed):
                    feed()
                elif isinstance(feed, dict):
                    self.publish(**feed)
                else:
                    self.publish()
            self.spin_once(max(0.0, min(period, self._fed_at + period - time.monotonic())))
        return step

    def spin_until(self, condition: Callable[[], object], timeout: float, what: str = "",
                   feed=False, show: Callable[[], object] | None = None) -> object:
        """Spin until `condition()`; fail after `timeout` s or when a watched process dies.

        Args:
            condition: what is waited for; its truthy value is returned.
            timeout: seconds before the wait fails.
            what: words for the failure message.
            feed: publish inputs every 50 ms while waiting: True the robot's current inputs, a
                dict of `publish` arguments, or a callable; False publishes nothing.
            show: the value to report on failure (default: `summary()`).
        """
        return wait_until(condition, timeout, what or "the condition", step=self._step(feed),
                          show=show or self.summary, watch=self.watched)

    def spin_for(self, seconds: float, feed=False) -> None:
        """Spin (and feed) for a fixed time: an observation window for what must NOT happen."""
        step, end = self._step(feed), time.monotonic() + seconds
        while time.monotonic() < end:
            step()
            dead = [p for p in self.watched if not p.alive() and not p.ended_on_purpose]
            assert not dead, failure_report(f"{dead[0].name} exited", self.summary(),
                                            self.watched)

    def summary(self) -> dict:
        """What the robot has received so far (a wait's failure shows it)."""
        return {"controller": len(self.controller), "gripper": len(self.gripper),
                "dry_run": len(self.dry_run), "diagnostics": len(self.diagnostics),
                "last diagnostics": {**self.values(), "_level": self.values().level,
                                     "_message": self.values().message}}

    def watch(self, process):
        """Watch `process` in every wait (see `wait_until`); returns it."""
        self.watched.append(process)
        return process

    def add_node(self, node) -> None:
        """Spin another node of this context in the robot's executor (destroyed at close)."""
        self._guests.append(node)
        self.executor.add_node(node)

    def remove_node(self, node) -> None:
        """Stop spinning an in-process node and destroy it (its worker ends, files close)."""
        self._guests.remove(node)
        self.executor.remove_node(node)
        node.destroy_node()

    def close(self) -> None:
        """Destroy the nodes; shut the context down if it was made here. Idempotent."""
        if self.node is None:
            return
        for node in reversed(list(self._guests)):
            self.remove_node(node)
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.node = None
        if self._owns_context:
            self.rclpy.try_shutdown()  # no context given: the next init gets a fresh default


def in_process_policy_node(robot: RobotSide, runtime, **overrides):
    """A `PolicyNode` around `runtime`, with the robot's params file, spun by its executor.

    Actuated, inputs fresh for 1 s and diagnostics every 0.2 s unless `overrides` say otherwise.
    """
    import yaml
    from rclpy.parameter import Parameter

    from twinbrain_ros.ros.policy_node import PolicyNode

    params = yaml.safe_load((config_dir() / f"{robot.emb.name}.yaml").read_text())
    params = {**params["policy_node"]["ros__parameters"], "enable_actuation": True,
              "checkpoint": "in-process", "max_input_age_s": 1.0,
              "diagnostics_period_s": 0.2, **overrides}
    node = PolicyNode(runtime=runtime, context=robot.context, parameter_overrides=[
        Parameter(k, value=v) for k, v in params.items()])
    robot.add_node(node)
    return node


def positions(trajectory) -> np.ndarray:
    """A JointTrajectory's positions, one row per point."""
    return np.array([p.positions for p in trajectory.points])


def times(trajectory) -> np.ndarray:
    """A JointTrajectory's time_from_start of each point, in seconds."""
    return np.array([p.time_from_start.sec + p.time_from_start.nanosec * 1e-9
                     for p in trajectory.points])


def is_hold(trajectory) -> bool:
    """A hold: one point, at rest."""
    return len(trajectory.points) == 1 and not any(trajectory.points[0].velocities)
