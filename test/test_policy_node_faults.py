"""Faults in the policy node: every failure holds the robot, nothing leaves the limits, the
worker keeps planning, the operator can stop it. In-process over real rclpy (Fast DDS)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import yaml
from conftest import save_policy_checkpoint

from twinbrain_ros.robot.embodiment import Embodiment, config_dir

pytestmark = [pytest.mark.ros, pytest.mark.slow]

GR1 = Embodiment.load("gr1")


class InjectedFault(Exception):
    """A failure of the model, raised on chosen calls."""


class WorkerKilled(BaseException):
    """Escapes `except Exception`: ends the worker thread itself."""


class FaultyRuntime:
    """A real PolicyRuntime whose `infer` raises on the calls numbered in `faults`."""

    def __init__(self, runtime, faults: dict[int, BaseException]):
        self.runtime, self.faults, self.calls = runtime, dict(faults), 0
        self.identity = runtime.identity

    def check_instruction(self, text, max_tokens):
        return self.runtime.check_instruction(text, max_tokens)

    def infer(self, observation):
        self.calls += 1
        fault = self.faults.pop(self.calls, None)
        if fault is not None:
            raise fault
        return self.runtime.infer(observation)


@pytest.fixture(scope="module")
def gr1_runtime(tiny_backbones, tmp_path_factory):
    from twinbrain_ros.policy.runtime import PolicyRuntime

    path = save_policy_checkpoint(tiny_backbones["qwen2_5_vl"],
                                  tmp_path_factory.mktemp("faults") / "gr1", GR1)
    return PolicyRuntime(str(path), GR1, device="cpu", seed=0)


class Harness:
    """A PolicyNode (GR1 params file) and the robot side, spun by one executor thread."""

    def __init__(self, runtime, **overrides):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.parameter import Parameter
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        from twinbrain_ros.ros.policy_node import PolicyNode

        self.rclpy, self.Image, self.JointState, self.String = rclpy, Image, JointState, String
        rclpy.init()
        params = yaml.safe_load((config_dir() / "gr1.yaml").read_text())
        params = {**params["policy_node"]["ros__parameters"], "enable_actuation": True,
                  "checkpoint": "in-process", "max_input_age_s": 1.0,
                  "diagnostics_period_s": 0.2, **overrides}
        self.policy = PolicyNode(runtime=runtime, parameter_overrides=[
            Parameter(k, value=v) for k, v in params.items()])
        self.node = rclpy.create_node("robot_side")
        self.controller, self.dry_run, self.diagnostics = [], [], []
        self.node.create_subscription(JointTrajectory, GR1.trajectory_topic,
                                      self.controller.append, 50)
        self.node.create_subscription(JointTrajectory, GR1.dry_run_topic,
                                      self.dry_run.append, 50)
        self.node.create_subscription(DiagnosticArray, "/diagnostics",
                                      self.diagnostics.append, 50)
        self.image_pub = self.node.create_publisher(Image, GR1.image_topics[0], 10)
        self.joint_pub = self.node.create_publisher(JointState, GR1.joint_state_topic, 10)
        self.text_pub = self.node.create_publisher(String, GR1.instruction_topic, 10)
        self.state = np.clip(np.linspace(-0.3, 0.3, GR1.state_dim), GR1.lower, GR1.upper)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.policy)
        self.executor.add_node(self.node)
        self.spin_error = None
        self._spinning = True
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self):
        try:
            while self._spinning and self.rclpy.ok():
                self.executor.spin_once(timeout_sec=0.05)
        except BaseException as error:  # noqa: BLE001 - a callback that raised ends the node
            self.spin_error = error

    def image(self, encoding="rgb8", height=48, width=64):
        msg = self.Image(height=height, width=width, encoding=encoding, step=width * 3)
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.data = bytes(msg.step * height)
        return msg

    def joints(self, positions=None):
        msg = self.JointState(name=list(GR1.joint_names))
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.position = [float(v) for v in (self.state if positions is None else positions)]
        return msg

    def publish(self, image=True, joints=True, text="pick up the red cup"):
        if image:
            self.image_pub.publish(image if not isinstance(image, bool) else self.image())
        if joints is not False:  # True: the robot's state; an array: those positions
            self.joint_pub.publish(self.joints(None if joints is True else joints))
        if text is not None:
            self.text_pub.publish(self.String(data=text))

    def run_until(self, condition, timeout, publish=True, **kwargs):
        end = time.monotonic() + timeout
        while time.monotonic() < end and not condition():
            assert self.spin_error is None, self.spin_error
            if publish:
                self.publish(**kwargs)
            time.sleep(0.03)
        return condition()

    def values(self) -> dict:
        for array in reversed(self.diagnostics):
            for status in array.status:
                if status.name == "twinbrain_ros: policy_node":
                    return {kv.key: kv.value for kv in status.values} | {
                        "_level": status.level, "_message": status.message}
        return {}

    def close(self):
        if not self._spinning:
            return
        self._spinning = False
        self.thread.join(timeout=10)
        self.policy.destroy_node()
        self.node.destroy_node()
        self.rclpy.shutdown()


@pytest.fixture
def harness_factory(ros_env):
    made = []

    def make(runtime, **overrides):
        made.append(Harness(runtime, **overrides))
        return made[-1]

    yield make
    for harness in made:
        harness.close()


def _positions(trajectory):
    return np.array([p.positions for p in trajectory.points])


def test_a_failed_cycle_holds_at_the_newest_measured_position_and_planning_resumes(
        harness_factory, gr1_runtime):
    runtime = FaultyRuntime(gr1_runtime, {3: InjectedFault("model exploded"),
                                          5: InjectedFault("again")})
    h = harness_factory(runtime)
    assert h.run_until(lambda: len(h.controller) >= 2, 60)
    # The robot moves (within one step per joint) before the failing cycle: the hold goes to
    # where it is now, not to the snapshot the failed cycle used or to the old plan.
    h.state = np.clip(h.state + 0.5 * GR1.max_step, GR1.lower, GR1.upper)
    assert h.run_until(lambda: runtime.calls >= 6 and len(h.controller) >= 6, 30)
    holds = [t for t in h.controller if len(t.points) == 1
             and not any(p.velocities and any(p.velocities) for p in t.points)]
    assert holds, "no hold was published"
    np.testing.assert_allclose(_positions(holds[0])[0], h.state, atol=1e-9)
    # Warnings (bad images) and errors (the model) from the same node: logging never kills it.
    for _ in range(5):
        h.publish(image=h.image(encoding="16UC1"), joints=False, text=None)
    assert h.run_until(lambda: int(h.values().get("rejected.unsupported_encoding", 0)) > 0, 10)
    count = len(h.controller)
    assert h.run_until(lambda: len(h.controller) >= count + 2, 20)
    values = h.values()
    assert int(values["rejected.inference_error"]) == 2
    assert "model exploded" in values["last_error"] or "again" in values["last_error"]
    assert values["worker_alive"] == "True" and values["worker_restarts"] == "0"
    assert int(values["holds_total"]) >= 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_watchdog_restarts_a_worker_that_died_and_reports_an_error(harness_factory,
                                                                        gr1_runtime):
    runtime = FaultyRuntime(gr1_runtime, {2: WorkerKilled()})
    h = harness_factory(runtime)
    assert h.run_until(lambda: h.values().get("worker_restarts") == "1", 60)
    values = h.values()
    from diagnostic_msgs.msg import DiagnosticStatus

    assert values["_level"] == DiagnosticStatus.ERROR
    assert "restarted" in values["_message"]
    count = len(h.controller)
    assert h.run_until(lambda: len(h.controller) >= count + 3, 30), "no plans after restart"
    assert h.policy._worker.is_alive()


def test_joint_states_far_outside_the_limits_are_refused_and_never_commanded(harness_factory,
                                                                            gr1_runtime):
    h = harness_factory(gr1_runtime)
    assert h.run_until(lambda: h.controller, 60)
    huge = h.state.copy()
    huge[3] = 1e30
    h.controller.clear()
    h.run_until(lambda: False, 1.5, joints=huge)
    assert int(h.values().get("rejected.joint_out_of_range", 0)) > 0
    for trajectory in h.controller:
        positions = _positions(trajectory)
        assert np.all(positions >= GR1.lower - 1e-9) and np.all(positions <= GR1.upper + 1e-9)
    # Slightly outside (less than one step): clipped into the limits and still usable.
    edge = h.state.copy()
    edge[1] = GR1.lower[1] - 0.5 * GR1.max_step[1]
    h.controller.clear()
    assert h.run_until(lambda: len(h.controller) >= 2, 20, joints=edge)
    for trajectory in h.controller:
        positions = _positions(trajectory)
        assert np.all(positions >= GR1.lower - 1e-9) and np.all(positions <= GR1.upper + 1e-9)
        assert np.all(np.abs(positions[0] - np.clip(edge, GR1.lower, GR1.upper))
                      <= GR1.max_step + 1e-9)


def test_the_first_point_is_within_one_step_of_where_the_robot_is(harness_factory, gr1_runtime):
    h = harness_factory(gr1_runtime)
    assert h.run_until(lambda: len(h.controller) >= 2, 60)
    # Pushed by hand far from the commanded plan: five steps on every joint, within limits.
    h.state = np.clip(h.state - 5 * GR1.max_step, GR1.lower, GR1.upper)
    h.controller.clear()
    assert h.run_until(lambda: len(h.controller) >= 3, 30)
    for trajectory in h.controller[1:]:
        positions = _positions(trajectory)
        assert np.all(np.abs(positions[0] - h.state) <= GR1.max_step + 1e-9)
        assert np.all(np.abs(np.diff(positions, axis=0)) <= GR1.max_step + 1e-9)


def test_hold_and_resume_services_and_actuation_switched_at_run_time(harness_factory,
                                                                      gr1_runtime):
    from rclpy.parameter import Parameter
    from std_srvs.srv import Trigger

    h = harness_factory(gr1_runtime)
    assert h.run_until(lambda: len(h.controller) >= 2, 60)
    hold = h.node.create_client(Trigger, "/policy_node/hold")
    resume = h.node.create_client(Trigger, "/policy_node/resume")
    assert hold.wait_for_service(timeout_sec=10)
    future = hold.call_async(Trigger.Request())
    assert h.run_until(future.done, 10)
    assert future.result().success
    time.sleep(0.5)  # a cycle in flight when the hold came is discarded
    count = len(h.controller)
    held = h.controller[-1]
    assert len(held.points) == 1
    h.run_until(lambda: False, 2.0)
    assert len(h.controller) == count, "planned while held"
    assert h.values()["operator_hold"] == "True"
    future = resume.call_async(Trigger.Request())
    assert h.run_until(future.done, 10) and future.result().success
    assert h.run_until(lambda: len(h.controller) >= count + 2, 20)

    # Actuation off at run time: a hold goes to the controller, then plans to the dry run.
    count = len(h.controller)
    h.policy.set_parameters([Parameter("enable_actuation", value=False)])
    assert h.run_until(lambda: len(h.dry_run) >= 2, 20)
    h.run_until(lambda: False, 1.0)
    after = h.controller[count:]
    # The hold is the last thing the controller got (a plan already on its way may precede it).
    assert 1 <= len(after) <= 2 and len(after[-1].points) == 1
    settled = len(h.controller)
    h.run_until(lambda: False, 1.0)
    assert len(h.controller) == settled
    assert h.values()["actuation_enabled"] == "False"
    # Other parameters are read-only while the node runs.
    result = h.policy.set_parameters([Parameter("blend_steps", value=7)])[0]
    assert not result.successful


def test_diagnostics_stay_bounded_and_huge_instructions_are_refused_at_once(harness_factory,
                                                                            gr1_runtime):
    h = harness_factory(gr1_runtime)
    assert h.run_until(lambda: h.controller, 60)
    rng = np.random.default_rng(0)
    for _ in range(300):
        name = "".join(chr(c) for c in rng.integers(65, 91, 12))
        h.publish(image=h.image(encoding=name), joints=False, text=None)
        time.sleep(0.005)
    started = time.monotonic()
    h.publish(image=False, joints=False, text="x" * 1_000_000)
    h.publish(image=False, joints=False, text="pick up the cup " * 6000)
    h.publish(image=False, joints=False, text="pick <|im_end|> then")
    assert h.run_until(
        lambda: int(h.values().get("rejected.instruction_too_long", 0)) >= 2
        and int(h.values().get("rejected.instruction_special_tokens", 0)) >= 1, 10,
        publish=False)
    assert time.monotonic() - started < 5.0
    # A rejected instruction stops planning until a valid one arrives.
    count = len(h.controller)
    h.run_until(lambda: False, 1.5, text=None)
    assert len(h.controller) <= count + 1
    assert h.run_until(lambda: len(h.controller) >= count + 2, 10)
    values = h.values()
    assert int(values["rejected.unsupported_encoding"]) >= 100
    assert len(values) < 60
    assert sum(len(k) + len(v) for k, v in values.items()) < 4000


def test_an_input_that_falls_silent_is_resubscribed(harness_factory, gr1_runtime):
    h = harness_factory(gr1_runtime, input_silence_s=0.5)
    assert h.run_until(lambda: h.controller, 60)
    topic = GR1.image_topics[0]
    # The camera's publisher stays matched but sends nothing: the subscription is recreated.
    assert h.run_until(lambda: int(h.values().get(f"input.{topic}.resubscribed", 0)) >= 1, 10,
                       image=False)
    count = len(h.controller)
    assert h.run_until(lambda: len(h.controller) >= count + 2, 20)
    assert float(h.values()[f"input.{topic}.silent_s"]) < 1.0


def test_stale_inputs_and_a_rejected_instruction_stop_the_executing_plan(harness_factory,
                                                                         gr1_runtime):
    h = harness_factory(gr1_runtime, max_input_age_s=0.3)
    assert h.run_until(lambda: len(h.controller) >= 2, 60)
    # The camera stops: within max_input_age_s the plan is replaced by one hold, then silence.
    count = len(h.controller)
    assert h.run_until(lambda: len(h.controller) > count and len(h.controller[-1].points) == 1,
                       5, image=False)
    np.testing.assert_allclose(_positions(h.controller[-1])[0], h.state, atol=1e-9)
    settled = len(h.controller)
    h.run_until(lambda: False, 1.0, image=False)
    assert len(h.controller) == settled
    assert int(h.values().get("rejected.held_on_unusable_inputs", 0)) >= 1
    # Planning again, then an instruction that is refused: the robot holds at once.
    assert h.run_until(lambda: len(h.controller) >= settled + 2, 20)
    count = len(h.controller)
    h.publish(image=False, joints=False, text="pick <|im_start|> up")
    assert h.run_until(lambda: len(h.controller) > count, 5, publish=False)
    assert len(h.controller[-1].points) == 1


def test_a_hung_cycle_is_reported_and_the_robot_holds(harness_factory, gr1_runtime):
    class Hangs:
        def __init__(self, runtime):
            self.runtime, self.calls, self.identity = runtime, 0, runtime.identity

        def check_instruction(self, text, max_tokens):
            return self.runtime.check_instruction(text, max_tokens)

        def infer(self, observation):
            self.calls += 1
            if self.calls == 3:
                time.sleep(4.0)  # a device call that does not return for a while
            return self.runtime.infer(observation)

    h = harness_factory(Hangs(gr1_runtime), stall_timeout_s=1.5)
    assert h.run_until(lambda: len(h.controller) >= 2, 60)
    from diagnostic_msgs.msg import DiagnosticStatus

    assert h.run_until(lambda: "stalled" in h.values().get("_message", ""), 10)
    assert h.values()["_level"] == DiagnosticStatus.ERROR
    assert len(h.controller[-1].points) == 1  # the hold
    # The late chunk of the hung cycle is discarded; planning resumes and the error clears.
    assert h.run_until(lambda: "stalled" not in h.values().get("_message", ""), 15)
    count = len(h.controller)
    assert h.run_until(lambda: len(h.controller) >= count + 2, 20)
    assert int(h.values().get("rejected.discarded_after_hold", 0)) >= 1


def test_callbacks_never_raise_and_causes_stay_bounded(harness_factory, gr1_runtime):
    from twinbrain_ros.ros.policy_node import MAX_CAUSES

    h = harness_factory(gr1_runtime)
    assert h.run_until(lambda: h.controller, 60)
    h.policy._on_image("/camera/image_raw", object())  # not an Image at all
    assert h.policy.rejected["callback_error"] == 1
    for k in range(3 * MAX_CAUSES):
        h.policy._reject(f"synthetic_{k}", "a made-up cause")
    assert len(h.policy.rejected) <= MAX_CAUSES + 1 and h.policy.rejected["other"] > 0
    assert h.run_until(lambda: len(h.values()) > 0 and sum(
        1 for key in h.values() if key.startswith("rejected.")) <= MAX_CAUSES + 1, 5)
    count = len(h.controller)
    assert h.run_until(lambda: len(h.controller) >= count + 2, 20)


def test_parameters_carry_types_ranges_descriptions_and_read_only_flags(harness_factory,
                                                                        gr1_runtime):
    from rclpy.parameter import Parameter

    h = harness_factory(gr1_runtime)
    blend, joints, actuation = h.policy.describe_parameters(
        ["blend_steps", "joint_names", "enable_actuation"])
    assert blend.read_only and blend.integer_range[0].to_value == 64
    assert joints.read_only and "model order" in joints.description
    assert not actuation.read_only
    result = h.policy.set_parameters([Parameter("enable_actuation", value="yes")])[0]
    assert not result.successful


def test_an_out_of_range_parameter_is_refused_at_start(ros_env, tmp_path, tiny_backbones):
    import os
    import subprocess
    import sys

    checkpoint = save_policy_checkpoint(tiny_backbones["qwen2_5_vl"], tmp_path / "gr1", GR1)
    proc = subprocess.run(
        [sys.executable, "-m", "twinbrain_ros.ros.policy_node", "--ros-args", "--params-file",
         str(config_dir() / "gr1.yaml"), "-p", f"checkpoint:={checkpoint}",
         "-p", "actions_per_inference:=0"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "actions_per_inference" in text and "Traceback" not in text


def test_rtc_node_waits_the_inference_delay_and_records_each_instruction(harness_factory,
                                                                         gr1_runtime, tmp_path):
    pytest.importorskip("rerun", reason="recordings need rerun-sdk")
    from rerun.chunk import RrdReader

    class PrefixLog:
        """The real runtime, noting the prefix of every chunk."""

        def __init__(self, runtime):
            self.runtime, self.prefixes = runtime, []
            self.identity, self.horizon = runtime.identity, runtime.horizon

        def check_instruction(self, text, max_tokens):
            return self.runtime.check_instruction(text, max_tokens)

        def infer(self, observation, prefix=None):
            self.prefixes.append(prefix)
            return self.runtime.infer(observation, prefix=prefix)

    record = tmp_path / "recordings"
    runtime = PrefixLog(gr1_runtime)
    # Replanning every 4 of the 8 actions leaves an overlap to inpaint.
    h = harness_factory(runtime, chunk_transition="rtc", inference_delay_s=0.2,
                        actions_per_inference=4, record_path=str(record))

    def following():
        # The robot follows its commands: where the newest trajectory starts.
        if h.controller:
            h.state = np.array(h.controller[-1].points[0].positions)
        return sum(p is not None for p in runtime.prefixes) >= 2

    assert h.run_until(following, 60)
    guided = [p for p in runtime.prefixes if p is not None]
    # 0.2 s of delay at 20 Hz: at least four actions execute while the model runs, all of the
    # overlap when it is shorter.
    assert all(p.frozen >= min(4, len(p.actions)) and p.frozen >= 1 for p in guided)
    assert h.run_until(lambda: "rtc_expected_latency_s" in h.values(), 10)
    cycles = list(h.policy.cycles)
    assert cycles and all(c["published"] - c["started"] >= 0.2 for c in cycles)
    values = h.values()
    assert values["chunk_transition"] == "rtc"
    assert float(values["rtc_expected_latency_s"]) >= 0.2
    assert "plan_left_total" in values
    # A new instruction starts a new recording.
    assert h.run_until(lambda: len(h.controller) >= 5, 30, text="put the cup down")
    h.close()
    files = sorted(record.glob("*.rrd"))
    assert [f.name[:5] for f in files] == ["0001_", "0002_"]
    assert "pick_up_the_red_cup" in files[0].name and "put_the_cup_down" in files[1].name
    paths = set(RrdReader(str(files[0])).store().schema().entity_paths())
    assert {"/instruction", "/camera/0", "/joints/measured", "/joints/sent",
            "/chunks/0000", "/timing/observation_to_plan_s"} <= paths
