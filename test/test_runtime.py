"""The policy runtime refuses a checkpoint whose action or state space differs."""

from __future__ import annotations

import dataclasses

import pytest

from twinbrain_ros.model.twinbrain import EmbodimentSpec
from twinbrain_ros.policy.runtime import check_compatible, resolve_device
from twinbrain_ros.robot.embodiment import Embodiment


def test_matching_spec_is_returned():
    widowx = Embodiment.load("widowx")
    spec = widowx.spec()
    assert spec.joint_names == widowx.joint_names and spec.num_cameras == 1
    assert spec.action_names == ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
    assert check_compatible({"widowx": spec}, widowx, "ck") is spec


def test_a_robot_with_reordered_or_renamed_joints_is_refused():
    gr1 = Embodiment.load("gr1")
    spec = gr1.spec()
    reordered = dataclasses.replace(gr1, joint_names=gr1.joint_names[1:] + gr1.joint_names[:1])
    with pytest.raises(ValueError, match="differ in .*'joint_names'"):
        check_compatible({"gr1": spec}, reordered, "ck")
    renamed = dataclasses.replace(gr1, joint_names=["left_" + n for n in gr1.joint_names],
                                  grasp_joints=["left_" + n for n in gr1.grasp_joints])
    with pytest.raises(ValueError, match="'joint_names'.*'action_names'"):
        check_compatible({"gr1": spec}, renamed, "ck")
    two_cameras = dataclasses.replace(gr1, image_topics=["/a", "/b"])
    with pytest.raises(ValueError, match=r"'num_cameras': \(1, 2\)"):
        check_compatible({"gr1": spec}, two_cameras, "ck")


def test_an_older_checkpoint_without_names_loads_with_a_warning():
    gr1 = Embodiment.load("gr1")
    old = EmbodimentSpec(state_dim=gr1.state_dim, action_dim=gr1.action_dim)
    with pytest.warns(UserWarning, match="records no joint names"):
        assert check_compatible({"gr1": old}, gr1, "ck") is old


def test_action_space_mismatch_is_named():
    widowx = Embodiment.load("widowx")
    joint_space = EmbodimentSpec(state_dim=7, action_dim=7, action_space="joint_position")
    with pytest.raises(ValueError, match=r"'action_space': \('joint_position', 'ee_delta'\)"):
        check_compatible({"widowx": joint_space}, widowx, "ck")


def test_missing_key_and_sizes_are_named():
    gr1 = Embodiment.load("gr1")
    with pytest.raises(ValueError, match="has no embodiment 'gr1'"):
        check_compatible({"widowx": EmbodimentSpec(7, 7)}, gr1, "ck")
    with pytest.raises(ValueError, match=r"'state_dim': \(16, 29\)"):
        check_compatible({"gr1": EmbodimentSpec(16, 29)}, gr1, "ck")


def test_cuda_request_without_cuda_is_an_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
