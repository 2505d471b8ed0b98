"""The policy runtime refuses a checkpoint whose action or state space differs."""

from __future__ import annotations

import pytest

from twinbrain_ros.embodiment import Embodiment
from twinbrain_ros.model.twinbrain import EmbodimentSpec
from twinbrain_ros.policy.runtime import check_compatible, resolve_device


def test_matching_spec_is_returned():
    widowx = Embodiment.load("widowx")
    spec = EmbodimentSpec(state_dim=7, action_dim=7, action_space="ee_delta")
    assert check_compatible({"widowx": spec}, widowx, "ck") is spec


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
