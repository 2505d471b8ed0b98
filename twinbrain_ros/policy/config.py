"""How the policy loop runs a model on a robot: one set of defaults, one validation.

`PolicyConfig` is read by everything that runs the loop: the policy node declares one ROS
parameter per field (type, description, range and choices from the field's metadata, see
`settings`), an evaluation embeds one, and the embodiment's params file (`config/<robot>.yaml`)
may set any of them for its robot (`PolicyConfig.for_robot`).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace

from ..transforms.rtc import RTC_SCHEDULES

CHUNK_TRANSITIONS = ("blend", "rtc", "ensemble")


def setting(default, description: str, range: tuple[float, float] | None = None,
            choices: tuple[str, ...] | None = None, dynamic: bool = False):
    """A config field with what a ROS parameter declaration needs to know of it."""
    return field(default=default, metadata={"description": description, "range": range,
                                            "choices": choices, "dynamic": dynamic})


@dataclass(frozen=True)
class Setting:
    """One field of a settings dataclass, as a parameter: default, words, range, choices."""

    name: str
    default: object
    description: str
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None
    dynamic: bool = False


def settings(cls) -> list[Setting]:
    """The fields of a dataclass made with `setting`, in order."""
    found = []
    for f in fields(cls):
        if f.default is MISSING:
            continue
        meta = f.metadata
        found.append(Setting(f.name, f.default, meta.get("description", ""), meta.get("range"),
                             meta.get("choices"), meta.get("dynamic", False)))
    return found


@dataclass(frozen=True)
class PolicyConfig:
    """The policy loop's settings (see `twinbrain_ros.policy.loop.PolicyLoop`)."""

    actions_per_inference: int = setting(
        4, "control periods executed from a chunk before the next one is requested (the "
           "replanning period)", (1, 1000))
    blend_steps: int = setting(
        2, "points of a new chunk cross-faded with the executing plan (chunk_transition "
           "blend)", (0, 64))
    chunk_transition: str = setting(
        "blend", "how a new chunk takes over the executing plan: blend (drop the stale "
                 "actions, cross-fade blend_steps points) or rtc (real-time chunking: the "
                 "model inpaints the actions that execute while it runs, sized by the measured "
                 "latency's 95th percentile) or ensemble (each step executes the weighted mean "
                 "of the last ensemble_horizon chunks' predictions for it: starVLA's SimplerEnv "
                 "protocol, with actions_per_inference 1)", choices=CHUNK_TRANSITIONS)
    ensemble_horizon: int = setting(
        7, "chunk_transition ensemble: how many chunks (one per step) are averaged", (1, 64))
    ensemble_alpha: float = setting(
        0.1, "chunk_transition ensemble: weight exp(alpha * cosine similarity with the newest "
             "prediction)", (-100.0, 100.0))
    rtc_schedule: str = setting(
        "exp", "real-time chunking's guidance weights over the rest of the overlap: exp, "
               "linear or hard (frozen prefix only)", choices=RTC_SCHEDULES)
    inference_delay_s: float = setting(
        0.0, "for evaluation only: seconds added to every inference (on the loop's clock), "
             "to see the behaviour at realistic latencies with a fast model", (0.0, 60.0))
    max_input_age_s: float = setting(
        0.5, "an image or joint state older than this is stale", (0.001, 60.0))
    max_sync_skew_s: float = setting(
        0.1, "largest allowed stamp difference between image(s) and joint state", (0.0, 60.0))
    rerun_path: str = setting(
        "", "directory for rerun logs of the policy's cycles (rerun-sdk), one file per "
            "instruction (an instruction repeated within 2 s continues the file); empty: none")

    def __post_init__(self):
        """Check every value against its range and choices; the message names the field."""
        for item in settings(type(self)):
            value = getattr(self, item.name)
            if item.choices is not None and value not in item.choices:
                raise ValueError(f"{item.name} must be one of {list(item.choices)}, got "
                                 f"{value!r}")
            if item.range is not None and not item.range[0] <= value <= item.range[1]:
                raise ValueError(f"{item.name} must be within [{item.range[0]}, "
                                 f"{item.range[1]}], got {value!r}")

    @classmethod
    def for_robot(cls, embodiment, **overrides) -> PolicyConfig:
        """The defaults, then what the robot's params file sets, then `overrides`.

        Args:
            embodiment: an `Embodiment` (its `node_parameters` are its file's other entries).
            overrides: field values; None leaves a field as the file (or default) has it.
        """
        names = {item.name for item in settings(cls)}
        from_file = {k: v for k, v in getattr(embodiment, "node_parameters", {}).items()
                     if k in names}
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(f"unknown policy settings {unknown}; known: {sorted(names)}")
        return replace(cls(**from_file), **given)
