"""The newcomer's path: the README's "try the node" commands, run as written (through
`python -m`, without the `ros2` tools), drive a simulated WidowX with a random-weight policy;
the bridge starts no episode before the policy node is ready; entry points give one-line errors
for missing files."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from ros_harness import NodeProcess, RobotSide

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
    commands = [shlex.split(line.replace("/tmp/twinbrain_tiny", str(tmp_path / "tiny")))
                for line in _readme_python_commands()]
    assert [c[:3] for c in commands] == [
        ["python", "-m", "twinbrain_ros.tools.make_tiny_checkpoint"],
        ["python", "-m", "twinbrain_ros.ros.sim_bridge"],
        ["python", "-m", "twinbrain_ros.ros.policy_node"]]
    made = subprocess.run([sys.executable, *commands[0][1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    assert (tmp_path / "tiny" / "policy" / "model.safetensors").is_file()
    robot = RobotSide(WIDOWX, name="newcomer")
    processes = []
    try:
        # The bridge first: it must wait for the policy node instead of starting an episode
        # the policy cannot act in.
        bridge = robot.watch(NodeProcess(tmp_path / "bridge.log", commands[1][2],
                                         commands[1][3:], cwd=ROOT))
        processes.append(bridge)
        bridge.wait_for_text("waiting for the policy node", 120)
        assert "episode 0" not in bridge.text()
        policy = robot.watch(NodeProcess(tmp_path / "policy.log", commands[2][2],
                                         commands[2][3:], cwd=ROOT))
        processes.append(policy)
        robot.spin_until(lambda: robot.controller, 180, "the first trajectory on the arm's "
                         "controller")
        text = bridge.text()
        assert text.index("is ready") < text.index("episode 0")
        codes = [process.stop() for process in reversed(processes)]
    finally:
        for process in reversed(processes):
            process.stop()
        robot.close()
    assert codes == [0, 0], codes


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
    ("twinbrain_ros.tools.make_tiny_checkpoint", ["--policy", "no_such_robot", "--out", "/tmp/x"],
     "make_tiny_checkpoint: "),
])
def test_entry_points_name_a_missing_file_in_one_line(module, args, expected):
    result = _run(module, *args)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0
    assert "Traceback" not in output, output
    assert expected in output, output
