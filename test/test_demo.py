"""`make demo` runs the policy node (own process, real rclpy) and gets a trajectory back."""

from __future__ import annotations

import pytest


@pytest.mark.ros
@pytest.mark.slow
def test_demo_prints_a_trajectory_from_the_policy_node(ros_env, capsys):
    from twinbrain_ros.demo import WIDOWX_JOINTS, run_demo

    assert run_demo(timeout_s=120.0) == 0
    out = capsys.readouterr().out
    assert "JointTrajectory with 8 points" in out
    assert "joints: " + ", ".join(WIDOWX_JOINTS) in out
    rows = [line for line in out.splitlines() if line.strip().startswith(("0.", "1."))]
    times = [float(line.split("|")[0]) for line in rows]
    assert times == sorted(times) and len(times) == 8
    assert all(abs(t - 0.2 * (i + 1)) < 1e-6 for i, t in enumerate(times))
