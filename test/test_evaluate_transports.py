"""`evaluate --transport inprocess` runs the policy node's code without ROS and agrees with the
ROS path, seed for seed (episodes cut to 20 control periods by `--episode-steps`)."""

from __future__ import annotations

import json

import pytest
from helpers import save_policy_checkpoint

from twinbrain_ros.robot.embodiment import Embodiment

pytest.importorskip("mujoco", reason="the WidowX MuJoCo backend needs mujoco")
pytestmark = [pytest.mark.ros, pytest.mark.slow]


def test_inprocess_and_ros_evaluations_give_the_same_outcome_per_seed(ros_env, tiny_backbones,
                                                                       tmp_path, capsys):
    from twinbrain_ros.ros.evaluate import main

    checkpoint = save_policy_checkpoint(tiny_backbones["qwen2_5_vl"], tmp_path / "policy",
                                        Embodiment.load("widowx"))
    results = {}
    for transport in ("inprocess", "ros"):
        out = tmp_path / transport
        code = main(["--transport", transport, "--embodiment", "widowx", "--tasks", "pick_cube",
                     "--episodes", "3", "--seed", "20", "--checkpoint", str(checkpoint),
                     "--device", "cpu", "--image-size", "64", "--out", str(out),
                     "--real-time-factor", "2", "--episode-steps", "20"])
        printed = capsys.readouterr().out
        assert code == 0, printed
        assert f"({transport})" in printed
        results[transport] = json.loads((out / "results.json").read_text())
    inprocess, ros = results["inprocess"]["episodes"], results["ros"]["episodes"]
    assert [e["seed"] for e in inprocess] == [e["seed"] for e in ros] == [20, 21, 22]
    for a, b in zip(inprocess, ros, strict=True):
        assert a["instruction"] == b["instruction"]
        assert a["success"] == b["success"] and a["steps"] == b["steps"]
        assert a["steps"] == 20 or a["success"]  # --episode-steps ends the episode
        assert a["outcome"]["lifted"] == b["outcome"]["lifted"]
        # Both moved the robot with the policy's trajectories.
        assert a["trajectories"] > 0 and b["trajectories"] > 0
        assert len(a["final_state"]) == len(b["final_state"]) == 7
    assert results["inprocess"]["config"]["transport"] == "inprocess"


def test_inprocess_evaluation_refuses_running_nodes(tmp_path):
    from twinbrain_ros.evaluation.config import EvaluationConfig

    with pytest.raises(ValueError, match="--policy external needs --transport ros"):
        EvaluationConfig(tasks=["pick_cube"], policy="external", transport="inprocess")
