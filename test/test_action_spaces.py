"""Action spaces: one owner per convention, encode and decode side by side."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from twinbrain_ros.robot.embodiment import Embodiment, EmbodimentError

WIDOWX = Embodiment.load("widowx")
GR1 = Embodiment.load("gr1")


def test_names_sizes_and_binary_dims_come_from_the_action_space():
    assert WIDOWX.action_names == ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
    assert WIDOWX.action_dim == 7 and WIDOWX.binary_action_dims == [6]
    assert GR1.action_names == GR1.joint_names and GR1.action_dim == GR1.state_dim
    assert GR1.binary_action_dims == []


def test_joint_position_actions_are_the_targets_both_ways():
    rng = np.random.default_rng(0)
    states = rng.uniform(GR1.lower, GR1.upper, (5, GR1.state_dim))
    targets = rng.uniform(GR1.lower, GR1.upper, (5, GR1.state_dim))
    actions = GR1.actions.encode(states, targets)
    np.testing.assert_array_equal(actions, targets)
    np.testing.assert_array_equal(GR1.actions.decode(actions, states[0]), targets)


def test_rpy_pair_are_inverses():
    pytest.importorskip("pinocchio", reason="kinematics needs pin")
    from twinbrain_ros.robot.kinematics import rotation_to_rpy, rpy_matrix

    rng = np.random.default_rng(1)
    for roll, pitch, yaw in rng.uniform([-3.1, -1.5, -3.1], [3.1, 1.5, 3.1], (200, 3)):
        np.testing.assert_allclose(rotation_to_rpy(rpy_matrix(roll, pitch, yaw)),
                                   [roll, pitch, yaw], atol=1e-9)


def test_end_effector_deltas_encode_then_decode_to_the_same_joint_targets():
    pytest.importorskip("pinocchio", reason="kinematics needs pin")
    space = WIDOWX.actions
    home = np.array([0.0, -0.38, 0.55, 0.0, 1.40, 0.0, 0.037])
    # A short reachable motion, one step at a time, the gripper closing half way.
    steps = np.array([[0.02, -0.03, 0.04, 0.01, -0.05, 0.03, 0.0]] * 4)
    states = [home]
    for k in range(4):
        states.append(states[-1] + steps[k] * [1, 1, 1, 1, 1, 1, 0])
    states = np.array(states)
    states[3:, 6] = 0.015
    actions = space.encode(states[:-1], states[1:])
    assert actions.shape == (4, 7)
    np.testing.assert_array_equal(actions[:, 6], [1, 1, 0, 0])
    for k in range(4):
        target = space.decode(actions[k:k + 1], states[k])[0]
        np.testing.assert_allclose(target[:6], states[k + 1][:6], atol=1e-4)
        assert target[6] == (WIDOWX.gripper_open_position if k < 2
                             else WIDOWX.gripper_closed_position)


def test_the_kinematics_model_is_named_by_the_description():
    assert WIDOWX.kinematics == "interbotix_wx250s"
    with pytest.raises(EmbodimentError, match="kinematics model"):
        dataclasses.replace(WIDOWX, kinematics="")
    with pytest.raises(ValueError, match="unknown kinematics model 'nope'"):
        dataclasses.replace(WIDOWX, kinematics="nope").actions.kinematics  # noqa: B018


def test_an_embodiment_with_built_kinematics_still_pickles():
    pytest.importorskip("pinocchio", reason="kinematics needs pin")
    embodiment = Embodiment.load("widowx")
    embodiment.actions.kinematics  # noqa: B018 - Pinocchio objects do not pickle
    copy = pickle.loads(pickle.dumps(embodiment))
    assert copy == embodiment and copy.action_dim == 7
