"""Real-time chunking and the plan-left reset: model sampler, runtime and pipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import build_model, camera_frame

from twinbrain_ros.policy.config import PolicyConfig
from twinbrain_ros.policy.contract import ActionChunk
from twinbrain_ros.policy.loop import Snapshot
from twinbrain_ros.policy.pipeline import PolicyPipeline
from twinbrain_ros.robot.embodiment import Embodiment
from twinbrain_ros.robot.observation import Observation
from twinbrain_ros.transforms.normalization import EmbodimentNormStats, NormStats
from twinbrain_ros.transforms.rtc import ChunkPrefix

# Raw action range of the tiny model below: [-0.5, 2.0] on every dim.
LOW, HIGH = -0.5, 2.0


def _model_with_range(backbone):
    model = build_model(backbone).eval()
    spec = model.config.embodiments["arm"]
    bounds = lambda dim, lo, hi: NormStats(mode="q01_q99", mean=[0.0] * dim, std=[1.0] * dim,  # noqa: E731
                                           min=[lo] * dim, max=[hi] * dim, q01=[lo] * dim,
                                           q99=[hi] * dim)
    model.norm_stats["arm"] = EmbodimentNormStats(state=bounds(spec.state_dim, -1.0, 1.0),
                                                  action=bounds(spec.action_dim, LOW, HIGH))
    return model, spec


def test_predict_action_keeps_the_frozen_prefix_and_stays_in_the_action_range(tiny_backbones):
    model, spec = _model_with_range(tiny_backbones["qwen2_5_vl"])
    images = [camera_frame(3)]
    state = np.linspace(-0.5, 0.5, spec.state_dim).astype(np.float32)
    horizon = model.config.action_expert.horizon
    plain = model.predict_action(images, "pick up the cup", state, "arm", seed=4)
    old_plan = np.random.default_rng(0).uniform(LOW, HIGH, (horizon - 1, spec.action_dim))
    prefix = ChunkPrefix(old_plan, frozen=2, schedule="exp")
    guided = model.predict_action(images, "pick up the cup", state, "arm", seed=4,
                                  prefix=prefix)
    np.testing.assert_allclose(guided[:2], old_plan[:2], atol=1e-5)
    assert not np.allclose(plain[:2], old_plan[:2], atol=1e-2)
    # A previous plan beyond the action range (say a different robot's statistics) is not
    # reproduced beyond it: the chunk stays within the range.
    wild = ChunkPrefix(np.where(old_plan > 0.7, 3.0 * HIGH, 3.0 * LOW), frozen=3)
    beyond = model.predict_action(images, "pick up the cup", state, "arm", seed=4, prefix=wild)
    assert (beyond >= LOW - 1e-6).all() and (beyond <= HIGH + 1e-6).all()
    np.testing.assert_allclose(beyond[:3], np.clip(wild.actions[:3], LOW, HIGH), atol=1e-5)
    # Pulled towards the old plan over the overlap, on the whole.
    assert np.abs(guided[2:4] - old_plan[2:4]).mean() < np.abs(plain[2:4] - old_plan[2:4]).mean()
    # No prefix: the plain sampler.
    np.testing.assert_array_equal(
        model.predict_action(images, "pick up the cup", state, "arm", seed=4, prefix=None), plain)
    # In a batch, each observation gets what it gets alone, prefix or not.
    batch = model.predict_action_batch([images, images], ["pick up the cup"] * 2, [state] * 2,
                                       "arm", [4, 4], prefixes=[prefix, None])
    np.testing.assert_allclose(batch[0], guided, atol=1e-5)
    np.testing.assert_allclose(batch[1], plain, atol=1e-5)
    with pytest.raises(ValueError, match="action dims"):
        model.predict_action(images, "go", state, "arm", prefix=ChunkPrefix(old_plan[:, :3], 1))


def test_the_static_engine_inpaints_like_the_eager_path(tiny_backbones):
    from twinbrain_ros.model.engine import InferenceEngine

    model, spec = _model_with_range(tiny_backbones["qwen3_vl"])
    engine = InferenceEngine(model, num_cameras=1, token_budgets=(32,))
    images, state = [camera_frame(5)], np.zeros(spec.state_dim, np.float32)
    prefix = ChunkPrefix(np.full((4, spec.action_dim), 1.5), frozen=1, schedule="linear")
    for given in (prefix, None):
        eager = model.predict_action(images, "stack the blocks", state, "arm", seed=2,
                                     prefix=given)
        static = engine.predict_action(images, "stack the blocks", state, "arm", seed=2,
                                       prefix=given)
        np.testing.assert_allclose(static, eager, atol=1e-5)


# -- pipeline: the prefix it builds, the latency it freezes, the plan it forgets --------------

TOY = Embodiment(name="toy", joint_names=["shoulder", "elbow", "finger"],
                 joint_lower_limits=[-2.0, -2.0, 0.0], joint_upper_limits=[2.0, 2.0, 0.04],
                 max_joint_step=[0.1, 0.1, 0.01], control_rate_hz=10.0,
                 gripper_joint="finger", gripper_open_position=0.04,
                 gripper_closed_position=0.0)


class ScriptedRuntime:
    """Returns the given chunks in turn and records the prefixes it was asked to inpaint."""

    horizon = 8

    def __init__(self, chunks):
        self.chunks, self.prefixes = list(chunks), []

    def infer(self, observation, prefix=None):
        self.prefixes.append(prefix)
        actions = self.chunks.pop(0)
        if prefix is not None:  # an inpainting sampler keeps the frozen prefix
            actions = actions.copy()
            actions[:prefix.frozen] = prefix.actions[:prefix.frozen]
        return ActionChunk(actions=actions, latency_s=0.0)


def _ramp(start, steps=8):
    """A chunk moving shoulder and elbow by 0.05 per step, gripper open."""
    k = np.arange(1, steps + 1)[:, None]
    chunk = np.tile([start, -start, 0.04], (steps, 1))
    chunk[:, :2] += 0.05 * k * np.array([1.0, -1.0])
    return chunk


def _cycle(pipeline, state, t_obs, t_ready, measured=None):
    """The pipeline's stages as the policy loop runs them: prepare, infer, decode, schedule."""
    observation = Observation(images=[], state=np.asarray(state, float), instruction="go")
    chunk = pipeline.infer(observation, pipeline.prepare(observation, t_obs))
    return pipeline.schedule(chunk, pipeline.decode(chunk, observation), observation, t_obs,
                             lambda: t_ready,
                             measured=None if measured is None else lambda: measured)


def _pipeline(runtime, embodiment=None, notify=None, **settings):
    return PolicyPipeline(runtime, embodiment or TOY, PolicyConfig(**settings), notify=notify)


def test_blend_mode_sends_no_prefix():
    runtime = ScriptedRuntime([_ramp(0.0), _ramp(0.2)])
    pipeline = _pipeline(runtime, TOY, chunk_transition="blend")
    _cycle(pipeline, [0.0, 0.0, 0.04], 10.0, 10.05)
    _cycle(pipeline, [0.2, -0.2, 0.04], 10.4, 10.45)
    assert runtime.prefixes == [None, None]


def test_rtc_prefix_is_the_executing_plan_with_the_measured_latency_frozen():
    runtime = ScriptedRuntime([_ramp(0.0), _ramp(0.2) + [0.03, 0.03, 0.0], _ramp(0.4)])
    pipeline = _pipeline(runtime, TOY, chunk_transition="rtc", blend_steps=3)
    _cycle(pipeline, [0.0, 0.0, 0.04], 10.0, 10.25)      # 0.25 s from observation to plan
    assert runtime.prefixes == [None]
    old = pipeline.scheduler.plan
    # The robot follows the plan: at 10.4 and at 10.65 it is where the plan has it.
    result = _cycle(pipeline, old.position_at(10.4), 10.4, 10.65,
                    measured=old.position_at(10.65))
    prefix = runtime.prefixes[1]
    assert prefix.frozen == math.ceil(0.25 / TOY.dt) == 3 and result.frozen_actions == 3
    times = 10.4 + TOY.dt * np.arange(1, len(prefix.actions) + 1)
    expected = np.array([old.position_at(t) for t in times])
    np.testing.assert_allclose(prefix.actions, expected)    # joint positions: the plan itself
    assert times[-1] <= old.times[-1] < times[-1] + TOY.dt  # the whole overlap, no more
    # The guided chunk replaces the plan without a cross-fade: after the dropped actions the
    # frozen one is the old plan's, the rest the new chunk's (offset by 0.03) unchanged.
    plan = pipeline.scheduler.plan
    np.testing.assert_allclose(plan.positions[0], old.position_at(plan.times[0]))
    np.testing.assert_allclose(plan.positions[1:], (_ramp(0.2) + [0.03, 0.03, 0.0])[3:])


def test_ee_delta_prefix_decodes_back_to_the_executing_joint_plan():
    pytest.importorskip("pinocchio", reason="kinematics needs pin")
    widowx = Embodiment.load("widowx")
    state = np.array([0.0, -0.3, 0.4, 0.0, 0.5, 0.0, widowx.gripper_open_position])
    # A joint plan the arm is executing: a smooth sweep, the gripper closing halfway.
    k = np.arange(1, 6)[:, None]
    targets = state + 0.04 * k * np.array([1.0, 0.5, -0.5, 0.3, -0.2, 0.4, 0.0])
    targets[3:, 6] = widowx.gripper_closed_position
    from twinbrain_ros.policy.scheduler import Plan

    pipeline = _pipeline(ScriptedRuntime([]), widowx, chunk_transition="rtc")
    pipeline.scheduler.commit(Plan(5.0 + widowx.dt * np.arange(1, 6), targets))
    prefix = pipeline.prepare(Observation(images=[], state=state, instruction="go"), 5.0)
    assert prefix.actions.shape == (5, 7)
    np.testing.assert_array_equal(prefix.actions[:, 6], [1, 1, 1, 0, 0])  # open, then closed
    decoded = widowx.actions.decode(prefix.actions, state)
    np.testing.assert_allclose(decoded[:, :6], targets[:, :6], atol=2e-4)


def test_a_displaced_arm_resets_the_plan_but_fingers_on_an_object_do_not():
    notes = []
    pipeline = _pipeline(ScriptedRuntime([_ramp(0.0)] * 4), TOY, blend_steps=3,
                         notify=lambda cause, text: notes.append((cause, text)))
    _cycle(pipeline, [0.0, 0.0, 0.04], 10.0, 10.05)
    # Close the gripper in the plan, as a grasp does.
    pipeline.scheduler.plan.positions[:, 2] = 0.0
    plan_at = pipeline.scheduler.commanded_position(10.3)
    # Fingers stopped by an object: far more open than commanded, but that is not leaving.
    on_object = plan_at.copy()
    on_object[2] = 0.03
    assert not pipeline.check_tracking(on_object, 10.3)
    assert pipeline.scheduler.plan is not None and pipeline.divergences == 0
    # Fingers more closed than commanded by more than the tolerance: left the plan.
    pipeline.scheduler.plan.positions[:, 2] = 0.04
    closed = pipeline.scheduler.commanded_position(10.3).copy()
    closed[2] = 0.0
    assert pipeline.check_tracking(closed, 10.3)
    assert pipeline.scheduler.plan is None and pipeline.divergences == 1
    assert notes[-1][0] == "plan_left" and "finger" in notes[-1][1]
    # Normal tracking lag within the tolerance: the plan stays, the new chunk is blended into
    # it (unlike the same chunk without a plan).
    _cycle(pipeline, [0.0, 0.0, 0.04], 10.0, 10.05)
    lagging = pipeline.scheduler.commanded_position(10.3) - [0.2, -0.2, 0.0]
    blended = _cycle(pipeline, lagging, 10.3, 10.35)
    assert pipeline.divergences == 1
    alone = _cycle(_pipeline(ScriptedRuntime([_ramp(0.0)]), TOY, blend_steps=3), lagging,
                   10.3, 10.35)
    assert not np.allclose(blended.trajectory.positions[:3], alone.trajectory.positions[:3])
    # An arm pushed away by hand: the plan is forgotten and the next chunk starts afresh (no
    # blending into the plan it left), logged once.
    displaced = pipeline.scheduler.commanded_position(10.6) + [0.5, 0.0, 0.0]
    fresh = _cycle(pipeline, displaced, 10.6, 10.65)
    assert pipeline.divergences == 2 and "shoulder" in pipeline.last_divergence
    reference = _pipeline(ScriptedRuntime([_ramp(0.0)]), TOY, blend_steps=3)
    alone = _cycle(reference, displaced, 10.6, 10.65)   # the same chunk with no plan at all
    np.testing.assert_allclose(fresh.trajectory.positions, alone.trajectory.positions)
    np.testing.assert_allclose(fresh.trajectory.velocities, alone.trajectory.velocities)
    assert [cause for cause, _ in notes] == ["plan_left", "plan_left"]  # one report each


def test_an_rtc_chunk_for_a_plan_the_robot_left_meanwhile_is_refused():
    from twinbrain_ros.policy.pipeline import ChunkRejected

    runtime = ScriptedRuntime([_ramp(0.0), _ramp(0.2)])
    pipeline = _pipeline(runtime, TOY, chunk_transition="rtc")
    _cycle(pipeline, [0.0, 0.0, 0.04], 10.0, 10.05)
    plan = pipeline.scheduler.plan
    # Observed on the plan (the chunk is inpainted from it), pushed away while the model ran:
    # the chunk would steer the robot back onto the plan it left.
    pushed = plan.position_at(10.6) + [0.5, 0.0, 0.0]
    with pytest.raises(ChunkRejected) as info:
        _cycle(pipeline, plan.position_at(10.4), 10.4, 10.6, measured=pushed)
    assert info.value.cause == "plan_left" and runtime.prefixes[1] is not None
    assert pipeline.scheduler.plan is None and pipeline.divergences == 1


def test_without_plan_tracking_a_dry_run_keeps_its_plan():
    pipeline = _pipeline(ScriptedRuntime([_ramp(0.0)] * 2), TOY, chunk_transition="rtc")
    pipeline.track_plan = False  # nothing moves the robot: it never follows the plan
    _cycle(pipeline, [0.0, 0.0, 0.04], 10.0, 10.05)
    _cycle(pipeline, [0.0, 0.0, 0.04], 10.6, 10.65)
    assert pipeline.divergences == 0 and pipeline.runtime.prefixes[1] is not None


# -- evaluation: inference delay, motion metrics, rerun logs, the plot -------------------------


def _logged(path, entity: str) -> list[list[float]]:
    """The scalar rows logged at `entity` in a rerun file."""
    from rerun.chunk import RrdReader

    rows = []
    for chunk in RrdReader(str(path)).store().stream().to_chunks():
        if chunk.entity_path == entity and not chunk.is_static:
            batch = chunk.to_record_batch()
            if "Scalars:scalars" in batch.schema.names:
                rows += batch.column("Scalars:scalars").to_pylist()
    return rows


@pytest.mark.slow
def test_evaluate_delays_inference_logs_each_episode_and_reports_motion(tiny_backbones,
                                                                           tmp_path, capsys):
    pytest.importorskip("mujoco", reason="the WidowX MuJoCo backend needs mujoco")
    pytest.importorskip("rerun", reason="rerun logs need rerun-sdk")
    from helpers import save_policy_checkpoint
    from rerun.chunk import RrdReader

    from twinbrain_ros.ros.evaluate import main

    checkpoint = save_policy_checkpoint(tiny_backbones["qwen2_5_vl"], tmp_path / "policy",
                                        Embodiment.load("widowx"))
    out = tmp_path / "eval"
    code = main(["--transport", "inprocess", "--embodiment", "widowx", "--tasks", "pick_cube",
                 "--episodes", "2", "--seed", "3", "--checkpoint", str(checkpoint),
                 "--device", "cpu", "--image-size", "64", "--out", str(out),
                 "--chunk-transition", "rtc", "--inference-delay", "0.5", "--rerun"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "boundary velocity jump" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["loop"]["inference_delay_s"] == 0.5
    for episode in results["episodes"]:
        motion = episode["motion"]
        assert set(motion) >= {"max_acceleration", "max_jerk", "boundary_velocity_jump",
                               "hold_time_s", "boundaries"}
        assert motion["boundaries"] > 0 and motion["max_jerk"] > 0
    assert set(results["summary"]["motion"]) >= {"boundary_velocity_jump", "max_jerk"}
    assert (out / "motion.png").stat().st_size > 10_000
    logs = sorted((out / "rerun").glob("*.rrd"))
    assert [p.name for p in logs] == ["pick_cube_seed3.rrd", "pick_cube_seed4.rrd"]
    paths = set(RrdReader(str(logs[0])).store().schema().entity_paths())
    assert {"/instruction", "/camera/0", "/joints/measured", "/joints/sent", "/chunks/0000",
            "/chunks/0001", "/timing/inference_latency_s",
            "/timing/observation_to_plan_s"} <= paths
    # Every chunk was ready half a second (of simulated time) after its observation.
    delays = [row[0] for row in _logged(logs[0], "/timing/observation_to_plan_s")]
    assert len(delays) >= 2 and np.allclose(delays, 0.5, atol=0.01)


class FailingOnce:
    """A runtime whose second inference fails (the robot holds), then works again."""

    horizon = 8

    def __init__(self):
        self.calls = 0

    def infer(self, observation, prefix=None):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("model exploded")
        return ActionChunk(actions=_ramp(float(observation.state[0])), latency_s=0.01)


class StillRobot:
    """A stand-in robot for the policy loop: a settable clock, joints that stay, what was sent."""

    def __init__(self):
        self.time, self.sent = 2.0, []

    def now(self):
        return self.time

    def observe(self):
        return Snapshot(Observation(images=[np.zeros((4, 4, 3), np.uint8)],
                                    state=np.array([0.0, 0.0, 0.04]), instruction="go"),
                        self.time)

    def measured(self, max_age=None):
        return np.array([0.0, 0.0, 0.04])

    def send(self, trajectory):
        self.sent.append((self.time, trajectory.is_hold))
        return True


def test_the_loop_delays_chunks_and_logs_holds_with_their_cause(tmp_path):
    pytest.importorskip("rerun", reason="rerun logs need rerun-sdk")
    from rerun.chunk import RrdReader

    from twinbrain_ros.policy.cycle_log import CycleLogs
    from twinbrain_ros.policy.loop import PolicyLoop

    # A chunk observed at t is joined into the plan `inference_delay_s` later on the loop's
    # clock; the next cycle starts a replanning period after the last one began. A cycle
    # whose model fails holds at once and is logged as a hold with its cause.
    pipeline = _pipeline(FailingOnce(), TOY)
    robot = StillRobot()
    logs = CycleLogs(TOY.joint_names, path_for=lambda *_: tmp_path / "episode.rrd")
    config = PolicyConfig(inference_delay_s=0.3, actions_per_inference=4)
    loop = PolicyLoop(pipeline, config, robot, logs=logs)
    assert loop.tick() == pytest.approx(2.3) and robot.sent == []   # inferred, not yet due
    robot.time = 2.2
    assert loop.tick() == pytest.approx(2.3) and robot.sent == []
    robot.time = 2.3
    assert loop.tick() == pytest.approx(2.0 + 4 * TOY.dt)           # delivered
    robot.time = 2.0 + 4 * TOY.dt
    assert loop.tick() == pytest.approx(robot.time + TOY.dt)        # failed: retried soon
    loop.close()
    assert robot.sent == [(pytest.approx(2.3), False), (pytest.approx(2.0 + 4 * TOY.dt), True)]
    assert loop.failures == {"inference_error": 1} and loop.holds == 1
    assert loop.last_error == "inference_error: model exploded"
    assert pipeline.latencies[0] == pytest.approx(0.3)
    paths = set(RrdReader(str(tmp_path / "episode.rrd")).store().schema().entity_paths())
    assert {"/events/holds", "/chunks/0000", "/joints/sent", "/camera/0"} <= paths


def test_a_clock_that_goes_back_plans_afresh():
    from twinbrain_ros.policy.loop import PolicyLoop

    # A simulator restarted under a running node: simulated time starts again from zero. The
    # plan and the next cycle's time belong to the old timeline; the loop plans at once.
    reports = []
    robot = StillRobot()
    loop = PolicyLoop(_pipeline(ScriptedRuntime([_ramp(0.0)] * 3), TOY), PolicyConfig(),
                      robot, report=lambda cause, *_: reports.append(cause))
    loop.tick()
    robot.time = 2.0 + TOY.dt
    assert loop.next_due() > robot.time and len(robot.sent) == 1
    robot.time = 0.5
    assert loop.tick() == pytest.approx(0.5 + 4 * TOY.dt)
    assert reports == ["clock_reset"] and [t for t, _ in robot.sent] == [2.0, 0.5]
