"""The demo's loop, reduced: scripted demonstrations -> training -> closed loop through ROS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mujoco", reason="the demo's simulator (WidowX MuJoCo) needs mujoco")

pytestmark = [pytest.mark.ros, pytest.mark.slow]


def _assert_both_ran_closed_loop(out: Path, cfg, summary: dict) -> list[list[dict]]:
    """Each checkpoint's episodes ran on the held-out seeds and sent trajectories; returns them."""
    runs = []
    for label in ("trained", "untrained"):
        episodes = json.loads((out / f"eval_{label}" / "results.json").read_text())["episodes"]
        assert [e["seed"] for e in episodes] == [cfg.eval_seed + k
                                                 for k in range(cfg.eval_episodes)]
        assert all(e["trajectories"] > 0 and e["steps"] > 0 for e in episodes), episodes
        assert label in summary["success_rate"]
        runs.append(episodes)
    return runs


def test_reduced_demo_trains_and_runs_the_closed_loop_through_ros(ros_env, tmp_path, capsys):
    from twinbrain_ros.demo import DemoConfig, run_demo

    cfg = DemoConfig.quick()
    summary = run_demo(cfg, tmp_path / "demo")
    printed = capsys.readouterr().out

    # Training worked: the flow-matching loss fell.
    assert summary["loss_last_20"] < 0.9 * summary["loss_first_20"], printed

    # Both checkpoints ran closed loop: every episode executed trajectories that the policy
    # node published on the controller topics, received by the sim bridge over ROS.
    _assert_both_ran_closed_loop(tmp_path / "demo", cfg, summary)

    # The outputs a user looks at.
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 0
    assert summary["videos"]
    assert all(Path(v).stat().st_size > 0 for v in summary["videos"])
    assert "time per stage" in printed and "trained: success" in printed


def test_reduced_gr1_demo_trains_and_runs_the_closed_loop_through_ros(ros_env, tmp_path,
                                                                      capsys):
    pytest.importorskip("robosuite", reason="the GR1 demo's simulator needs robosuite")
    from twinbrain_ros.demo import DemoConfig, run_demo

    cfg = DemoConfig.quick("gr1")
    assert cfg.embodiment == "gr1" and cfg.task == "pick_place_can" and cfg.state_dim >= 29
    summary = run_demo(cfg, tmp_path / "demo")
    printed = capsys.readouterr().out
    assert summary["loss_last_20"] < 0.9 * summary["loss_first_20"], printed
    # The 29 joint targets reached the robot over ROS, and each episode says how far it got.
    for episodes in _assert_both_ran_closed_loop(tmp_path / "demo", cfg, summary):
        assert {"lifted", "max_lift_m", "closest_to_target_m"} <= set(episodes[0]["outcome"])
        # The quick run's episodes are cut to 100 control periods (5 s) of the 25 s.
        assert all(e["steps"] == cfg.eval_episode_steps == 100 for e in episodes), episodes
    assert summary["wrong_object_rate"] is None and set(summary["lift_rate"]) == {
        "trained", "untrained"}
    assert "lifted the object" in printed and "pick_place_can" in printed


def test_reduced_simpler_demo_trains_and_runs_simplers_episodes_through_ros(ros_env, tmp_path,
                                                                           capsys):
    import os

    from twinbrain_ros.demo import DemoConfig, run_demo
    from twinbrain_ros.sim import SimError, make_backend

    try:      # the renderer and assets (on CI, .ci/run provides both)
        make_backend("simpler_widowx", task="widowx_carrot_on_plate").close()
    except (SimError, ImportError) as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"simpler_widowx cannot run here: {error}")
    cfg = DemoConfig.quick(simpler=True)
    assert (cfg.backend, cfg.task, cfg.eval_seed) == ("simpler_widowx",
                                                      "widowx_carrot_on_plate", 0)
    summary = run_demo(cfg, tmp_path / "demo")
    printed = capsys.readouterr().out
    assert summary["loss_last_20"] < 0.9 * summary["loss_first_20"], printed
    # Demonstrations came from shifted layouts (seeds from 1000), the evaluation from
    # SimplerEnv's own episodes 0.., each judged after its whole 60 steps.
    for episodes in _assert_both_ran_closed_loop(tmp_path / "demo", cfg, summary):
        assert all(e["steps"] == 60 for e in episodes)
        assert all(e["info"]["protocol"] for e in episodes)
        assert {"grasped", "on_target", "lifted"} <= set(episodes[0]["outcome"])
    assert "SimplerEnv WidowX (Bridge)" in printed and "widowx_carrot_on_plate" in printed
