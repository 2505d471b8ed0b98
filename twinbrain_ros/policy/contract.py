"""What a policy promises a robot, and the check that they fit (no torch, no ROS).

A checkpoint records, per embodiment key, the robot it was trained for (`EmbodimentSpec`); a
policy server sends the same as a plain dict in its handshake. `check_contract` compares either
with the robot's `Embodiment`, with one message for both: the policy node refuses to start
against a local checkpoint or a server that does not fit.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, is_dataclass

import numpy as np

from ..robot.embodiment import Embodiment

CONTRACT_FIELDS = ("state_dim", "action_dim", "action_space", "state_space", "robot",
                   "joint_names", "action_names", "num_cameras", "control_rate_hz")


@dataclass
class ActionChunk:
    """The model's answer to one observation."""

    actions: np.ndarray        # (horizon, action_dim) in raw units
    latency_s: float           # model time for this chunk (round trip for a remote policy)
    frozen: int | None = None  # rtc: the prefix actions held fixed (None: sampled unguided)


def spec_dict(spec) -> dict:
    """An `EmbodimentSpec` (or a contract dict) as a plain dict of the contract fields."""
    data = asdict(spec) if is_dataclass(spec) else dict(spec)
    return {key: data.get(key) for key in CONTRACT_FIELDS}


def check_contract(specs: dict, embodiment: Embodiment, source: str, warn=None):
    """The spec of the embodiment among `specs` ({key: spec}); a ValueError says what differs.

    Sizes and spaces must match; so must the joint names and their order, the action names, the
    number of cameras and the control rate where the spec records them. A spec that predates
    those records is accepted with a warning (`warn(text)`, default `warnings.warn`).

    Args:
        specs: embodiment key -> `EmbodimentSpec` or contract dict.
        embodiment: the robot.
        source: what the specs come from ("checkpoint DIR", "policy server HOST:PORT").
        warn: where the warning goes.
    """
    key = embodiment.normalization_key
    if key not in specs:
        raise ValueError(f"{source} has no embodiment {key!r} (the normalization_key of "
                         f"{embodiment.name}); it has {sorted(specs)}")
    spec = specs[key]
    data = spec_dict(spec)
    wanted = {"action_space": embodiment.action_space, "state_space": embodiment.state_space,
              "action_dim": embodiment.action_dim, "state_dim": embodiment.state_dim}
    found = {name: data[name] for name in wanted}
    recorded = {"joint_names": (list(data["joint_names"] or []), list(embodiment.joint_names)),
                "action_names": (list(data["action_names"] or []), embodiment.action_names),
                "num_cameras": (data["num_cameras"] or 0, len(embodiment.image_topics)),
                "control_rate_hz": (data["control_rate_hz"] or 0.0,
                                    float(embodiment.control_rate_hz))}
    for name, (theirs, ours) in recorded.items():
        if theirs:
            found[name], wanted[name] = theirs, ours
    if found != wanted:
        diff = {k: (found[k], wanted[k]) for k in wanted if found[k] != wanted[k]}
        raise ValueError(f"{source} does not fit embodiment {embodiment.name}: "
                         f"({source.split()[0]}, embodiment) differ in {diff}")
    if not data["joint_names"]:
        text = (f"{source} records no joint names for {key!r} (written by an older version): "
                f"the order of {embodiment.name}'s joints is not checked")
        if warn is None:
            warnings.warn(text, stacklevel=2)
        else:
            warn(text)
    return spec
