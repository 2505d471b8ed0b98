"""The policy node under fuzz: malformed and extreme messages of every class mixed with a live
robot (see `benchmarks/fuzz_policy_node.py`): 2500 of them per embodiment, 15-30 s."""

from __future__ import annotations

import pytest
from helpers import save_policy_checkpoint

from benchmarks.fuzz_policy_node import run_fuzz
from twinbrain_ros.robot.embodiment import Embodiment

# Serial: the node must plan again within 1 s of the last malformed message.
pytestmark = [pytest.mark.ros, pytest.mark.slow, pytest.mark.serial]


@pytest.mark.parametrize("embodiment", ["gr1", "widowx"])
def test_the_node_survives_fuzz_and_never_leaves_the_limits(ros_env, tiny_backbones, tmp_path,
                                                            embodiment):
    checkpoint = save_policy_checkpoint(tiny_backbones["qwen2_5_vl"], tmp_path / "policy",
                                        Embodiment.load(embodiment))
    result = run_fuzz(embodiment, str(checkpoint), tmp_path / "node.log", messages=2500, seed=1)
    log = (tmp_path / "node.log").read_text()[-4000:]
    assert result["alive"], log
    assert result["malformed_messages"] == 2500 and len(result["by_class"]) == 23, result
    assert result["trajectories"] > 10, result
    assert result["limit_violations"] == 0, result
    assert result["first_point_step_violations"] == 0, result
    assert result["worker_alive"] == "True" and result["worker_restarts"] == 0, result
    assert result["recovery_s"] is not None and result["recovery_s"] <= 1.0, result
    assert result["diagnostics_max_keys"] < 60 and result["diagnostics_max_bytes"] < 4000, result
    assert result["exit_code"] == 0 and result["tracebacks"] == 0, log
