"""Shared fixtures: tiny random-weight backbone checkpoints made once per test session, and an
isolated ROS 2 environment per test process (see helpers.py and ros_harness.py for helpers)."""

from __future__ import annotations

import os

# One torch thread per test process: the suite runs several processes at once on few cores, and
# torch's default (one thread per core, each process) made a tiny model's chunk 20x slower
# there. Set before torch is imported anywhere, and inherited by the nodes the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from helpers import FAMILIES  # noqa: E402

import twinbrain_ros.sim  # noqa: E402,F401 - chooses MuJoCo's offscreen GL before any test imports it
from twinbrain_ros.model.tiny import make_tiny_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """In a parallel run, the tests marked `slow` first (the longest jobs start early, the
    quick ones fill the gaps at the end); a single process keeps the files' order."""
    if getattr(config.option, "numprocesses", None):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory) -> dict[str, str]:
    """family -> directory of a tiny random-weight HF checkpoint with tokenizer and processor."""
    root = tmp_path_factory.mktemp("backbones")
    return {family: str(make_tiny_checkpoint(family, root / family, seed=0))
            for family in FAMILIES}


@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory):
    """One inductor cache for every compile test of the run, shared by the parallel workers.

    Each test still compiles its own graphs; what they have in common (the generated C++
    headers, the CPU's instruction-set checks, shared kernels) is built once, not per test.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base directory, above each worker's own
    path = root / "inductor"
    path.mkdir(exist_ok=True)
    return path


def _rclpy_works() -> str | None:
    """None when rclpy can init and load message types here, else the reason it cannot."""
    import subprocess
    import sys

    code = ("import rclpy; rclpy.init(); from sensor_msgs.msg import Image; "
            "from trajectory_msgs.msg import JointTrajectory; rclpy.shutdown()")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired:
        return "rclpy.init() timed out"
    if proc.returncode != 0:
        return f"rclpy does not work here: {proc.stderr.strip().splitlines()[-1:]}"
    return None


def _domain_id() -> int:
    """A ROS domain id of this test process's own.

    Under pytest-xdist the workers of one run share a random base (from the run's id) and add
    their index, so that no two of them see each other's nodes; a single process draws one.
    """
    import random

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")
    if worker.startswith("gw") and run:
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        return int(run[:8], 16) % (200 - count) + 1 + int(worker[2:])
    return random.randint(1, 200)


@pytest.fixture(scope="session")
def ros_env(tmp_path_factory):
    """An isolated ROS 2 environment (own domain id, local discovery, temp logs), or a skip."""
    reason = _rclpy_works()
    if reason:
        pytest.skip(reason)
    log_dir = tmp_path_factory.mktemp("ros_log")
    env = {"ROS_DOMAIN_ID": str(_domain_id()),
           "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
           "ROS_LOG_DIR": str(log_dir), "ROS_HOME": str(log_dir)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
