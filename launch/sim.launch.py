"""Launch a simulated robot (sim bridge) and the TwinBrainVLA policy node driving it.

    ros2 launch twinbrain_ros sim.launch.py embodiment:=widowx task:=pick_cube checkpoint:=DIR
    ros2 launch twinbrain_ros sim.launch.py embodiment:=gr1 task:=pick_place_can checkpoint:=DIR
    ros2 launch twinbrain_ros sim.launch.py embodiment:=widowx expert:=true   (no policy node)
    ros2 launch twinbrain_ros sim.launch.py --show-args

The bridge publishes simulated time on /clock and the policy node uses it; the policy node's
actuation is enabled (the simulated controllers are its only listeners). The policy node is
started by including `policy.launch.py`: its wiring exists once. Episodes: the first starts
once the policy node reports ready on /policy/ready (its model loaded; the bridge logs while it
waits), later ones on `/sim/reset` (see `twinbrain_ros.ros.sim_bridge`) or automatically with
`auto_reset:=true`; `ros2 run twinbrain_ros evaluate --policy external` runs a success-rate
evaluation against these nodes.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.conditions import UnlessCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import (
    LaunchConfiguration,
    PathJoinSubstitution,
    PythonExpression,
    TextSubstitution,
    ThisLaunchFileDir,
)
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = "twinbrain_ros"


def _typed(name: str, value_type):
    return ParameterValue(LaunchConfiguration(name), value_type=value_type)


def generate_launch_description():
    embodiment = LaunchConfiguration("embodiment")
    arguments = [
        ("embodiment", "widowx", "robot: widowx (WidowX 250, MuJoCo) or gr1 (Fourier GR1, "
                                 "robosuite)"),
        ("task", "", "task of the simulator backend (empty: its first task)"),
        ("backend", "", "simulator backend (empty: the embodiment's CPU default)"),
        ("checkpoint", "", "TwinBrainVLA checkpoint directory (required unless expert:=true)"),
        ("device", "auto", "policy node torch device: auto, cpu, cuda or cuda:N"),
        ("expert", "false", "drive the robot with the task's scripted expert instead of the "
                            "policy node"),
        ("seed", "0", "seed of the first episode (later episodes add one)"),
        ("image_size", "224", "camera image width and height in pixels"),
        ("real_time_factor", "1.0", "simulated seconds per wall-clock second"),
        ("auto_reset", "false", "start the next episode as soon as one ends"),
        ("start_episode", "true", "start the first episode on launch"),
    ]
    declared = [DeclareLaunchArgument(name, default_value=default, description=description)
                for name, default, description in arguments]
    declared.append(DeclareLaunchArgument(
        "params_file",
        default_value=[PathJoinSubstitution([FindPackageShare(PACKAGE), "config", embodiment]),
                       TextSubstitution(text=".yaml")],
        description="policy_node parameter file (embodiment description and defaults)"))
    bridge = Node(
        package=PACKAGE,
        executable="sim_bridge",
        name="sim_bridge",
        output="screen",
        emulate_tty=True,
        parameters=[{
            "embodiment": _typed("embodiment", str),
            "task": _typed("task", str),
            "backend": _typed("backend", str),
            "expert": _typed("expert", bool),
            "seed": _typed("seed", int),
            "image_width": _typed("image_size", int),
            "image_height": _typed("image_size", int),
            "real_time_factor": _typed("real_time_factor", float),
            "auto_reset": _typed("auto_reset", bool),
            "start_episode": _typed("start_episode", bool),
            # A policy node is started unless the expert drives: the first episode waits until
            # it has loaded its model.
            "wait_for_policy": ParameterValue(
                PythonExpression(["'", LaunchConfiguration("expert"),
                                  "'.lower() not in ('true', '1')"]), value_type=bool),
        }],
    )
    policy = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(PathJoinSubstitution([ThisLaunchFileDir(),
                                                            "policy.launch.py"])),
        launch_arguments={
            "embodiment": embodiment,
            "checkpoint": LaunchConfiguration("checkpoint"),
            "params_file": LaunchConfiguration("params_file"),
            "device": LaunchConfiguration("device"),
            "use_sim_time": "true",
            "enable_actuation": "true",
        }.items(),
        condition=UnlessCondition(LaunchConfiguration("expert")),
    )
    return LaunchDescription([*declared, bridge, policy])
