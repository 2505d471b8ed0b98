"""Chunk scheduling (latency compensation, blending) and the safety filter."""

from __future__ import annotations

import numpy as np
import pytest

from twinbrain_ros.policy.safety import SafetyFilter
from twinbrain_ros.policy.scheduler import ActionChunkScheduler, Plan

DT = 0.1


def _ramp(start, slope, steps):
    return (start + slope * DT * np.arange(1, steps + 1))[:, None]


def test_actions_in_the_past_are_dropped():
    scheduler = ActionChunkScheduler(DT, blend_steps=0)
    chunk = _ramp(0.0, 1.0, 8)
    plan = scheduler.merge(chunk, observation_time=10.0, now=10.25)
    # Actions for 10.1 and 10.2 have passed; the plan starts with the one for 10.3.
    np.testing.assert_allclose(plan.times, 10.0 + DT * np.arange(3, 9))
    np.testing.assert_allclose(plan.positions, chunk[2:])
    assert scheduler.merge(chunk, observation_time=10.0, now=11.0) is None


def test_new_chunk_is_blended_into_the_executing_plan():
    scheduler = ActionChunkScheduler(DT, blend_steps=3)
    scheduler.commit(Plan(10.0 + DT * np.arange(1, 9), _ramp(0.0, 1.0, 8)))
    # A new chunk that disagrees by an offset of 0.5 everywhere.
    new = _ramp(0.2, 1.0, 8) + 0.5
    plan = scheduler.merge(new, observation_time=10.2, now=10.25)
    old_at = np.array([scheduler.plan.position_at(t) for t in plan.times[:3]])
    # The first point is mostly old plan, the offset fades in over blend_steps points.
    offsets = (plan.positions[:3] - old_at)[:, 0]
    weights = 0.5 - 0.5 * np.cos(np.pi * np.arange(1, 4) / 4)
    np.testing.assert_allclose(offsets, 0.5 * weights)
    np.testing.assert_allclose(plan.positions[3:], new[3:])


def test_switch_is_continuous_in_position_and_velocity():
    def switch(blend_steps):
        scheduler = ActionChunkScheduler(DT, blend_steps=blend_steps)
        scheduler.commit(Plan(DT * np.arange(1, 17), np.sin(np.arange(1, 17) * DT)[:, None]))
        now = 0.45
        start = scheduler.commanded_position(now)
        # The next chunk, observed at 0.4, is off by 0.05: blending must hide it at the switch.
        second = np.sin(0.4 + np.arange(1, 17) * DT)[:, None] + 0.05
        scheduler.commit(scheduler.merge(second, observation_time=0.4, now=now))
        traj = scheduler.trajectory(["j"], now, start)
        first_time = now + traj.time_from_start[0]
        position_jump = abs(traj.positions[0, 0] - np.sin(first_time))
        velocity_jump = abs(traj.velocities[0, 0] - np.cos(first_time))
        return traj, position_jump, velocity_jump

    traj, position_jump, velocity_jump = switch(blend_steps=3)
    _, raw_position_jump, raw_velocity_jump = switch(blend_steps=0)
    # Without blending the 0.05 offset appears at once; with it, a fraction of it, spread out.
    assert raw_position_jump > 0.04 and position_jump < 0.2 * 0.05
    assert velocity_jump < 0.25 * raw_velocity_jump
    assert np.all(np.diff(traj.time_from_start) > 0) and traj.time_from_start[0] > 0


def test_safety_clips_limits_and_steps():
    safety = SafetyFilter(lower=[-1.0, -1.0], upper=[1.0, 1.0], max_step=[0.1, 0.5], dt=DT)
    plan = Plan(np.array([0.1, 0.2, 0.3]), np.array([[0.5, 2.0], [0.5, 2.0], [0.5, 2.0]]))
    safe = safety.apply(plan, start_time=0.0, start_position=np.zeros(2))
    np.testing.assert_allclose(safe.positions[:, 0], [0.1, 0.2, 0.3])
    np.testing.assert_allclose(safe.positions[:, 1], [0.5, 1.0, 1.0])


def test_safety_refuses_non_finite_targets():
    safety = SafetyFilter(lower=[-1.0], upper=[1.0], max_step=[1.0], dt=DT)
    with pytest.raises(ValueError, match="non-finite"):
        safety.apply(Plan(np.array([0.1]), np.array([[np.nan]])), 0.0, np.zeros(1))


def test_a_controller_spline_through_the_published_points_never_leaves_the_limits():
    """ros2_control's trajectory controller fits cubics through positions and velocities."""
    from scipy.interpolate import CubicHermiteSpline

    from twinbrain_ros.policy.scheduler import Trajectory  # noqa: F401 - the published type

    upper = 1.6057
    safety = SafetyFilter(lower=[-2.1], upper=[upper], max_step=[0.3], dt=0.2)
    rng = np.random.default_rng(0)
    cases = [np.array([upper - 0.05, upper + 0.5, upper + 0.5, upper - 0.3])]
    cases += [upper + rng.normal(0, 0.3, 8) for _ in range(300)]
    for targets in cases:
        scheduler = ActionChunkScheduler(0.2, blend_steps=0)
        plan = scheduler.merge(targets[:, None], observation_time=0.0, now=0.01)
        start = np.array([upper - 0.1])
        plan = safety.apply(plan, 0.01, start)
        scheduler.commit(plan)
        traj = scheduler.trajectory(["elbow"], 0.01, start)
        times = np.concatenate([[0.0], traj.time_from_start])
        points = np.vstack([start, traj.positions])[:, 0]
        slopes = np.concatenate([[0.0], traj.velocities[:, 0]])
        spline = CubicHermiteSpline(times[1:], points[1:], slopes[1:])
        samples = spline(np.linspace(times[1], times[-1], 400))
        assert samples.max() <= upper + 1e-9, targets
        assert traj.velocities[-1, 0] == 0.0
