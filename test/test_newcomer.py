"""The newcomer's path: the README's "try the node" commands, run as written (through
`python -m`, without the `ros2` tools), drive a simulated WidowX with a random-weight policy;
the bridge starts no episode before the policy node is ready; entry points give one-line errors
for missing files."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import stop_process_group

from twinbrain_ros.robot.embodiment import Embodiment

ROOT = Path(__file__).resolve().parents[1]
WIDOWX = Embodiment.load("widowx")


def _readme_python_commands() -> list[str]:
    """The `python -m` block of the README's "Try the node in two minutes" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Try the node in two minutes", 1)[1].split("\n## ", 1)[0]
    block = section.split("Without the `ros2` command-line tools", 1)[1]
    block = block.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_commands_drive_the_simulated_robot(ros_env, tmp_path):
    pytest.importorskip("mujoco", reason="the WidowX MuJoCo backend needs mujoco")
    import rclpy
    from trajectory_msgs.msg import JointTrajectory

    commands = [shlex.split(line.replace("/tmp/twinbrain_tiny", str(tmp_path / "tiny")))
                for line in _readme_python_commands()]
    assert [c[:3] for c in commands] == [
        ["python", "-m", "twinbrain_ros.model.tiny"],
        ["python", "-m", "twinbrain_ros.ros.sim_bridge"],
        ["python", "-m", "twinbrain_ros.ros.policy_node"]]
    made = subprocess.run([sys.executable, *commands[0][1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    assert (tmp_path / "tiny" / "policy" / "model.safetensors").is_file()
    env = {**os.environ, **ros_env}
    logs = {name: tmp_path / f"{name}.log" for name in ("bridge", "policy")}
    rclpy.init()
    node = rclpy.create_node("newcomer")
    received = []
    node.create_subscription(JointTrajectory, WIDOWX.trajectory_topic, received.append, 10)
    processes = []
    try:
        # The bridge first: it must wait for the policy node instead of starting an episode
        # the policy cannot act in.
        with open(logs["bridge"], "w") as out:
            processes.append(subprocess.Popen([sys.executable, *commands[1][1:]], cwd=ROOT,
                                              env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + 120
        while "waiting for the policy node" not in logs["bridge"].read_text():
            assert time.monotonic() < deadline, logs["bridge"].read_text()
            assert processes[0].poll() is None, logs["bridge"].read_text()
            time.sleep(0.2)
        assert "episode 0" not in logs["bridge"].read_text()
        with open(logs["policy"], "w") as out:
            processes.append(subprocess.Popen([sys.executable, *commands[2][1:]], cwd=ROOT,
                                              env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + 180
        while not received and time.monotonic() < deadline:
            for process, log in zip(processes, logs.values(), strict=True):
                assert process.poll() is None, log.read_text()
            rclpy.spin_once(node, timeout_sec=0.1)
        assert received, logs["policy"].read_text() + logs["bridge"].read_text()
        bridge = logs["bridge"].read_text()
        assert bridge.index("is ready") < bridge.index("episode 0")
    finally:
        for process in reversed(processes):
            stop_process_group(process, 20)
        node.destroy_node()
        rclpy.shutdown()
    assert all(p.returncode == 0 for p in processes), [p.returncode for p in processes]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize(("module", "args", "expected"), [
    ("twinbrain_ros.train", ["--config", "/nonexistent/train.yaml"],
     "train: cannot read the training config /nonexistent/train.yaml"),
    ("twinbrain_ros.train", ["--config", "config/train.yaml"],
     "train: backbone_path is required"),
    ("twinbrain_ros.tools.bag_to_dataset", ["/nonexistent/bag", "--out", "/tmp/x",
                                            "--embodiment", "widowx"],
     "bag_to_dataset: "),
    ("twinbrain_ros.ros.evaluate", ["--transport", "inprocess", "--tasks", "pick_cube",
                                    "--checkpoint", "/nonexistent/checkpoint"],
     "evaluate: "),
    ("twinbrain_ros.serving.server", ["--checkpoint", "/nonexistent/checkpoint"],
     "policy_server: "),
    ("twinbrain_ros.model.tiny", ["--policy", "no_such_robot", "--out", "/tmp/x"],
     "make_tiny_checkpoint: "),
])
def test_entry_points_name_a_missing_file_in_one_line(module, args, expected):
    result = _run(module, *args)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0
    assert "Traceback" not in output, output
    assert expected in output, output
