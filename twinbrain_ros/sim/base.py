"""The simulator interface every backend implements, and the registry that builds one by name.

A backend owns one simulated robot and scene. It takes absolute joint position targets in the
embodiment's joint order (`config/<embodiment>.yaml`), advances the simulation by `sim_dt` per
`step`, renders the cameras that stand for the embodiment's image topics, and judges success of
the current episode from privileged state. Nothing here imports ROS: the bridge node
(`twinbrain_ros.ros.sim_bridge`), the demonstration recorder and tests drive backends the same
way.

Backends are imported lazily by `make_backend`, so a missing simulator fails with an
ImportError that names the extra to install, never at package import.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from ..robot.embodiment import Embodiment


class SimError(RuntimeError):
    """A backend, task or option that does not exist or does not fit."""


@dataclass
class Episode:
    """What a reset decided: the task, its seed and the instruction for this episode."""

    task: str
    seed: int
    instruction: str
    max_steps: int                       # control steps before the episode times out
    info: dict = field(default_factory=dict)  # e.g. the target object's name


class ScriptedExpert(ABC):
    """A privileged-state controller for one episode of one task.

    `act` is called once per control period (`embodiment.dt`) and returns one action in the
    embodiment's action space: absolute joint positions (`joint_position`) or one Bridge
    end-effector delta row with its gripper command (`ee_delta`).
    """

    @abstractmethod
    def act(self) -> np.ndarray:
        """The next action, from the backend's current privileged state."""

    @property
    def done(self) -> bool:
        """Whether the task is finished and the expert only holds still (False if it never says).

        Demonstrations of a backend that judges episodes at their end stop here, so that they
        do not fill up with frames of a robot holding still.
        """
        return False


class SimBackend(ABC):
    """One simulated robot, scene and task family.

    Attributes:
        embodiment: the robot description; joint vectors follow `embodiment.joint_names`.
        sim_dt: simulated seconds per `step` (the rate at which targets are applied).
        camera_names: the backend's cameras, one per `embodiment.image_topics` entry.
        tasks: the task names this backend accepts.
        task: the task this instance runs (fixed at construction).
    """

    name: str = ""
    # Whether an episode is judged at its last step only (SimplerEnv's rule: an object put on
    # the target and knocked off again fails) rather than ending at its first success.
    judge_at_end: bool = False
    task: str
    embodiment: Embodiment
    sim_dt: float
    camera_names: tuple[str, ...]
    tasks: tuple[str, ...]

    @abstractmethod
    def reset(self, seed: int) -> Episode:
        """Start a new episode of the current task: scene, object poses, instruction."""

    @abstractmethod
    def step(self, targets: np.ndarray) -> None:
        """Drive the joints towards absolute position `targets` for `sim_dt` seconds."""

    @abstractmethod
    def joint_state(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, velocities) of `embodiment.joint_names`."""

    @abstractmethod
    def render(self) -> list[np.ndarray]:
        """One HxWx3 uint8 RGB frame per camera, in `camera_names` order."""

    @abstractmethod
    def success(self) -> bool:
        """Whether the current episode's goal holds now."""

    @abstractmethod
    def expert(self) -> ScriptedExpert:
        """A scripted expert for the current episode (call after `reset`)."""

    def outcome(self) -> dict:
        """What happened in the episode beyond success, e.g. which object was lifted.

        JSON-serialisable; the bridge reports it with the episode's end.
        """
        return {}

    @property
    @abstractmethod
    def time(self) -> float:
        """Simulated seconds since the last reset."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release renderer and simulator resources."""


# name -> (module under twinbrain_ros.sim, class, embodiment, extra to install)
BACKENDS: dict[str, tuple[str, str, str, str]] = {
    "widowx_mujoco": ("widowx_mujoco", "WidowXMujocoBackend", "widowx",
                      "pip install mujoco==3.3.7"),
    "gr1_robosuite": ("gr1_robosuite", "GR1RobosuiteBackend", "gr1",
                      "pip install mujoco==3.3.7 && pip install --no-deps robosuite==1.5.2"),
    "simpler_widowx": ("simpler_widowx", "SimplerWidowXBackend", "widowx",
                       "the ManiSkill packages of requirements.txt and requirements-nodeps.txt "
                       "(mani-skill==3.0.1, sapien==3.0.3)"),
}

def stiffen_joint_limits(model, time_constant: float = 0.005) -> None:
    """Make the range-limited joints of a MuJoCo model stop hard at their limits.

    MuJoCo's default limit constraint (solref 0.02 s) lets a stiff position servo or a contact
    push a joint a tenth of a radian or more past its range; a robot's hard stop does not give.
    The time constant stays at least 2.5 physics steps, MuJoCo's stability bound.
    """
    limited = model.jnt_limited.astype(bool)
    model.jnt_solref[limited] = (max(time_constant, 2.5 * model.opt.timestep), 1.0)


DEFAULT_BACKENDS = {"widowx": "widowx_mujoco", "gr1": "gr1_robosuite"}


def backend_names() -> list[str]:
    """All backend names `make_backend` knows."""
    return sorted(BACKENDS)


def make_backend(name: str, task: str | None = None, embodiment: Embodiment | None = None,
                 **options) -> SimBackend:
    """Build a backend by name.

    Args:
        name: a key of `BACKENDS`, or an embodiment name for its default CPU backend.
        task: the task to run (None: the backend's first task).
        embodiment: the robot description (default: `config/<backend's embodiment>.yaml`).
        **options: backend options (camera size, ...), see each backend.

    Raises:
        SimError: unknown backend or task.
        ImportError: the simulator the backend needs is not installed (the message says how).
    """
    name = DEFAULT_BACKENDS.get(name, name)
    if name not in BACKENDS:
        raise SimError(f"unknown simulation backend {name!r}; known: {backend_names()}")
    module_name, class_name, embodiment_name, extra = BACKENDS[name]
    try:
        module = importlib.import_module(f"{__package__}.{module_name}")
    except ImportError as exc:
        raise ImportError(f"simulation backend {name!r} needs a module that is not installed "
                          f"({exc.name or exc}): {extra}") from exc
    embodiment = embodiment or Embodiment.load(embodiment_name)
    cls = getattr(module, class_name)
    if task is not None and task not in cls.tasks:
        raise SimError(f"backend {name!r} has no task {task!r}; its tasks: {list(cls.tasks)}")
    task = task or cls.tasks[0]
    backend = cls(embodiment=embodiment, task=task, **options)
    backend.name, backend.task = name, task  # what the bridge needs to rebuild it
    return backend
