"""Launch the TwinBrainVLA policy node for one embodiment.

    ros2 launch twinbrain_ros policy.launch.py embodiment:=widowx checkpoint:=/path/to/ckpt
    ros2 launch twinbrain_ros policy.launch.py embodiment:=gr1 checkpoint:=/path/to/ckpt
        device:=cuda enable_actuation:=true    (one command line)
    ros2 launch twinbrain_ros policy.launch.py embodiment:=widowx server:=gpu-box:8765
        (the model runs on a policy server; this machine needs no torch)
    ros2 launch twinbrain_ros policy.launch.py --show-args

Parameters come from `params_file` (by default the package's `config/<embodiment>.yaml`), then
the launch arguments below override `checkpoint`, `backbone_path`, `release_protocol`,
`server`, `server_token_file`, `device`, `use_sim_time` and `enable_actuation`. Without
`checkpoint` or `server` the node exits with "parameter 'checkpoint' is required". Trajectories
go to the dry-run topic unless `enable_actuation:=true`.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, TextSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = "twinbrain_ros"


def generate_launch_description():
    embodiment = LaunchConfiguration("embodiment")
    return LaunchDescription([
        DeclareLaunchArgument(
            "embodiment", default_value="widowx", choices=["widowx", "gr1"],
            description="robot: widowx (WidowX 250, Bridge) or gr1 (Fourier GR1 with hands)"),
        DeclareLaunchArgument(
            "checkpoint", default_value="",
            description="checkpoint directory: TwinBrainVLA, or a released starVLA run "
                        "(required unless server is given)"),
        DeclareLaunchArgument(
            "backbone_path", default_value="",
            description="base Qwen-VL directory, overriding the one the checkpoint names (for a "
                        "released starVLA run: the base model's config, tokenizer and "
                        "processor)"),
        DeclareLaunchArgument(
            "release_protocol", default_value="true",
            description="with a released checkpoint, run its authors' loop settings (one "
                        "action per inference, adaptive ensembling); false keeps params_file's"),
        DeclareLaunchArgument(
            "params_file",
            # <share>/twinbrain_ros/config/<embodiment>.yaml
            default_value=[PathJoinSubstitution([FindPackageShare(PACKAGE), "config", embodiment]),
                           TextSubstitution(text=".yaml")],
            description="policy_node parameter file (embodiment description and defaults)"),
        DeclareLaunchArgument(
            "server", default_value="",
            description="HOST:PORT of a policy server (ros2 run twinbrain_ros policy_server) to "
                        "send observations to instead of loading a checkpoint"),
        DeclareLaunchArgument(
            "server_token_file", default_value="",
            description="file with the token the policy server requires"),
        DeclareLaunchArgument(
            "device", default_value="auto",
            description="torch device: auto, cpu, cuda or cuda:N"),
        DeclareLaunchArgument(
            "use_sim_time", default_value="false",
            description="use the /clock topic (simulation) instead of the wall clock"),
        DeclareLaunchArgument(
            "enable_actuation", default_value="false",
            description="publish to the robot's controller topics; false publishes every "
                        "trajectory to the dry-run topic instead"),
        Node(
            package=PACKAGE,
            executable="policy_node",
            name="policy_node",
            output="screen",
            emulate_tty=True,
            parameters=[
                LaunchConfiguration("params_file"),
                {
                    "checkpoint": ParameterValue(LaunchConfiguration("checkpoint"),
                                                 value_type=str),
                    "backbone_path": ParameterValue(LaunchConfiguration("backbone_path"),
                                                    value_type=str),
                    "release_protocol": ParameterValue(LaunchConfiguration("release_protocol"),
                                                       value_type=bool),
                    "server": ParameterValue(LaunchConfiguration("server"), value_type=str),
                    "server_token_file": ParameterValue(LaunchConfiguration("server_token_file"),
                                                        value_type=str),
                    "device": ParameterValue(LaunchConfiguration("device"), value_type=str),
                    "use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"),
                                                   value_type=bool),
                    "enable_actuation": ParameterValue(LaunchConfiguration("enable_actuation"),
                                                       value_type=bool),
                },
            ],
        ),
    ])
