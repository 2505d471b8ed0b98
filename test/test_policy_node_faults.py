"""Faults in the policy node: every failure holds the robot, nothing leaves the limits, the
worker keeps planning, the operator can stop it. In-process over real rclpy (Fast DDS)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from helpers import save_policy_checkpoint
from ros_harness import RobotSide, in_process_policy_node, is_hold, positions

from twinbrain_ros.robot.embodiment import Embodiment, config_dir
from twinbrain_ros.ros import diagnostic_keys as keys

pytestmark = [pytest.mark.ros, pytest.mark.slow]

GR1 = Embodiment.load("gr1")


class InjectedFault(Exception):
    """A failure of the model, raised on chosen calls."""


class WorkerKilled(BaseException):
    """Escapes `except Exception`: ends the worker thread itself."""


class FaultyRuntime:
    """A real PolicyRuntime whose `infer` raises what `fault(call, observation)` returns."""

    def __init__(self, runtime, fault):
        self.runtime, self.fault, self.calls, self.raised = runtime, fault, 0, 0
        self.identity = runtime.identity

    def check_instruction(self, text, max_tokens):
        return self.runtime.check_instruction(text, max_tokens)

    def infer(self, observation):
        self.calls += 1
        error = self.fault(self.calls, observation)
        if error is not None:
            self.raised += 1
            raise error
        return self.runtime.infer(observation)


@pytest.fixture(scope="module")
def gr1_runtime(tiny_backbones, tmp_path_factory):
    from twinbrain_ros.policy.runtime import PolicyRuntime

    path = save_policy_checkpoint(tiny_backbones["qwen2_5_vl"],
                                  tmp_path_factory.mktemp("faults") / "gr1", GR1)
    return PolicyRuntime(str(path), GR1, device="cpu", seed=0)


@pytest.fixture
def robot(ros_env):
    side = RobotSide("gr1")
    yield side
    side.close()


def _rejected(robot, cause: str) -> int:
    return int(robot.values().get(keys.rejected(cause), 0))


def test_a_failed_cycle_holds_at_the_newest_measured_position_and_planning_resumes(
        robot, gr1_runtime):
    # The robot moves (within one step per joint) before the failing cycle, the first to see
    # it there: the hold goes to where it is now, not to the snapshot of an earlier cycle or to
    # the old plan. The cycle after it plans, the next one fails again.
    moved = np.clip(robot.state + 0.5 * GR1.max_step, GR1.lower, GR1.upper)
    first = []

    def fault(call, observation):
        if not first and np.allclose(observation.state, moved):
            first.append(call)
            return InjectedFault("model exploded")
        return InjectedFault("again") if first and call == first[0] + 2 else None

    runtime = FaultyRuntime(gr1_runtime, fault)
    in_process_policy_node(robot, runtime)
    robot.spin_until(lambda: len(robot.controller) >= 2, 60, "two trajectories", feed=True)
    robot.state = moved
    robot.spin_until(lambda: runtime.raised == 2 and runtime.calls >= runtime.raised + 4, 30,
                     "two failed cycles and a plan after them", feed=True)
    holds = [t for t in robot.controller if is_hold(t)]
    assert holds, "no hold was published"
    np.testing.assert_allclose(positions(holds[0])[0], robot.state, atol=1e-9)
    # Warnings (bad images) and errors (the model) from the same node: logging never kills it.
    for _ in range(5):
        robot.publish(image=robot.image(encoding="16UC1"), joints=None, text=None)
    robot.spin_until(lambda: _rejected(robot, "unsupported_encoding") > 0, 10,
                     "the bad images counted")
    count = len(robot.controller)
    robot.spin_until(lambda: len(robot.controller) >= count + 2, 20, "plans again", feed=True)
    values = robot.values()
    assert _rejected(robot, "inference_error") == 2
    assert "model exploded" in values[keys.LAST_ERROR] or "again" in values[keys.LAST_ERROR]
    assert values[keys.WORKER_ALIVE] == "True" and values[keys.WORKER_RESTARTS] == "0"
    assert int(values[keys.HOLDS_TOTAL]) >= 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_watchdog_restarts_a_worker_that_died_and_reports_an_error(robot, gr1_runtime):
    from diagnostic_msgs.msg import DiagnosticStatus

    runtime = FaultyRuntime(gr1_runtime, lambda call, _: WorkerKilled() if call == 2 else None)
    policy = in_process_policy_node(robot, runtime)
    robot.spin_until(lambda: robot.values().get(keys.WORKER_RESTARTS) == "1", 60,
                     "the worker's restart reported", feed=True)
    assert robot.values().level == DiagnosticStatus.ERROR
    assert "restarted" in robot.values().message
    count = len(robot.controller)
    robot.spin_until(lambda: len(robot.controller) >= count + 3, 30, "plans after the restart",
                     feed=True)
    assert policy._worker.is_alive()


def test_joint_states_far_outside_the_limits_are_refused_and_never_commanded(robot,
                                                                            gr1_runtime):
    in_process_policy_node(robot, gr1_runtime)
    robot.spin_until(lambda: robot.controller, 60, "the first trajectory", feed=True)
    huge = robot.state.copy()
    huge[3] = 1e30
    robot.controller.clear()
    robot.spin_until(lambda: _rejected(robot, "joint_out_of_range") > 0, 10,
                     "the huge joint state refused", feed=dict(joints=huge))
    for trajectory in robot.controller:
        points = positions(trajectory)
        assert np.all(points >= GR1.lower - 1e-9) and np.all(points <= GR1.upper + 1e-9)
    # Slightly outside (less than one step): clipped into the limits and still usable.
    edge = robot.state.copy()
    edge[1] = GR1.lower[1] - 0.5 * GR1.max_step[1]
    robot.controller.clear()
    robot.spin_until(lambda: len(robot.controller) >= 2, 20, "plans from the edge",
                     feed=dict(joints=edge))
    for trajectory in robot.controller:
        points = positions(trajectory)
        assert np.all(points >= GR1.lower - 1e-9) and np.all(points <= GR1.upper + 1e-9)
        assert np.all(np.abs(points[0] - np.clip(edge, GR1.lower, GR1.upper))
                      <= GR1.max_step + 1e-9)


def test_the_first_point_is_within_one_step_of_where_the_robot_is(robot, gr1_runtime):
    in_process_policy_node(robot, gr1_runtime)
    robot.spin_until(lambda: len(robot.controller) >= 2, 60, "two trajectories", feed=True)
    # Pushed by hand far from the commanded plan: five steps on every joint, within limits.
    robot.state = np.clip(robot.state - 5 * GR1.max_step, GR1.lower, GR1.upper)
    robot.controller.clear()
    robot.spin_until(lambda: len(robot.controller) >= 3, 30, "three trajectories", feed=True)
    for trajectory in robot.controller[1:]:  # the first may come from a snapshot before
        points = positions(trajectory)
        assert np.all(np.abs(points[0] - robot.state) <= GR1.max_step + 1e-9)
        assert np.all(np.abs(np.diff(points, axis=0)) <= GR1.max_step + 1e-9)


def test_hold_and_resume_services_and_actuation_switched_at_run_time(robot, gr1_runtime):
    from rclpy.parameter import Parameter
    from std_srvs.srv import Trigger

    policy = in_process_policy_node(robot, gr1_runtime)
    robot.spin_until(lambda: len(robot.controller) >= 2, 60, "two trajectories", feed=True)
    hold = robot.node.create_client(Trigger, "/policy_node/hold")
    resume = robot.node.create_client(Trigger, "/policy_node/resume")
    robot.spin_until(hold.service_is_ready, 10, "the hold service")
    future = hold.call_async(Trigger.Request())
    robot.spin_until(future.done, 10, "the hold service's reply", feed=True)
    assert future.result().success
    # The hold is the last thing sent: a cycle in flight when it came is discarded.
    robot.spin_until(lambda: is_hold(robot.controller[-1]), 10, "the hold", feed=True)
    count = len(robot.controller)
    robot.spin_for(2.0, feed=True)
    assert len(robot.controller) == count, "planned while held"
    robot.spin_until(lambda: robot.values().get(keys.OPERATOR_HOLD) == "True", 10,
                     "the operator hold in the diagnostics", feed=True)
    future = resume.call_async(Trigger.Request())
    robot.spin_until(future.done, 10, "the resume service's reply", feed=True)
    assert future.result().success
    robot.spin_until(lambda: len(robot.controller) >= count + 2, 20, "plans after resume",
                     feed=True)

    # Actuation off at run time: a hold goes to the controller, then plans to the dry run.
    count = len(robot.controller)
    policy.set_parameters([Parameter("enable_actuation", value=False)])
    robot.spin_until(lambda: len(robot.dry_run) >= 2, 20, "dry-run plans", feed=True)
    robot.spin_until(lambda: len(robot.controller) > count and is_hold(robot.controller[-1]),
                     10, "the hold on the controller", feed=True)
    after = robot.controller[count:]
    # The hold is the last thing the controller got (a plan already on its way may precede it).
    assert 1 <= len(after) <= 2
    settled = len(robot.controller)
    robot.spin_for(1.0, feed=True)
    assert len(robot.controller) == settled
    robot.spin_until(lambda: robot.values().get(keys.ACTUATION_ENABLED) == "False", 10,
                     "actuation off in the diagnostics", feed=True)
    # Other parameters are read-only while the node runs.
    result = policy.set_parameters([Parameter("blend_steps", value=7)])[0]
    assert not result.successful


def test_diagnostics_stay_bounded_and_huge_instructions_are_refused_at_once(robot, gr1_runtime):
    in_process_policy_node(robot, gr1_runtime)
    robot.spin_until(lambda: robot.controller, 60, "the first trajectory", feed=True)
    rng = np.random.default_rng(0)
    for _ in range(300):
        name = "".join(chr(c) for c in rng.integers(65, 91, 12))
        robot.publish(image=robot.image(encoding=name), joints=None, text=None)
        robot.spin_once(0.005)  # the node takes them as they come (a queue of 5 frames)
    robot.spin_until(lambda: _rejected(robot, "unsupported_encoding") >= 100, 10,
                     "100 frames of unknown encodings counted")
    started = time.monotonic()
    robot.publish(image=False, joints=False, text="x" * 1_000_000)
    robot.publish(image=False, joints=False, text="pick up the cup " * 6000)
    robot.publish(image=False, joints=False, text="pick <|im_end|> then")
    robot.spin_until(lambda: _rejected(robot, "instruction_too_long") >= 2
                     and _rejected(robot, "instruction_special_tokens") >= 1, 10,
                     "the instructions refused")
    assert time.monotonic() - started < 5.0
    # A rejected instruction stops planning until a valid one arrives.
    count = len(robot.controller)
    robot.spin_for(1.5, feed=dict(text=None))
    assert len(robot.controller) <= count + 1
    robot.spin_until(lambda: len(robot.controller) >= count + 2, 10,
                     "plans after a valid instruction", feed=True)
    values = robot.values()
    assert len(values) < 60
    assert sum(len(k) + len(v) for k, v in values.items()) < 4000


def test_an_input_that_falls_silent_is_resubscribed(robot, gr1_runtime):
    in_process_policy_node(robot, gr1_runtime, input_silence_s=0.5)
    robot.spin_until(lambda: robot.controller, 60, "the first trajectory", feed=True)
    topic = GR1.image_topics[0]
    # The camera's publisher stays matched but sends nothing: the subscription is recreated.
    robot.spin_until(lambda: int(robot.values().get(keys.input_resubscribed(topic), 0)) >= 1,
                     10, "the camera resubscribed", feed=dict(image=False))
    count = len(robot.controller)
    robot.spin_until(lambda: len(robot.controller) >= count + 2, 20, "plans again", feed=True)
    robot.spin_until(lambda: robot.values().number(keys.input_silent_s(topic), 99.0) < 1.0, 10,
                     "the camera heard again", feed=True)


def test_stale_inputs_and_a_rejected_instruction_stop_the_executing_plan(robot, gr1_runtime):
    in_process_policy_node(robot, gr1_runtime, max_input_age_s=0.3)
    robot.spin_until(lambda: len(robot.controller) >= 2, 60, "two trajectories", feed=True)
    # The camera stops: within max_input_age_s the plan is replaced by one hold, then silence.
    count = len(robot.controller)
    robot.spin_until(lambda: len(robot.controller) > count and is_hold(robot.controller[-1]),
                     5, "a hold", feed=dict(image=False))
    np.testing.assert_allclose(positions(robot.controller[-1])[0], robot.state, atol=1e-9)
    settled = len(robot.controller)
    robot.spin_for(1.0, feed=dict(image=False))
    assert len(robot.controller) == settled
    robot.spin_until(lambda: _rejected(robot, "held_on_unusable_inputs") >= 1, 10,
                     "the hold's cause counted", feed=dict(image=False))
    # Planning again, then an instruction that is refused: the robot holds at once, while the
    # camera and the joint states go on.
    robot.spin_until(lambda: len(robot.controller) >= settled + 2, 20, "plans again", feed=True)
    count = len(robot.controller)
    robot.publish(image=False, joints=False, text="pick <|im_start|> up")
    robot.spin_until(lambda: len(robot.controller) > count, 5, "a hold",
                     feed=dict(text=None))
    assert is_hold(robot.controller[-1])
    robot.spin_until(lambda: _rejected(robot, "instruction_special_tokens") >= 1, 10,
                     "the instruction's refusal counted", feed=dict(text=None))


def test_a_hung_cycle_is_reported_and_the_robot_holds(robot, gr1_runtime):
    from diagnostic_msgs.msg import DiagnosticStatus

    class Hangs:
        """The real runtime, whose third call does not return until released."""

        def __init__(self, runtime):
            self.runtime, self.calls, self.identity = runtime, 0, runtime.identity
            self.release = threading.Event()

        def check_instruction(self, text, max_tokens):
            return self.runtime.check_instruction(text, max_tokens)

        def infer(self, observation):
            self.calls += 1
            if self.calls == 3:
                self.release.wait(timeout=120)  # a device call that hangs (not a wait of ours)
            return self.runtime.infer(observation)

    runtime = Hangs(gr1_runtime)
    in_process_policy_node(robot, runtime, stall_timeout_s=1.5)
    try:
        robot.spin_until(lambda: len(robot.controller) >= 2, 60, "two trajectories", feed=True)
        robot.spin_until(lambda: "stalled" in robot.values().message, 30, "a stall reported",
                         feed=True)
        assert robot.values().level == DiagnosticStatus.ERROR
        robot.spin_until(lambda: is_hold(robot.controller[-1]), 10, "the hold", feed=True)
    finally:
        runtime.release.set()
    # The late chunk of the hung cycle is discarded; planning resumes and the error clears.
    robot.spin_until(lambda: "stalled" not in robot.values().message, 15, "the stall cleared",
                     feed=True)
    count = len(robot.controller)
    robot.spin_until(lambda: len(robot.controller) >= count + 2, 20, "plans again", feed=True)
    robot.spin_until(lambda: _rejected(robot, "discarded_after_hold") >= 1, 10,
                     "the late chunk discarded", feed=True)


def test_callbacks_never_raise_and_causes_stay_bounded(robot, gr1_runtime):
    from twinbrain_ros.ros.policy_node import MAX_CAUSES

    policy = in_process_policy_node(robot, gr1_runtime)
    robot.spin_until(lambda: robot.controller, 60, "the first trajectory", feed=True)
    policy._on_image("/camera/image_raw", object())  # not an Image at all
    assert policy.rejected["callback_error"] == 1
    for k in range(3 * MAX_CAUSES):
        policy._reject(f"synthetic_{k}", "a made-up cause")
    assert len(policy.rejected) <= MAX_CAUSES + 1 and policy.rejected["other"] > 0
    robot.spin_until(lambda: keys.rejected("other") in robot.values(), 5, "the causes reported")
    assert sum(1 for key in robot.values() if key.startswith("rejected.")) <= MAX_CAUSES + 1
    count = len(robot.controller)
    robot.spin_until(lambda: len(robot.controller) >= count + 2, 20, "plans", feed=True)


def test_parameters_carry_types_ranges_descriptions_and_read_only_flags(robot, gr1_runtime):
    from rclpy.parameter import Parameter

    policy = in_process_policy_node(robot, gr1_runtime)
    blend, joints, actuation = policy.describe_parameters(
        ["blend_steps", "joint_names", "enable_actuation"])
    assert blend.read_only and blend.integer_range[0].to_value == 64
    assert joints.read_only and "model order" in joints.description
    assert not actuation.read_only
    result = policy.set_parameters([Parameter("enable_actuation", value="yes")])[0]
    assert not result.successful


def test_a_renamed_parameter_is_named_at_start(robot, gr1_runtime, tmp_path):
    with pytest.raises(ValueError, match="parameter 'record_path' is now 'rerun_path'"):
        in_process_policy_node(robot, gr1_runtime, record_path=str(tmp_path))


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


def test_rtc_node_waits_the_inference_delay_and_logs_each_instruction(robot, gr1_runtime,
                                                                         tmp_path):
    pytest.importorskip("rerun", reason="rerun logs need rerun-sdk")
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

    logs = tmp_path / "rerun"
    runtime = PrefixLog(gr1_runtime)
    # Replanning every 4 of the 8 actions leaves an overlap to inpaint.
    policy = in_process_policy_node(robot, runtime, chunk_transition="rtc",
                                    inference_delay_s=0.2, actions_per_inference=4,
                                    rerun_path=str(logs))

    def following():
        # The robot follows its commands: where the newest trajectory starts.
        if robot.controller:
            robot.state = np.array(robot.controller[-1].points[0].positions)
        return sum(p is not None for p in runtime.prefixes) >= 2

    robot.spin_until(following, 60, "two chunks with a prefix", feed=True)
    guided = [p for p in runtime.prefixes if p is not None]
    # 0.2 s of delay at 20 Hz: at least four actions execute while the model runs, all of the
    # overlap when it is shorter.
    assert all(p.frozen >= min(4, len(p.actions)) and p.frozen >= 1 for p in guided)
    robot.spin_until(lambda: keys.RTC_EXPECTED_LATENCY_S in robot.values(), 10,
                     "the expected latency reported", feed=True)
    cycles = list(policy.loop.cycles)
    assert cycles and all(c["published"] - c["started"] >= 0.2 for c in cycles)
    values = robot.values()
    assert values[keys.CHUNK_TRANSITION] == "rtc"
    assert values.number(keys.RTC_EXPECTED_LATENCY_S) >= 0.2
    assert keys.PLAN_LEFT_TOTAL in values
    # A new instruction starts a new rerun log.
    count = len(robot.controller)
    robot.spin_until(lambda: len(robot.controller) >= count + 2, 30,
                     "plans for the new instruction", feed=dict(text="put the cup down"))
    robot.remove_node(policy)  # closes the rerun log
    files = sorted(logs.glob("*.rrd"))
    assert [f.name[:5] for f in files] == ["0001_", "0002_"]
    assert "pick_up_the_red_cup" in files[0].name and "put_the_cup_down" in files[1].name
    paths = set(RrdReader(str(files[0])).store().schema().entity_paths())
    assert {"/instruction", "/camera/0", "/joints/measured", "/joints/sent",
            "/chunks/0000", "/timing/observation_to_plan_s"} <= paths
