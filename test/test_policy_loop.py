"""The policy node and an in-process evaluation run one policy loop.

The same scripted inputs (a robot holding still, a model that fails twice) through the node
(its parameters, input store, loop and reports) and through the evaluation's rollout (its
settings from the robot's file, the simulated robot) give the same trajectories at the same
times and the same causes.
"""

from __future__ import annotations

import numpy as np
import pytest

from twinbrain_ros.errors import CausedError
from twinbrain_ros.policy.config import PolicyConfig
from twinbrain_ros.policy.contract import ActionChunk
from twinbrain_ros.robot.embodiment import Embodiment, config_dir
from twinbrain_ros.sim.base import Episode, SimBackend

GR1 = Embodiment.load("gr1")
STATE = np.clip(np.linspace(-0.3, 0.3, GR1.state_dim), GR1.lower, GR1.upper)
FRAME = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
INSTRUCTION = "pick up the red cup"
PERIODS = 50
DELAY_S = 0.1  # two control periods of inference delay


class ScriptedRuntime:
    """Chunks that depend on the call; call 3 fails (an exception), call 6 with a cause."""

    horizon = 8
    identity: dict = {}

    def __init__(self):
        self.calls = 0

    def check_instruction(self, text, max_tokens):
        return len(text.split())

    def infer(self, observation, prefix=None):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("the model failed")
        if self.calls == 6:
            raise CausedError("server_timeout", "the policy server did not answer in time")
        steps = np.arange(1, self.horizon + 1)[:, None]
        offset = 0.01 * np.sin(np.arange(GR1.state_dim) + self.calls)
        actions = np.clip(observation.state + 0.5 * GR1.max_step * np.sign(offset) * steps,
                          GR1.lower, GR1.upper)
        return ActionChunk(actions=actions, latency_s=0.01)


class StillRobot(SimBackend):
    """A GR1 that holds still, with one camera showing one frame."""

    judge_at_end = True
    camera_names = ("camera",)
    tasks = ("hold_still",)
    task = "hold_still"

    def __init__(self):
        self.embodiment = GR1
        self.sim_dt = GR1.dt / 2
        self._time = 0.0

    def reset(self, seed: int) -> Episode:
        self._time = 0.0
        return Episode(self.task, seed, INSTRUCTION, max_steps=PERIODS)

    def step(self, targets):
        self._time += self.sim_dt

    def joint_state(self):
        return STATE.copy(), np.zeros(GR1.state_dim)

    def render(self):
        return [FRAME]

    def success(self) -> bool:
        return False

    def expert(self):
        raise NotImplementedError

    @property
    def time(self) -> float:
        return self._time


def _sent(start_time, time_from_start, positions, hold) -> tuple:
    return (round(float(start_time), 9), np.round(np.asarray(time_from_start, float), 9),
            np.asarray(positions, float), bool(hold))


def _through_the_rollout(monkeypatch) -> tuple[list[tuple], dict]:
    from twinbrain_ros.evaluation.rollout import SimulatedIO, run_policy_episode
    from twinbrain_ros.policy.pipeline import PolicyPipeline

    sent = []
    send = SimulatedIO.send

    def recording(io, trajectory):
        sent.append(_sent(io.now(), trajectory.time_from_start, trajectory.positions,
                          trajectory.is_hold))
        return send(io, trajectory)

    monkeypatch.setattr(SimulatedIO, "send", recording)
    config = PolicyConfig.for_robot(GR1, inference_delay_s=DELAY_S)
    pipeline = PolicyPipeline(ScriptedRuntime(), GR1, config)
    result = run_policy_episode(StillRobot(), 0, pipeline, config)
    assert result.steps == PERIODS
    return sent, result.hold_causes


def _through_the_node() -> tuple[list[tuple], dict, dict]:
    import threading

    import rclpy
    import yaml
    from builtin_interfaces.msg import Time
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String

    from twinbrain_ros.ros.conversions import rgb_to_image
    from twinbrain_ros.ros.policy_node import PolicyNode

    clock = StillRobot()  # the node's clock advances as the simulated robot's does
    sent = []

    class SteppedNode(PolicyNode):
        """The node with the test's clock, its worker's loop stepped by the test."""

        def now(self):
            return clock.time

        def _start_worker(self):
            worker = threading.Thread(target=lambda: None)  # ends at once: the test steps
            worker.start()
            return worker

        def send(self, trajectory):
            sent.append(_sent(self.now(), trajectory.time_from_start, trajectory.positions,
                              trajectory.is_hold))
            return True

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        params = yaml.safe_load((config_dir() / "gr1.yaml").read_text())
        params = {**params["policy_node"]["ros__parameters"], "checkpoint": "in-process",
                  "enable_actuation": True, "inference_delay_s": DELAY_S}
        node = SteppedNode(runtime=ScriptedRuntime(), context=context, parameter_overrides=[
            Parameter(k, value=v) for k, v in params.items()])
        assert node.config == PolicyConfig.for_robot(GR1, inference_delay_s=DELAY_S)
        try:
            node._on_instruction(String(data=INSTRUCTION))
            for _ in range(PERIODS):
                seconds = clock.time
                stamp = Time(sec=int(seconds), nanosec=int(round((seconds % 1) * 1e9)))
                node._on_image(GR1.image_topics[0], rgb_to_image(FRAME, stamp=stamp))
                joints = JointState(name=list(GR1.joint_names), position=STATE.tolist())
                joints.header.stamp = stamp
                node._on_joints(joints)
                while node.loop.next_due() <= clock.time + 1e-9:
                    node.loop.tick()
                for _ in range(2):
                    clock.step(None)
            return sent, dict(node.loop.failures), dict(node.causes.counts)
        finally:
            node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


def test_the_node_and_the_rollout_send_the_same_trajectories_for_the_same_causes(
        ros_env, monkeypatch):
    rollout, rollout_causes = _through_the_rollout(monkeypatch)
    node, node_causes, counted = _through_the_node()
    assert rollout_causes == node_causes == {"inference_error": 1, "server_timeout": 1}
    assert counted["inference_error"] == 1 and counted["server_timeout"] == 1
    holds = [s for s in node if s[3]]
    assert len(holds) == 2 and len(node) > len(holds) + 3, "plans, two holds, plans again"
    assert len(node) == len(rollout)
    for ours, theirs in zip(node, rollout, strict=True):
        assert ours[0] == pytest.approx(theirs[0], abs=1e-9)   # sent at the same time
        np.testing.assert_allclose(ours[1], theirs[1])         # with the same timing
        np.testing.assert_allclose(ours[2], theirs[2])         # to the same positions
        assert ours[3] == theirs[3]                            # hold or plan alike
