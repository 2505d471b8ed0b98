"""Embodiment descriptions in config/: one per robot, read by every layer."""

from __future__ import annotations

import pytest
import yaml

from twinbrain_ros.robot.embodiment import Embodiment, EmbodimentError, config_dir


@pytest.mark.parametrize("name, action_space, joints", [("widowx", "ee_delta", 7),
                                                        ("gr1", "joint_position", 29)])
def test_shipped_descriptions_load(name, action_space, joints):
    emb = Embodiment.load(name)
    assert emb.name == name and emb.action_space == action_space
    assert emb.state_dim == joints
    assert emb.action_dim == (7 if action_space == "ee_delta" else joints)
    assert (emb.lower < emb.upper).all()
    assert emb.normalization_key == name


def test_widowx_is_the_wx250s_with_its_controller_topic():
    emb = Embodiment.load("widowx")
    assert emb.joint_names[:6] == ["waist", "shoulder", "elbow", "forearm_roll", "wrist_angle",
                                   "wrist_rotate"]
    assert emb.trajectory_topic == "/wx250s/arm_controller/joint_trajectory"
    assert emb.control_rate_hz == 5.0


def _write(tmp_path, **overrides):
    params = yaml.safe_load((config_dir() / "gr1.yaml").read_text())
    params["policy_node"]["ros__parameters"].update(overrides)
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_inconsistent_descriptions_are_named(tmp_path):
    with pytest.raises(EmbodimentError, match="joint_lower_limits has 2 values for 29 joints"):
        Embodiment.from_yaml(_write(tmp_path, joint_lower_limits=[0.0, 1.0]))
    with pytest.raises(EmbodimentError, match="action_space 'torque'"):
        Embodiment.from_yaml(_write(tmp_path, action_space="torque"))
    with pytest.raises(EmbodimentError, match="gripper_joint 'hand'"):
        Embodiment.from_yaml(_write(tmp_path, gripper_joint="hand"))
    with pytest.raises(EmbodimentError, match="does not exist"):
        Embodiment.from_yaml(tmp_path / "absent.yaml")
    (tmp_path / "flat.yaml").write_text("joint_names: [a]\n")
    with pytest.raises(EmbodimentError, match="policy_node: ros__parameters"):
        Embodiment.from_yaml(tmp_path / "flat.yaml")
