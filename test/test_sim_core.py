"""Simulation core: trajectory execution like a controller, the backend registry, recording."""

from __future__ import annotations

import numpy as np
import pytest

from twinbrain_ros.evaluation.results import format_table, summarize
from twinbrain_ros.sim.follower import TrajectoryError, TrajectoryFollower

NAMES = ["a", "b", "gripper"]


@pytest.fixture
def follower():
    return TrajectoryFollower(NAMES, lower=[-1, -1, 0], upper=[1, 1, 0.04],
                              position=[0.0, 0.0, 0.02])


def test_holds_the_start_position_until_a_trajectory_arrives(follower):
    np.testing.assert_allclose(follower.sample(5.0), [0.0, 0.0, 0.02])


def test_interpolates_linearly_from_the_commanded_position(follower):
    follower.receive(["a", "b"], [0.2, 0.4], [[0.2, -0.2], [0.4, -0.4]], start_time=1.0, now=1.0)
    np.testing.assert_allclose(follower.sample(1.1), [0.1, -0.1, 0.02])
    np.testing.assert_allclose(follower.sample(1.3), [0.3, -0.3, 0.02])
    np.testing.assert_allclose(follower.sample(9.0), [0.4, -0.4, 0.02])  # holds the last point


def test_subsets_of_joints_are_independent(follower):
    follower.receive(["a", "b"], [1.0], [[0.5, 0.5]], start_time=0.0, now=0.0)
    follower.receive(["gripper"], [0.5], [[0.04]], start_time=0.25, now=0.25)
    # the gripper trajectory does not interrupt the arm's
    np.testing.assert_allclose(follower.sample(0.5), [0.25, 0.25, 0.03])
    np.testing.assert_allclose(follower.sample(1.0), [0.5, 0.5, 0.04])


def test_a_new_trajectory_replaces_the_old_one_without_a_jump(follower):
    follower.receive(["a", "b"], [1.0], [[1.0, 1.0]], start_time=0.0, now=0.0)
    follower.receive(["a"], [1.0], [[-0.5]], start_time=0.5, now=0.5)
    np.testing.assert_allclose(follower.sample(0.5)[0], 0.5)      # continues from 0.5
    np.testing.assert_allclose(follower.sample(1.0)[0], 0.0)      # halfway to -0.5
    np.testing.assert_allclose(follower.sample(1.0)[1], 1.0)      # b keeps its trajectory


def test_points_in_the_past_are_skipped_and_limits_clip(follower):
    kept = follower.receive(["a"], [0.1, 0.2, 0.3], [[0.1], [0.2], [5.0]], start_time=0.0,
                            now=0.15)
    assert kept == 2
    np.testing.assert_allclose(follower.sample(1.0)[0], 1.0)      # 5.0 clipped to the limit


@pytest.mark.parametrize("names, times, positions, match", [
    (["a", "nope"], [0.1], [[0, 0]], "unknown joints"),
    (["a"], [0.1, 0.1], [[0], [0]], "strictly increasing"),
    (["a"], [0.1], [[np.nan]], "non-finite"),
    (["a", "b"], [0.1], [[0.0]], "positions"),
    (["a"], [0.1], [[0.0]], "in the past"),
])
def test_bad_trajectories_are_refused_and_the_robot_holds(follower, names, times, positions,
                                                          match):
    now = 10.0 if match == "in the past" else 0.0
    with pytest.raises(TrajectoryError, match=match):
        follower.receive(names, times, positions, start_time=0.0, now=now)
    np.testing.assert_allclose(follower.sample(20.0), [0.0, 0.0, 0.02])


def test_summary_is_avg_at_n_over_tasks():
    episodes = ([{"task": "pick", "success": s} for s in (True, True, False, True)]
                + [{"task": "place", "success": s} for s in (False, False, True, False)])
    summary = summarize(episodes)
    assert summary["tasks"]["pick"]["success_rate"] == 0.75
    assert summary["tasks"]["place"]["successes"] == 1
    assert summary["average"] == pytest.approx(0.5)
    table = format_table(summary)
    assert "75.0%" in table and "50.0%" in table and "Avg@4" in table


def test_unknown_backends_and_tasks_are_named():
    from twinbrain_ros.sim import SimError, backend_names, make_backend

    with pytest.raises(SimError, match="unknown simulation backend 'gazebo'"):
        make_backend("gazebo")
    assert {"widowx_mujoco", "gr1_robosuite"} <= set(backend_names())


def test_a_missing_simulator_names_what_to_install(monkeypatch):
    import builtins

    from twinbrain_ros.sim import make_backend

    real_import = builtins.__import__

    def no_mujoco(name, *args, **kwargs):
        if name == "mujoco" or name.startswith("mujoco."):
            raise ModuleNotFoundError("No module named 'mujoco'", name="mujoco")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "twinbrain_ros.sim.widowx_mujoco",
                        raising=False)
    monkeypatch.setattr(builtins, "__import__", no_mujoco)
    with pytest.raises(ImportError, match=r"pip install mujoco==3\.3\.7"):
        make_backend("widowx", task="pick_cube")


def test_recorded_demonstrations_are_a_lerobot_dataset(tmp_path):
    pytest.importorskip("mujoco", reason="the WidowX MuJoCo backend needs mujoco")
    from twinbrain_ros.data.lerobot import LeRobotDataset
    from twinbrain_ros.robot.embodiment import Embodiment
    from twinbrain_ros.sim.record import record_demonstrations

    report = record_demonstrations(tmp_path / "demos", "widowx", ["pick_cube"], episodes=2,
                                   seed=5, image_size=64, progress=False)
    assert report.recorded == 2 and report.failed_seeds == []
    widowx = Embodiment.load("widowx")
    dataset = LeRobotDataset(tmp_path / "demos", horizon=4, embodiment=widowx)
    assert dataset.version == "v3.0"  # LeRobot's current format unless asked otherwise
    assert dataset.num_episodes == 2 and len(dataset) == report.frames
    sample = dataset[0]
    assert sample["images"][0].shape == (64, 64, 3)
    assert sample["state"].shape == (widowx.state_dim,)
    assert sample["actions"].shape == (4, widowx.action_dim)        # Bridge deltas + gripper
    assert sample["instruction"].startswith("pick up the ") and "cube" in sample["instruction"]
    # The first action of an episode moves towards the cube with the gripper open.
    assert sample["actions"][0, 6] == 1.0


def test_recording_in_two_processes_writes_the_same_dataset(tmp_path):
    pytest.importorskip("mujoco", reason="the WidowX MuJoCo backend needs mujoco")
    from twinbrain_ros.data.lerobot import LeRobotDataset
    from twinbrain_ros.robot.embodiment import Embodiment
    from twinbrain_ros.sim.record import record_demonstrations

    widowx = Embodiment.load("widowx")
    datasets = []
    for workers in (1, 2):
        report = record_demonstrations(tmp_path / f"demos{workers}", "widowx",
                                       ["pick_cube", "put_cube_on_plate"], episodes=2, seed=3,
                                       image_size=32, progress=False, workers=workers)
        assert report.recorded == 4 and report.failed_seeds == []
        datasets.append(LeRobotDataset(tmp_path / f"demos{workers}", horizon=2,
                                       embodiment=widowx))
    one, two = datasets
    assert len(one) == len(two) and one.num_episodes == two.num_episodes == 4
    # Episodes in seed order, task after task, whatever process ran them.
    for index in range(0, len(one), 7):
        a, b = one[index], two[index]
        assert a["instruction"] == b["instruction"]
        np.testing.assert_array_equal(a["state"], b["state"])
        np.testing.assert_array_equal(a["actions"], b["actions"])
        np.testing.assert_array_equal(a["images"][0], b["images"][0])
    with pytest.raises(ValueError, match="workers"):
        record_demonstrations(tmp_path / "none", "widowx", ["pick_cube"], episodes=1,
                              workers=0, progress=False)


def test_the_command_moves_no_faster_than_the_velocity_limit():
    follower = TrajectoryFollower(NAMES, lower=[-1, -1, 0], upper=[1, 1, 0.04],
                                  position=[0.0, 0.0, 0.02], max_velocity=[0.5, 2.0, 0.01])
    follower.reset([0.0, 0.0, 0.02], now=0.0)
    # A trajectory that jumps: every joint to its limit within 10 ms.
    follower.receive(NAMES, [0.01], [[1.0, -1.0, 0.0]], start_time=0.0, now=0.0)
    commands = [follower.advance(t) for t in np.arange(1, 201) * 0.01]
    steps = np.abs(np.diff(np.vstack([[0.0, 0.0, 0.02], commands]), axis=0))
    assert np.all(steps <= np.array([0.5, 2.0, 0.01]) * 0.01 + 1e-12)
    np.testing.assert_allclose(commands[49], [0.25, -1.0, 0.015])   # 0.5 s in
    np.testing.assert_allclose(commands[-1], [1.0, -1.0, 0.0], atol=1e-12)  # reached
    # Built without a reset, the first command holds (no elapsed time to move in).
    fresh = TrajectoryFollower(NAMES, lower=[-1, -1, 0], upper=[1, 1, 0.04],
                               position=[0.0, 0.0, 0.02], max_velocity=[0.5, 2.0, 0.01])
    fresh.receive(NAMES, [0.01], [[1.0, -1.0, 0.0]], start_time=0.0, now=0.0)
    np.testing.assert_allclose(fresh.advance(5.0), [0.0, 0.0, 0.02])
    np.testing.assert_allclose(fresh.advance(5.1), [0.05, -0.2, 0.019])
    # A new trajectory continues from the lagging command, not from where the old one was.
    follower.reset([0.0, 0.0, 0.02], now=0.0)
    follower.receive(["a"], [0.01], [[1.0]], start_time=0.0, now=0.0)
    lagging = [follower.advance(t) for t in (0.1, 0.2)][-1][0]
    follower.receive(["a"], [1.0], [[lagging]], start_time=0.2, now=0.2)
    assert abs(follower.advance(0.21)[0] - lagging) < 1e-9
