r"""Fuzz the policy node: malformed and extreme messages mixed with a live robot, then check it.

The node runs in its own process (`python -m twinbrain_ros.ros.policy_node`, tiny random-weight
checkpoint, CPU, actuation on). This process is the robot: a simulated arm that follows the
trajectories the node sends (a `TrajectoryFollower` with the embodiment's velocity limits)
publishes its joint states at 50 Hz, a camera publishes at 10 Hz, and an operator publishes the
instruction. Between them, a stream of malformed and extreme messages of every class below goes
to the same topics:

- images: unknown encodings (random names), rows shorter than the width, data of the wrong
  length, empty and 3000x2000 frames, sizes changing from 1x1 up;
- joint states: missing, duplicated and extra joints, names and positions of different
  lengths, NaN, +-inf, 1e30, values past float32, zero and far-off stamps;
- instructions: empty and blank, the prompt's special tokens, control characters, 100 KB and
  1 MB texts.

Checked at the end (the figures are printed as JSON):
- the node process is alive and its worker never died (`/diagnostics`);
- no trajectory point left the joint limits; the first point of every trajectory was within
  one `max_joint_step` of a joint state the robot published shortly before it arrived (within
  the node's `max_input_age_s`, plus 0.5 s for transport on a loaded machine);
- after the last malformed message, valid input gets a trajectory within 1 s;
- `/diagnostics` stayed bounded (number of keys, bytes per message);
- the node's memory (RSS) at the start and the end.

Usage:
  python benchmarks/fuzz_policy_node.py --embodiment gr1 --messages 10000
  python benchmarks/fuzz_policy_node.py --embodiment widowx --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from twinbrain_ros.ros import diagnostic_keys as keys  # noqa: E402

MAX_INPUT_AGE_S = 1.0       # the node's max_input_age_s
TRANSPORT_MARGIN_S = 0.5    # how late a joint state may arrive at the node
CONTROL_CHARACTERS = "".join(chr(c) for c in range(32) if chr(c) not in "\n\t")


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


class Robot:
    """The robot side: publishers, the simulated arm and every check on what comes back."""

    def __init__(self, embodiment, rng: np.random.Generator):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        from twinbrain_ros.sim.follower import TrajectoryFollower

        self.rclpy, self.Image, self.JointState, self.String = rclpy, Image, JointState, String
        self.emb, self.rng = embodiment, rng
        self.node = rclpy.create_node("fuzzing_robot")
        emb = embodiment
        self.image_pub = self.node.create_publisher(Image, emb.image_topics[0], 10)
        self.joint_pub = self.node.create_publisher(JointState, emb.joint_state_topic, 10)
        self.text_pub = self.node.create_publisher(String, emb.instruction_topic, 10)
        topics = [emb.trajectory_topic] + ([emb.gripper_topic] if emb.gripper_topic else [])
        for topic in topics:
            self.node.create_subscription(JointTrajectory, topic, self._on_trajectory, 50)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        start = np.clip(0.5 * (emb.lower + emb.upper) + 0.1 * (emb.upper - emb.lower)
                        * np.sin(np.arange(emb.state_dim)), emb.lower, emb.upper)
        self.follower = TrajectoryFollower(emb.joint_names, emb.lower, emb.upper, start,
                                           max_velocity=emb.max_velocity)
        self.t0 = time.monotonic()
        self.follower.reset(start, now=0.0)
        self.state = start.copy()
        self.published: list[tuple[float, np.ndarray]] = []  # (time, state) of valid states
        self.trajectories = 0
        self.points = 0
        self.limit_violations = 0
        self.step_violations = 0
        self.worst_first_step = 0.0   # in units of max_joint_step
        self.last_trajectory = -1.0
        self.diagnostics_keys = 0
        self.diagnostics_bytes = 0
        self.last_diagnostics: dict[str, str] = {}
        self.frame = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)

    def now(self) -> float:
        """Seconds since the robot started."""
        return time.monotonic() - self.t0

    # -- what comes back -----------------------------------------------------------------------

    def _on_trajectory(self, msg) -> None:
        emb = self.emb
        index = [emb.joint_names.index(n) for n in msg.joint_names]
        positions = np.array([p.positions for p in msg.points], dtype=np.float64)
        if positions.size == 0:
            return
        positions = positions.reshape(len(msg.points), len(index))
        self.trajectories += 1
        self.points += len(positions)
        self.last_trajectory = self.now()
        lower, upper, step = emb.lower[index], emb.upper[index], emb.max_step[index]
        if np.any(positions < lower - 1e-9) or np.any(positions > upper + 1e-9):
            self.limit_violations += 1
        # The node starts from the newest joint state it had after inference, and uses none
        # older than max_input_age_s after its receipt: one of those published in that window
        # (plus the time a message may take to arrive on a busy machine).
        window = MAX_INPUT_AGE_S + TRANSPORT_MARGIN_S
        recent = [s[index] for t, s in self.published if t >= self.now() - window] or \
            [self.state[index]]
        first = min(float(np.max(np.abs(positions[0] - s) / step)) for s in recent)
        self.worst_first_step = max(self.worst_first_step, first)
        if first > 1.0 + 1e-6:
            self.step_violations += 1
        times = np.array([p.time_from_start.sec + 1e-9 * p.time_from_start.nanosec
                          for p in msg.points])
        try:
            self.follower.receive(list(msg.joint_names), times, positions, self.now(),
                                  self.now())
        except ValueError:
            pass

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            if status.name != keys.STATUS_NAME:
                continue
            values = {kv.key: kv.value for kv in status.values}
            self.last_diagnostics = values
            self.diagnostics_keys = max(self.diagnostics_keys, len(values))
            size = sum(len(k) + len(v) for k, v in values.items()) + len(status.message)
            self.diagnostics_bytes = max(self.diagnostics_bytes, size)

    # -- valid input ---------------------------------------------------------------------------

    def _stamp(self):
        return self.node.get_clock().now().to_msg()

    def image(self, height=64, width=80, encoding="rgb8", step=None, data=None, stamp=None):
        """An Image message (valid unless told otherwise)."""
        msg = self.Image(height=int(height), width=int(width), encoding=encoding)
        msg.header.stamp = stamp if stamp is not None else self._stamp()
        channels = 3
        msg.step = int(step if step is not None else width * channels)
        if data is None:
            if (height, width) == self.frame.shape[:2] and msg.step == width * 3:
                data = self.frame.tobytes()
            else:
                data = bytes(msg.step * height)
        msg.data = data
        return msg

    def joints(self, names=None, positions=None, stamp=None):
        """A JointState message of the robot (or of the given names and positions)."""
        msg = self.JointState()
        msg.header.stamp = stamp if stamp is not None else self._stamp()
        msg.name = list(self.emb.joint_names if names is None else names)
        values = self.state if positions is None else positions
        msg.position = [float(v) for v in values]
        return msg

    def publish_valid_state(self) -> None:
        """Advance the simulated arm and publish its joint state."""
        self.state = self.follower.advance(self.now())
        self.published.append((self.now(), self.state.copy()))
        keep = MAX_INPUT_AGE_S + TRANSPORT_MARGIN_S
        self.published = [p for p in self.published if p[0] >= self.now() - keep]
        self.joint_pub.publish(self.joints())

    def publish_valid_image(self) -> None:
        """Publish a valid camera frame."""
        self.image_pub.publish(self.image())

    def publish_instruction(self, text="pick up the red cube") -> None:
        """Publish a valid instruction."""
        self.text_pub.publish(self.String(data=text))

    # -- malformed and extreme input -----------------------------------------------------------

    def bad_message(self) -> tuple[str, callable]:
        """One malformed message: (class name, publish function)."""
        rng, emb = self.rng, self.emb
        names = list(emb.joint_names)

        def random_name():
            return "".join(chr(c) for c in rng.integers(33, 127, rng.integers(1, 40)))

        def joints_with(value):
            q = self.state.copy()
            q[rng.integers(len(q))] = value
            return self.joints(positions=q)

        cases = {
            "image_bad_encoding": lambda: self.image(encoding=random_name()),
            "image_short_step": lambda: self.image(step=10),
            "image_wrong_length": lambda: self.image(data=bytes(100)),
            "image_empty": lambda: self.image(0, 0, data=b""),
            "image_huge": lambda: self.image(2000, 3000),
            "image_size_change": lambda: self.image(*rng.integers(1, 300, 2)),
            "image_far_stamp": lambda: self.image(stamp=_time_msg(rng.choice([0, 1, 4e9]))),
            "joints_missing": lambda: self.joints(names[:-1], self.state[:-1]),
            "joints_duplicate": lambda: self.joints(names + names[:1],
                                                    list(self.state) + [123.0]),
            "joints_length_mismatch": lambda: self.joints(names, list(self.state) + [0.0]),
            "joints_extra": lambda: self.joints(names + [random_name()],
                                                list(self.state) + [float(rng.normal())]),
            "joints_nan": lambda: joints_with(float("nan")),
            "joints_inf": lambda: joints_with(float(rng.choice([np.inf, -np.inf]))),
            "joints_1e30": lambda: joints_with(float(rng.choice([1e30, -1e30]))),
            "joints_past_float32": lambda: joints_with(3.5e38 * float(rng.choice([1, -1]))),
            "joints_out_of_range": lambda: joints_with(float(emb.upper.max() + 10.0)),
            "joints_far_stamp": lambda: self.joints(stamp=_time_msg(rng.choice([0, 1, 4e9]))),
            "instruction_empty": lambda: self.String(data=""),
            "instruction_blank": lambda: self.String(data=" \t\n "),
            "instruction_special_tokens": lambda: self.String(
                data=f"pick {rng.choice(['<|image_pad|>', '<|im_end|>', '<|vision_start|>'])}"),
            "instruction_control_characters": lambda: self.String(
                data="pick" + "".join(rng.choice(list(CONTROL_CHARACTERS), 5))),
            "instruction_100kb": lambda: self.String(data="pick up the cube " * 6000),
            "instruction_1mb": lambda: self.String(data="x" * 1_000_000),
        }
        kind = str(rng.choice(sorted(cases)))
        message = cases[kind]()
        publisher = (self.image_pub if kind.startswith("image") else
                     self.joint_pub if kind.startswith("joints") else self.text_pub)
        return kind, lambda: publisher.publish(message)

    def spin(self, seconds: float) -> None:
        """Process callbacks for `seconds`."""
        end = time.monotonic() + seconds
        while True:
            self.rclpy.spin_once(self.node, timeout_sec=max(0.0, min(0.002,
                                                                    end - time.monotonic())))
            if time.monotonic() >= end:
                return


def _time_msg(seconds: float):
    from builtin_interfaces.msg import Time

    return Time(sec=int(seconds), nanosec=0)


def run_fuzz(embodiment_name: str, checkpoint: str, log_path: Path, seconds: float = 60.0,
             messages: int | None = None, seed: int = 0, malformed_per_cycle: int = 5) -> dict:
    """Run the node under fuzz; returns the figures (see the module docstring)."""
    import rclpy

    from twinbrain_ros.robot.embodiment import Embodiment, config_dir

    emb = Embodiment.load(embodiment_name)
    rng = np.random.default_rng(seed)
    command = [sys.executable, "-m", "twinbrain_ros.ros.policy_node", "--ros-args",
               "--params-file", str(config_dir() / f"{embodiment_name}.yaml"),
               "-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu",
               "-p", "enable_actuation:=true", "-p", f"max_input_age_s:={MAX_INPUT_AGE_S}",
               "-p", "max_sync_skew_s:=0.3", "-p", "diagnostics_period_s:=0.5"]
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    rclpy.init()
    robot = Robot(emb, rng)
    counts: dict[str, int] = {}
    result: dict = {"embodiment": embodiment_name}
    try:
        # Start-up: valid input until the first trajectory.
        deadline = time.monotonic() + 120.0
        while robot.trajectories == 0 and time.monotonic() < deadline and proc.poll() is None:
            robot.publish_valid_state()
            robot.publish_valid_image()
            robot.publish_instruction()
            robot.spin(0.02)
        if robot.trajectories == 0:
            raise RuntimeError(f"the node never planned:\n{log_path.read_text()[-3000:]}")
        rss_start = _rss_mb(proc.pid)
        start, sent, tick = time.monotonic(), 0, 0
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            if (messages is not None and sent >= messages) or \
                    (messages is None and elapsed >= seconds):
                break
            robot.publish_valid_state()
            if tick % 5 == 0:
                robot.publish_valid_image()
                robot.publish_instruction()
            for _ in range(malformed_per_cycle):
                kind, publish = robot.bad_message()
                publish()
                counts[kind] = counts.get(kind, 0) + 1
                sent += 1
            tick += 1
            robot.spin(0.02)
        fuzz_seconds = time.monotonic() - start
        # Recovery: valid input only, from the last malformed message on.
        last_bad = robot.now()
        before = robot.trajectories
        recovered = None
        while robot.now() - last_bad < 10.0 and proc.poll() is None:
            robot.publish_valid_state()
            robot.publish_valid_image()
            robot.publish_instruction()
            robot.spin(0.02)
            if robot.trajectories > before and recovered is None:
                recovered = robot.now() - last_bad
            if recovered is not None and robot.now() - last_bad > 3.0:
                break
        values = robot.last_diagnostics
        result.update({
            "alive": proc.poll() is None,
            "malformed_messages": sent, "by_class": counts,
            "fuzz_seconds": round(fuzz_seconds, 1),
            "trajectories": robot.trajectories, "points": robot.points,
            "limit_violations": robot.limit_violations,
            "first_point_step_violations": robot.step_violations,
            "worst_first_step_in_max_steps": round(robot.worst_first_step, 4),
            "recovery_s": None if recovered is None else round(recovered, 3),
            "worker_alive": values.get(keys.WORKER_ALIVE),
            "worker_restarts": int(values.get(keys.WORKER_RESTARTS, "-1")),
            "diagnostics_max_keys": robot.diagnostics_keys,
            "diagnostics_max_bytes": robot.diagnostics_bytes,
            "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(_rss_mb(proc.pid), 1),
        })
    finally:
        result["exit_code"] = _stop(proc)
        robot.node.destroy_node()
        rclpy.shutdown()
        log.close()
    result["tracebacks"] = log_path.read_text().count("Traceback")
    return result


def _stop(proc: subprocess.Popen) -> int | None:
    """Two SIGINTs, as a terminal's Ctrl-C under `ros2 launch` delivers them."""
    import signal

    if proc.poll() is None:
        for _ in range(2):
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.05)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def main(argv=None) -> int:
    """Fuzz one embodiment and print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embodiment", default="gr1", choices=["gr1", "widowx"])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--messages", type=int, default=None,
                        help="malformed messages to send (overrides --seconds)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 200)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

    from twinbrain_ros.model.tiny import make_tiny_checkpoint, make_tiny_policy_checkpoint
    from twinbrain_ros.robot.embodiment import Embodiment

    emb = Embodiment.load(args.embodiment)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("ROS_LOG_DIR", str(Path(tmp) / "ros_log"))
        backbone = make_tiny_checkpoint("qwen2_5_vl", Path(tmp) / "backbone")
        spec = emb.spec()
        checkpoint = make_tiny_policy_checkpoint(backbone, Path(tmp) / "policy",
                                                 emb.normalization_key, spec)
        result = run_fuzz(args.embodiment, str(checkpoint), Path(tmp) / "node.log",
                          seconds=args.seconds, messages=args.messages, seed=args.seed)
    print(json.dumps(result, indent=2))
    ok = (result["alive"] and result["limit_violations"] == 0
          and result["first_point_step_violations"] == 0 and result["worker_restarts"] == 0
          and result["recovery_s"] is not None and result["recovery_s"] <= 1.0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
