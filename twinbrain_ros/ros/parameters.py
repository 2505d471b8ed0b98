"""Node parameters, declared as ros2_controllers declares them.

Typed, described, with ranges and read-only flags. A node's table maps each name to a `Param`
(default, description, optional range, whether it may change at run time). The embodiment's
parameters are not retyped: they are derived from the fields of
`twinbrain_ros.robot.embodiment.Embodiment` (type, description from its docstring, read-only),
and declared without a default, so a missing one is an error that names it.
"""

from __future__ import annotations

import re
import typing
from dataclasses import MISSING, dataclass, fields

from ..policy.config import PolicyConfig, settings
from ..robot.embodiment import Embodiment, EmbodimentError


@dataclass(frozen=True)
class Param:
    """One node parameter: default, description, (low, high) range, run-time changeable."""

    default: object
    description: str
    range: tuple[float, float] | None = None
    dynamic: bool = False


def descriptor(name: str, param: Param | None = None, *, description: str = "",
               read_only: bool = True):
    """A `ParameterDescriptor` with the range and read-only flag of `param`."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    text = param.description if param is not None else description
    result = ParameterDescriptor(name=name, description=text,
                                 read_only=read_only if param is None else not param.dynamic)
    if param is not None and param.range is not None:
        low, high = param.range
        if isinstance(param.default, bool):
            pass
        elif isinstance(param.default, int):
            result.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=0)]
        elif isinstance(param.default, float):
            result.floating_point_range = [FloatingPointRange(from_value=float(low),
                                                              to_value=float(high), step=0.0)]
    return result


def declare_parameters(node, table: dict[str, Param]) -> dict:
    """Declare a node's parameters; returns {name: value}.

    Values outside a parameter's range are refused by rclpy, at start-up (from a params file
    or the command line) and at run time (`ros2 param set`), with the range in the message.
    """
    values = {}
    for name, param in table.items():
        node.declare_parameter(name, param.default, descriptor(name, param))
        values[name] = node.get_parameter(name).value
    return values


def _field_descriptions() -> dict[str, str]:
    """Descriptions of the Embodiment fields, from the 'Attributes:' section of its docstring."""
    doc = Embodiment.__doc__ or ""
    section = doc.split("Attributes:", 1)[-1]
    found: dict[str, str] = {}
    for match in re.finditer(r"^\s{8}([\w, ]+):\s*(.*?)(?=^\s{8}[\w, ]+:|\Z)", section,
                             re.M | re.S):
        text = " ".join(match.group(2).split())
        for name in match.group(1).split(","):
            found[name.strip()] = text
    return found


def declare_embodiment(node) -> Embodiment:
    """Declare the embodiment's parameters (all read-only) and build it from their values.

    The parameter `embodiment` holds the `name` field; every other field keeps its name.

    Raises:
        ValueError: a required one is missing or the description is inconsistent; the message
            says to pass the embodiment's params file.
    """
    from rclpy.exceptions import ParameterUninitializedException
    from rclpy.parameter import Parameter

    kinds = {str: Parameter.Type.STRING, float: Parameter.Type.DOUBLE,
             int: Parameter.Type.INTEGER, bool: Parameter.Type.BOOL,
             list[str]: Parameter.Type.STRING_ARRAY, list[float]: Parameter.Type.DOUBLE_ARRAY}
    hints = typing.get_type_hints(Embodiment)
    descriptions = _field_descriptions()
    values = {}
    for f in fields(Embodiment):
        name = "embodiment" if f.name == "name" else f.name
        kind = kinds[hints[f.name]]
        text = descriptions.get(f.name, "")
        required = f.default is MISSING and f.default_factory is MISSING
        text = f"{text} (embodiment description{', required' if required else ''})"
        node.declare_parameter(name, kind, descriptor(name, description=text))
        try:
            values[name] = node.get_parameter(name).value
        except ParameterUninitializedException:
            pass  # optional ones keep the Embodiment default, required ones are named
    try:
        return Embodiment.from_parameters(values)
    except EmbodimentError as error:
        raise ValueError(f"{error}: pass the embodiment's params file "
                         "(--params-file config/<embodiment>.yaml)") from error


def params_of(config_class) -> dict[str, Param]:
    """The parameters of a settings dataclass (`twinbrain_ros.policy.config.setting` fields)."""
    return {item.name: Param(item.default, item.description, item.range, item.dynamic)
            for item in settings(config_class)}


# The policy node's own parameters (the loop's come from `PolicyConfig`).
_NODE_ONLY = {
    "checkpoint": Param("", "checkpoint directory: TwinBrainVLA, or a released starVLA run "
                            "(required unless 'server' is given)"),
    "release_protocol": Param(True, "with a released checkpoint, run its authors' loop "
                                    "settings (actions_per_inference 1, chunk_transition "
                                    "ensemble, ensemble_horizon 7, ensemble_alpha 0.1) instead "
                                    "of the ones set here"),
    "server": Param("", "HOST:PORT of a policy server to send observations to instead of "
                        "loading a checkpoint (this process then imports no torch)"),
    "server_token_file": Param("", "file with the token the policy server requires"),
    "server_timeout_s": Param(1.0, "a reply later than this is given up (the robot holds)",
                              (0.01, 60.0)),
    "image_transport": Param("jpeg", "how camera frames travel to the server: jpeg or png "
                                     "(lossless)"),
    "jpeg_quality": Param(90, "JPEG quality of the frames sent to the server", (1, 100)),
    "backbone_path": Param("", "override of the base Qwen-VL directory stored in the checkpoint"),
    "device": Param("auto", "torch device: auto, cpu, cuda or cuda:N (bf16 on CUDA)"),
    "inference": Param("auto", "auto (compiled on CUDA, eager on the CPU), eager, or compiled "
                               "(static shapes and torch.compile, warmed up before the node "
                               "reports ready; a compile failure falls back to eager)"),
    "seed": Param(-1, "seed of the flow-matching noise; -1 draws fresh noise every chunk",
                  (-1, 2**31 - 1)),
    "enable_actuation": Param(False, "publish to the controller topics; false sends every "
                                     "trajectory to dry_run_topic instead (may be changed at "
                                     "run time; turning it off holds the robot first)",
                              dynamic=True),
    "ask_max_new_tokens": Param(64, "longest answer to a question on ~/ask, in tokens",
                                (1, 4096)),
    "ask_tokens_per_slice": Param(8, "most answer tokens generated between two inference "
                                     "cycles (fewer when the time to the next cycle is short; "
                                     "the prompt pass is one slice)", (1, 4096)),
    "max_question_tokens": Param(256, "longest question on ~/ask in tokens; longer ones get an "
                                      "error answer", (1, 8192)),
    "ask_timeout_s": Param(120.0, "with a policy server: how long to wait for its answer",
                           (0.1, 3600.0)),
    "max_instruction_tokens": Param(128, "longest instruction in tokens of the checkpoint's "
                                         "tokenizer; longer ones are rejected", (1, 8192)),
    "stamp_trajectories": Param(False, "stamp trajectories with the plan's start time instead "
                                       "of zero (zero means 'start now' to the controller)"),
    "stall_timeout_s": Param(10.0, "a cycle still running after this long (wall clock; at "
                                   "least 3 replanning periods plus the p95 latency) is "
                                   "reported at ERROR and the robot holds", (0.1, 3600.0)),
    "input_silence_s": Param(2.0, "an input topic with a matched publisher but no message for "
                                  "this long (wall clock) gets its subscription recreated",
                             (0.1, 3600.0)),
    "diagnostics_period_s": Param(1.0, "period of /diagnostics messages", (0.01, 60.0)),
}

NODE_PARAMETERS: dict[str, Param] = {**params_of(PolicyConfig), **_NODE_ONLY}


def parameter_table(table: dict[str, Param] | None = None) -> str:
    """The node's parameters as a markdown table (docs/policy_node.md holds this one).

    `python -m twinbrain_ros.ros.parameters` prints it; a test keeps the page in sync.
    """
    rows = ["| parameter | default | range | meaning |", "|---|---|---|---|"]
    for name, param in (table or NODE_PARAMETERS).items():
        default = f'`"{param.default}"`' if isinstance(param.default, str) else \
            f"`{str(param.default).lower() if isinstance(param.default, bool) else param.default}`"
        span = "" if param.range is None else f"{param.range[0]} .. {param.range[1]}"
        meaning = param.description + (" (changeable at run time)" if param.dynamic else "")
        rows.append(f"| `{name}` | {default} | {span} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(parameter_table())
