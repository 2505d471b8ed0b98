"""`make demo` runs the policy node (own process, real rclpy) and gets a trajectory back."""

from __future__ import annotations

import pytest

from twinbrain_ros.embodiment import Embodiment


@pytest.mark.ros
@pytest.mark.slow
def test_demo_prints_a_trajectory_from_the_policy_node(ros_env, capsys):
    from twinbrain_ros.demo import run_demo

    assert run_demo(timeout_s=120.0) == 0
    out = capsys.readouterr().out
    joints = Embodiment.load("widowx").joint_names
    assert "joints: " + ", ".join(joints) in out
    rows = [line.split("|") for line in out.splitlines() if line.strip()[:1].isdigit()]
    times = [float(t) for t, _ in rows]
    assert len(times) >= 1 and times == sorted(times) and times[0] > 0
    assert all(len(values.split()) == len(joints) for _, values in rows)
