"""launch/policy.launch.py, loaded and resolved by ROS 2's own `launch` and `launch_ros`.

These run where a ROS 2 install (Jazzy, or Humble) is sourced and skip elsewhere: `launch` and
`launch_ros` are not on PyPI (PyPI's `launch` is an unrelated package, so the check looks for
ROS's `launch.LaunchDescription` rather than for any module named `launch`).

`FindPackageShare` and `ExecutableInPackage` read the ament index, so each test builds its own
install prefix (the package marker, the config files, `lib/twinbrain_ros/policy_node`) and puts
it first on AMENT_PREFIX_PATH.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml
from ros_harness import NodeProcess

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "policy.launch.py"
SIM_LAUNCH_FILE = REPO / "launch" / "sim.launch.py"
PACKAGE = "twinbrain_ros"


def _missing_ros_launch() -> str | None:
    """None when ROS 2's launch and launch_ros are importable here, else why not."""
    try:
        import launch
    except Exception as error:  # any failure means "not usable here"
        return f"ROS 2's `launch` is not installed ({error}); source a ROS 2 Jazzy install"
    if not hasattr(launch, "LaunchDescription"):
        # e.g. only this repo's launch/ folder (a namespace package on pytest's pythonpath),
        # or PyPI's unrelated `launch`.
        where = getattr(launch, "__file__", None) or list(getattr(launch, "__path__", []))
        return (f"ROS 2's `launch` is not installed (`import launch` found {where}, which has "
                "no LaunchDescription); source a ROS 2 Jazzy install")
    try:
        import launch_ros.actions  # noqa: F401
        import launch_ros.parameter_descriptions  # noqa: F401
    except Exception as error:
        return f"ROS 2's `launch_ros` is not importable ({error}); source a ROS 2 Jazzy install"
    return None


MISSING = _missing_ros_launch()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture
def prefix(tmp_path, monkeypatch) -> Path:
    """An install prefix of twinbrain_ros, as colcon or `pip install .` lays it out."""
    root = tmp_path / "install"
    index = root / "share" / "ament_index" / "resource_index" / "packages"
    index.mkdir(parents=True)
    (index / PACKAGE).write_text("")
    shutil.copytree(REPO / "config", root / "share" / PACKAGE / "config")
    shutil.copytree(REPO / "launch", root / "share" / PACKAGE / "launch")
    # What setup.cfg's install_scripts puts there; runs this checkout's node.
    (root / "lib" / PACKAGE).mkdir(parents=True)
    for node in ("policy_node", "sim_bridge"):
        executable = root / "lib" / PACKAGE / node
        executable.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m twinbrain_ros.ros.{node} '
                              '"$@"\n')
        executable.chmod(0o755)
    paths = [str(root)] + [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep)
                           if p]
    monkeypatch.setenv("AMENT_PREFIX_PATH", os.pathsep.join(paths))
    # launch_ros writes each parameter dict to a temporary file that it never deletes.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return root


def _launch_description():
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    description = PythonLaunchDescriptionSource(
        str(LAUNCH_FILE)).try_get_launch_description_without_context()
    assert description is not None
    return description


def _node_command(node, context) -> list[str]:
    """The node's command line as `ros2 launch` would run it, without starting the process.

    launch_ros has no public call for this. `Node._perform_substitutions` (protected; launch_ros's
    own tests use it, in Humble and Jazzy alike) is what `Node.execute` runs before starting the
    process: it evaluates the name and the parameters (a dict becomes a temporary YAML file) and
    appends them to the public `cmd`. The `__node:=`/`__ns:=` placeholders are filled the way
    `execute` fills them. This is the only place that touches non-public launch_ros API.
    """
    from launch.utilities import perform_substitutions

    node._perform_substitutions(context)
    context.extend_locals({"ros_specific_arguments": {
        "name": "__node:=" + node.node_name.rsplit("/", 1)[-1],
        "ns": f"__ns:={node.expanded_node_namespace}"}})
    return [perform_substitutions(context, part) for part in node.cmd]


def _resolve(**arguments: str):
    """Include policy.launch.py as `ros2 launch ... name:=value` does; return the node's cmd."""
    commands = _resolve_all(LAUNCH_FILE, **arguments)
    assert len(commands) == 1, "the launch file starts exactly one node"
    return commands[0]


def _resolve_all(launch_file: Path, **arguments: str) -> list[list[str]]:
    """Include a launch file as `ros2 launch` does; the command of every node it starts."""
    from launch.actions import IncludeLaunchDescription
    from launch.launch_context import LaunchContext
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    from launch_ros.actions import Node

    context = LaunchContext()
    include = IncludeLaunchDescription(PythonLaunchDescriptionSource(str(launch_file)),
                                       launch_arguments=list(arguments.items()))
    commands = []
    pending = [include]
    while pending:  # depth first, in launch order; a Node is resolved, never executed
        entity = pending.pop(0)
        condition = getattr(entity, "condition", None)
        if condition is not None and not condition.evaluate(context):
            continue
        if isinstance(entity, Node):
            commands.append(_node_command(entity, context))
            continue
        pending[:0] = list(entity.visit(context) or [])
    return commands


def _params_files(command: list[str]) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == "--params-file"]


def _overrides(path: str) -> dict:
    """The ros__parameters of the YAML file launch_ros writes for the parameter dict."""
    document = yaml.safe_load(Path(path).read_text())
    assert len(document) == 1
    return next(iter(document.values()))["ros__parameters"]


def test_declared_arguments_and_defaults():
    from launch.launch_context import LaunchContext
    from launch.utilities import perform_substitutions

    arguments = {a.name: a for a in _launch_description().get_launch_arguments()}
    assert list(arguments) == ["embodiment", "checkpoint", "backbone_path", "release_protocol",
                               "params_file", "server", "server_token_file", "device",
                               "use_sim_time", "enable_actuation"]
    assert all(a.description.strip() for a in arguments.values())
    defaults = {name: perform_substitutions(LaunchContext(), a.default_value)
                for name, a in arguments.items() if name != "params_file"}
    assert defaults == {"embodiment": "widowx", "checkpoint": "", "backbone_path": "",
                        "release_protocol": "true", "server": "",
                        "server_token_file": "", "device": "auto", "use_sim_time": "false",
                        "enable_actuation": "false"}
    assert list(arguments["embodiment"].choices) == ["widowx", "gr1"]
    for path in (REPO / "config" / "widowx.yaml", REPO / "config" / "gr1.yaml"):
        assert path.is_file()


def test_default_params_file_is_the_installed_widowx_config(prefix):
    command = _resolve()
    assert command[0] == str(prefix / "lib" / PACKAGE / "policy_node")
    assert "__node:=policy_node" in command
    files = _params_files(command)
    assert files[0] == str(prefix / "share" / PACKAGE / "config" / "widowx.yaml")
    assert _overrides(files[1]) == {"checkpoint": "", "backbone_path": "",
                                    "release_protocol": True, "server": "",
                                    "server_token_file": "",
                                    "device": "auto", "use_sim_time": False,
                                    "enable_actuation": False}


def test_gr1_arguments_reach_the_node_typed(prefix):
    command = _resolve(embodiment="gr1", checkpoint="/tmp/ck", enable_actuation="true",
                       use_sim_time="true", device="cpu")
    files = _params_files(command)
    assert len(files) == 2  # the embodiment file first, the overrides last (they win)
    assert files[0].endswith(os.path.join("share", PACKAGE, "config", "gr1.yaml"))
    assert yaml.safe_load(Path(files[0]).read_text())["policy_node"]["ros__parameters"][
        "embodiment"] == "gr1"
    overrides = _overrides(files[1])
    assert overrides == {"checkpoint": "/tmp/ck", "backbone_path": "", "release_protocol": True,
                         "server": "", "server_token_file": "",
                         "device": "cpu", "use_sim_time": True, "enable_actuation": True}
    assert overrides["enable_actuation"] is True and overrides["use_sim_time"] is True


def test_numeric_looking_checkpoint_stays_a_string(prefix):
    command = _resolve(checkpoint="00123", enable_actuation="False")
    overrides = _overrides(_params_files(command)[1])
    assert overrides["checkpoint"] == "00123"
    assert overrides["enable_actuation"] is False


def test_params_file_argument_replaces_the_default(prefix, tmp_path):
    custom = tmp_path / "my_robot.yaml"
    shutil.copy(REPO / "config" / "gr1.yaml", custom)
    assert _params_files(_resolve(params_file=str(custom)))[0] == str(custom)


@pytest.mark.parametrize("name,value", [("embodiment", "ur5"), ("enable_actuation", "maybe")])
def test_invalid_arguments_are_refused_before_the_node_starts(prefix, name, value):
    with pytest.raises(Exception) as error:
        _resolve(**{name: value})
    assert value in str(error.value)


@pytest.mark.ros
def test_rclpy_applies_the_overrides_over_the_params_file(prefix, ros_env):
    """The node's own parameter parsing: launch overrides beat the file's enable_actuation."""
    import rclpy
    from rclpy.context import Context
    from rclpy.node import Node

    command = _resolve(embodiment="gr1", checkpoint="1234", enable_actuation="true",
                       use_sim_time="true", device="cpu")
    context = Context()
    rclpy.init(args=command, context=context)
    try:
        node = Node("policy_node", context=context,
                    automatically_declare_parameters_from_overrides=True)
        values = {name: node.get_parameter(name).value for name in
                  ("embodiment", "checkpoint", "device", "use_sim_time", "enable_actuation")}
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    assert values == {"embodiment": "gr1", "checkpoint": "1234", "device": "cpu",
                      "use_sim_time": True, "enable_actuation": True}


_RUN_LAUNCH = textwrap.dedent("""
    import sys
    from launch.launch_service import LaunchService
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    service = LaunchService()
    service.include_launch_description(IncludeLaunchDescription(
        PythonLaunchDescriptionSource(sys.argv[1]),
        launch_arguments=[tuple(a.split(":=", 1)) for a in sys.argv[2:]]))
    sys.exit(service.run())
""")


def launch_process(tmp_path: Path, *arguments: str, launch_file: Path = LAUNCH_FILE
                   ) -> NodeProcess:
    """`ros2 launch twinbrain_ros policy.launch.py ARGS` through launch.LaunchService."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return NodeProcess(tmp_path / "launch.log", None,
                       ["-c", _RUN_LAUNCH, str(launch_file), *arguments], env=env,
                       name="ros2 launch", cwd=REPO)


@pytest.mark.ros
@pytest.mark.slow
def test_launch_without_checkpoint_fails_clearly(prefix, ros_env, tmp_path):
    run = launch_process(tmp_path)
    try:
        run.wait_for_text("process has died", 120)
    finally:
        run.stop(timeout=30)
    text = run.text()
    assert "parameter 'checkpoint' is required" in text, text
    assert "exit code 1" in text, text


@pytest.mark.ros
@pytest.mark.slow
def test_launch_starts_the_node_with_typed_arguments(prefix, ros_env, tmp_path, tiny_backbones):
    from helpers import save_policy_checkpoint

    from twinbrain_ros.robot.embodiment import Embodiment

    checkpoint = save_policy_checkpoint(tiny_backbones["qwen2_5_vl"], tmp_path / "ckpt",
                                        Embodiment.load("gr1"))
    run = launch_process(tmp_path, "embodiment:=gr1", f"checkpoint:={checkpoint}",
                         "device:=cpu", "enable_actuation:=true", "use_sim_time:=true")
    try:
        run.wait_for_text("policy node ready", 180)
    finally:
        code = run.stop(timeout=30)
    text = run.text()
    assert "embodiment gr1" in text and "ACTUATION ENABLED on" in text, text
    assert code == 0, text


# -- sim.launch.py: the sim bridge and the policy node ---------------------------------------


def _sim_launch(**arguments: str) -> dict[str, list[str]]:
    commands = _resolve_all(SIM_LAUNCH_FILE, **arguments)
    return {Path(c[0]).name: c for c in commands}


def test_sim_launch_starts_the_bridge_and_an_actuated_sim_time_policy_node(prefix):
    nodes = _sim_launch(embodiment="gr1", task="pick_place_can", checkpoint="/tmp/ck",
                        seed="7", image_size="128", real_time_factor="2")
    assert sorted(nodes) == ["policy_node", "sim_bridge"]
    bridge = _overrides(_params_files(nodes["sim_bridge"])[0])
    assert bridge["embodiment"] == "gr1" and bridge["task"] == "pick_place_can"
    assert bridge["seed"] == 7 and bridge["image_width"] == 128 and bridge["image_height"] == 128
    assert bridge["real_time_factor"] == 2.0 and bridge["expert"] is False
    assert bridge["wait_for_policy"] is True   # no episode before the policy is ready
    files = _params_files(nodes["policy_node"])
    assert files[0].endswith(os.path.join("share", PACKAGE, "config", "gr1.yaml"))
    assert _overrides(files[1]) == {"checkpoint": "/tmp/ck", "server": "",
                                    "backbone_path": "", "release_protocol": True,
                                    "server_token_file": "", "device": "auto",
                                    "use_sim_time": True, "enable_actuation": True}


def test_sim_launch_with_the_expert_starts_no_policy_node(prefix):
    nodes = _sim_launch(expert="true")
    assert list(nodes) == ["sim_bridge"]
    bridge = _overrides(_params_files(nodes["sim_bridge"])[0])
    assert bridge["expert"] is True and bridge["wait_for_policy"] is False


@pytest.mark.ros
@pytest.mark.slow
def test_sim_launch_runs_an_expert_episode(prefix, ros_env, tmp_path):
    pytest.importorskip("mujoco", reason="the WidowX MuJoCo backend needs mujoco")
    run = launch_process(tmp_path, "expert:=true", "image_size:=64", "real_time_factor:=4.0",
                         launch_file=SIM_LAUNCH_FILE)
    try:
        run.wait_for_text("ended: success", 180)
    finally:
        run.stop(timeout=30)


@pytest.mark.ros
@pytest.mark.slow
def test_sim_launch_with_a_policy_starts_the_first_episode_once_it_is_ready(prefix, ros_env,
                                                                           tmp_path):
    pytest.importorskip("mujoco", reason="the WidowX MuJoCo backend needs mujoco")
    from twinbrain_ros.tools.make_tiny_checkpoint import make_tiny_policy

    checkpoint = make_tiny_policy("widowx", tmp_path / "tiny")
    run = launch_process(tmp_path, "task:=pick_cube", f"checkpoint:={checkpoint}",
                         "image_size:=64", "real_time_factor:=4.0", "device:=cpu",
                         launch_file=SIM_LAUNCH_FILE)
    try:
        run.wait_for_text("episode 0 ended", 240)
    finally:
        run.stop(timeout=30)
    text = run.text()
    assert text.index("policy node ready") < text.index("episode 0:"), text
    assert text.index("is ready") < text.index("episode 0:"), text


def test_server_argument_makes_the_node_a_client(prefix):
    overrides = _overrides(_params_files(_resolve(server="gpu-box:8765"))[1])
    assert overrides["server"] == "gpu-box:8765" and overrides["checkpoint"] == ""
