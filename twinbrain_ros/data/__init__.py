"""Datasets: LeRobot formats (v2.1, v3.0), rosbag2 conversion, normalization statistics.

Nothing here imports ROS or the model's torch code. The names below are loaded on first use so
that `import twinbrain_ros.data.rosbag` does not pull in pyarrow or PyAV.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DatasetError": "lerobot",
    "LeRobotDataset": "lerobot",
    "LeRobotWriter": "lerobot",
    "compute_norm_stats": "stats",
    "DatasetMixture": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import `lerobot` / `stats` lazily when one of their names is first used."""
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
