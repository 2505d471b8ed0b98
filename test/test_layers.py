"""The package's shape, as its design states it: imports point down, files stay readable.

Every import counts, at module level or inside a function: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "twinbrain_ros"

# What each room may import from the package (itself included). Lower rooms first.
ALLOWED = {
    "errors": set(),
    "progress": set(),
    "transforms": {"errors"},
    "robot": {"transforms", "errors"},
    "model": {"transforms", "errors", "progress"},
    "data": {"robot", "transforms", "errors", "progress"},
    "sim": {"data", "robot", "transforms", "errors", "progress"},
    "policy": {"model", "robot", "transforms", "errors"},
    "serving": {"policy", "model", "robot", "transforms", "errors"},
    "evaluation": {"policy", "sim", "model", "data", "robot", "transforms", "errors"},
    "training": {"model", "data", "robot", "transforms", "errors", "progress"},
}
ROS_MODULES = {"rclpy", "rcl_interfaces", "sensor_msgs", "std_msgs", "trajectory_msgs",
               "diagnostic_msgs", "std_srvs", "builtin_interfaces", "rosgraph_msgs"}
TORCH_FREE = {"transforms", "robot", "errors", "progress"}
MAX_LINES = 600
MAX_NODE_LINES = 450


def _room(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported twinbrain_ros room or third-party top-level module, line) of every import."""
    found = []
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
                names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            found += [(name, node.lineno) for name in names]
    return found


def _arrows() -> list[tuple[str, str, str, int]]:
    """(room, imported room or module, file, line) for every import in the package."""
    arrows = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = _room(path)
        for name, line in _imports(path):
            parts = name.split(".")
            target = parts[1] if parts[0] == "twinbrain_ros" and len(parts) > 1 else parts[0]
            if parts[0] == "twinbrain_ros" and len(parts) > 1:
                target = "twinbrain_ros." + target
            arrows.append((room, target, str(path.relative_to(ROOT)), line))
    return arrows


def test_imports_point_down_between_the_rooms():
    wrong = [f"{file}:{line}: {room}/ imports {target[len('twinbrain_ros.'):]}/"
             for room, target, file, line in _arrows()
             if room in ALLOWED and target.startswith("twinbrain_ros.")
             and target[len("twinbrain_ros."):] not in ALLOWED[room] | {room}]
    assert not wrong, "\n".join(wrong)


def test_only_ros_imports_rclpy_and_message_types():
    wrong = [f"{file}:{line}: {target}" for room, target, file, line in _arrows()
             if target in ROS_MODULES and room not in ("ros", "tools")]
    assert not wrong, "\n".join(wrong)


def test_the_numpy_rooms_import_no_torch():
    wrong = [f"{file}:{line}: {target}" for room, target, file, line in _arrows()
             if room in TORCH_FREE and target in ("torch", "transformers")]
    assert not wrong, "\n".join(wrong)


def test_the_client_side_imports_no_torch_at_import_time(tmp_path):
    """The remote client and the node's modules load in a Python where torch is missing."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no torch here')\n")
    code = ("import twinbrain_ros.serving.client, twinbrain_ros.serving.runtimes, "
            "twinbrain_ros.policy.loop, twinbrain_ros.policy.pipeline, "
            "twinbrain_ros.transforms, twinbrain_ros.robot.embodiment")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_files_stay_readable_in_one_sitting():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        limit = MAX_NODE_LINES if path.name == "policy_node.py" else MAX_LINES
        if lines > limit:
            long.append(f"{path.relative_to(ROOT)}: {lines} lines (at most {limit})")
    assert not long, "\n".join(long)
