"""The GR1 robosuite backend: embodiment match, stepping, rendering, seeding, the expert."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("robosuite", reason="the gr1_robosuite backend needs robosuite "
                                        "(pip install --no-deps robosuite==1.5.2)")

from twinbrain_ros.robot.embodiment import Embodiment  # noqa: E402
from twinbrain_ros.sim.base import SimError, make_backend  # noqa: E402
from twinbrain_ros.sim.rollout import run_episode, substeps_per_control  # noqa: E402

HEIGHT, WIDTH = 48, 64
EXPERT_SEEDS = range(10)


@pytest.fixture(scope="module")
def backend():
    sim = make_backend("gr1", image_width=WIDTH, image_height=HEIGHT)
    yield sim
    sim.close()


def hold(sim, targets, seconds):
    for _ in range(round(seconds / sim.sim_dt)):
        sim.step(targets)


def test_backend_matches_the_embodiment(backend):
    emb = Embodiment.load("gr1")
    assert backend.name == "gr1_robosuite" and "pick_place_can" in backend.tasks
    assert backend.embodiment.joint_names == emb.joint_names
    assert emb.state_dim == emb.action_dim == 29
    assert [n for n in emb.joint_names if "_hand_" in n] == [
        f"{side}_hand_{dof}" for side in "lr"
        for dof in ("pinky", "ring", "middle", "index", "thumb_pitch", "thumb_yaw")]
    assert len(backend.camera_names) == len(emb.image_topics) == 1
    # The control period is a whole number of simulator steps.
    assert substeps_per_control(backend) * backend.sim_dt == pytest.approx(emb.dt)


def test_reset_step_render_shapes_and_time(backend):
    episode = backend.reset(0)
    assert backend.time == 0.0
    q, v = backend.joint_state()
    n = backend.embodiment.state_dim
    assert q.shape == v.shape == (n,) and q.dtype == v.dtype == np.float64
    assert np.all(q >= backend.embodiment.lower - 1e-6)
    assert np.all(q <= backend.embodiment.upper + 1e-6)
    frames = backend.render()
    assert len(frames) == 1
    frame = frames[0]
    assert frame.shape == (HEIGHT, WIDTH, 3) and frame.dtype == np.uint8
    assert frame.std() > 10  # a scene, not a blank image
    for _ in range(3):
        backend.step(q)
    assert backend.time == pytest.approx(3 * backend.sim_dt)
    assert episode.max_steps * backend.embodiment.dt >= 15.0
    with pytest.raises(ValueError, match="29 joint targets"):
        backend.step(q[:-1])


def test_seed_decides_the_scene_and_the_instruction(backend):
    first = backend.reset(3)
    can = backend.object_position()
    frame = backend.render()[0]
    other = backend.reset(4)
    assert np.linalg.norm(backend.object_position()[:2] - can[:2]) > 1e-3
    again = backend.reset(3)
    np.testing.assert_allclose(backend.object_position(), can, atol=1e-9)
    np.testing.assert_array_equal(backend.render()[0], frame)
    assert again.instruction == first.instruction
    for episode in (first, other):
        assert "can" in episode.instruction and "left bin" in episode.instruction
        assert episode.info["compartment"] in episode.instruction
        assert episode.task == "pick_place_can"
    assert first.seed == 3 and other.seed == 4


def test_same_seed_same_trajectory(backend):
    finals = []
    for _ in range(2):
        backend.reset(7)
        expert = backend.expert()
        for _ in range(30):
            action = expert.act()
            hold(backend, action, backend.embodiment.dt)
        finals.append(np.concatenate([backend.joint_state()[0], backend.object_position()]))
    np.testing.assert_array_equal(finals[0], finals[1])


def test_joint_targets_are_tracked_and_clipped(backend):
    emb = backend.embodiment
    backend.reset(1)
    q, _ = backend.joint_state()
    targets = q.copy()
    moves = {"r_elbow_pitch": -1.2, "l_shoulder_pitch": -0.4, "torso_waist_yaw": 0.2,
             "r_hand_index": 1.0, "l_hand_thumb_yaw": 0.8}
    index = {name: emb.joint_names.index(name) for name in moves}
    for name, value in moves.items():
        targets[index[name]] = value
    hold(backend, targets, 1.5)
    q, v = backend.joint_state()
    for name, value in moves.items():
        tolerance = 0.1 if "_hand_" in name else 0.02  # the hand drives are soft
        assert q[index[name]] == pytest.approx(value, abs=tolerance), name
    untouched = [i for i, n in enumerate(emb.joint_names)
                 if n not in moves and "_hand_" not in n]
    np.testing.assert_allclose(q[untouched], targets[untouched], atol=0.03)
    assert np.abs(v).max() < 0.5  # settled
    # Targets beyond the limits are clipped: the elbow cannot be straightened past zero.
    elbow = index["r_elbow_pitch"]
    targets[elbow] = 1.5
    hold(backend, targets, 1.0)
    assert backend.joint_state()[0][elbow] <= emb.upper[elbow] + 0.02


def test_unknown_task_is_refused():
    with pytest.raises(SimError, match="no task"):
        make_backend("gr1_robosuite", task="stack_cups")


@pytest.mark.slow
def test_expert_picks_and_places(backend):
    """The scripted expert succeeds on at least 90% of seeds, within the step limits."""
    emb = backend.embodiment
    successes, steps = [], []
    for seed in EXPERT_SEEDS:
        backend.reset(seed)
        assert not backend.success(), f"seed {seed}: success right after reset"
        experts, actions = [], []

        def policy(frames, state, episode, experts=experts, actions=actions):
            if not experts:  # run_episode resets first: plan on the episode's own scene
                experts.append(backend.expert())
            actions.append(experts[0].act())
            return actions[-1]

        record = run_episode(backend, seed, policy=policy, render=False)
        successes.append(record.success)
        steps.append(record.steps)
        assert record.success == backend.success()
        moves = np.abs(np.diff(np.asarray(actions), axis=0))
        assert np.all(moves <= emb.max_step + 1e-9), f"seed {seed}: action jumps past max step"
        assert np.all(np.asarray(actions) >= emb.lower - 1e-9)
        assert np.all(np.asarray(actions) <= emb.upper + 1e-9)
    rate = np.mean(successes)
    assert rate >= 0.9, f"expert success {rate:.0%} over seeds {list(EXPERT_SEEDS)}: {successes}"
    # Success ends the episode early: it was reached well inside the time limit.
    done = [s for s, ok in zip(steps, successes, strict=True) if ok]
    assert max(done) < backend.reset(0).max_steps


def test_outcome_reports_how_far_an_episode_got(backend):
    # The expert lifts the can and brings it to its compartment.
    record = run_episode(backend, 0, render=False)
    assert record.success
    outcome = record.outcome
    assert outcome["lifted"] == "can" and outcome["max_lift_m"] >= 0.05
    assert outcome["closest_to_target_m"] < 0.05
    # Holding still lifts nothing and leaves the can in the other bin.
    backend.reset(0)
    q, _ = backend.joint_state()
    hold(backend, q, 1.0)
    outcome = backend.outcome()
    assert outcome["lifted"] == "" and abs(outcome["max_lift_m"]) < 0.01
    assert outcome["closest_to_target_m"] > 0.2


def test_antialiasing_is_an_option_and_off_by_default():
    frames = {}
    for samples in (0, 4):
        sim = make_backend("gr1", image_width=WIDTH, image_height=HEIGHT, msaa_samples=samples)
        try:
            sim.reset(0)
            frames[samples] = sim.render()[0]
            assert sim.model.vis.quality.offsamples == samples
        finally:
            sim.close()
    assert frames[0].shape == frames[4].shape == (HEIGHT, WIDTH, 3)
    # Multisampling blends the edges: the same scene, a few pixels different.
    changed = np.any(frames[0] != frames[4], axis=-1).mean()
    assert 0 < changed < 0.5, changed
    with pytest.raises(SimError, match="msaa_samples"):
        make_backend("gr1", msaa_samples=-1)
