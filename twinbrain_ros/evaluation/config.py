"""An evaluation's configuration: which robot, tasks, seeds and policy, and how it is run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..policy.config import PolicyConfig

POLICIES = ("checkpoint", "expert", "external")
TRANSPORTS = ("ros", "inprocess")


@dataclass
class EvaluationConfig:
    """One evaluation: which robot, tasks, seeds and policy, and how it is run.

    Attributes:
        embodiment: embodiment name (`config/<name>.yaml`) or YAML path.
        tasks: task names of the backend.
        episodes: episodes per task (Avg@N); episode k of a task uses seed `seed + k`.
        seed: seed of each task's first episode.
        policy: `checkpoint`, `expert` or `external` (nodes already running; ROS only); None:
            `checkpoint` when a checkpoint is given, else `external`.
        checkpoint: TwinBrainVLA checkpoint directory.
        transport: `ros` (sim bridge and policy node as processes, through the robot's topics)
            or `inprocess` (the node's loop and the bridge's follower in this process).
        backend: simulator backend ("" for the embodiment's CPU default).
        device: torch device of the policy.
        policy_seed: seed of the flow-matching noise (-1: fresh noise every chunk).
        image_size: square camera size in pixels.
        camera_rate_hz: camera rate (0: the control rate; ROS only).
        real_time_factor: simulated seconds per wall-clock second (ROS only).
        out: output directory (`results.json`, `success.png`, videos, logs).
        video: save the first N episodes as mp4.
        plot: save `success.png`.
        startup_timeout_s: how long to wait for the bridge and policy node (ROS only).
        episode_timeout_s: wall-clock limit of one episode (ROS only).
        episode_steps: length of every episode in control periods (0: the task's own limit).
        loop: the policy loop's settings (None: the robot's file, `PolicyConfig.for_robot`);
            its `inference_delay_s` passes in simulated time in process, on the node's clock
            through ROS.
        rerun: write a rerun log per episode under `out/rerun` (the loop's `rerun_path`).
        release_protocol: a released checkpoint runs with its authors' loop settings
            (`ReleaseRuntime.protocol`) over `loop`'s.
        backbone_path: the base VLM directory, overriding the one the checkpoint names.
    """

    embodiment: str = "widowx"
    tasks: list[str] = field(default_factory=list)
    episodes: int = 10
    seed: int = 0
    policy: str | None = None
    checkpoint: str = ""
    transport: str = "ros"
    backend: str = ""
    device: str = "auto"
    policy_seed: int = 0
    image_size: int = 224
    camera_rate_hz: float = 0.0
    real_time_factor: float = 1.0
    out: str = "runs/eval"
    video: int = 0
    plot: bool = False
    startup_timeout_s: float = 120.0
    episode_timeout_s: float = 300.0
    episode_steps: int = 0
    loop: PolicyConfig | None = None
    rerun: bool = False
    release_protocol: bool = True
    backbone_path: str = ""

    def __post_init__(self):
        """Resolve the policy and the loop's settings; check the choices."""
        self.tasks = list(self.tasks)
        if not self.tasks:
            raise ValueError("an evaluation needs at least one task")
        self.policy = self.policy or ("checkpoint" if self.checkpoint else "external")
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} is not one of {POLICIES}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport {self.transport!r} is not one of {TRANSPORTS}")
        if self.policy == "checkpoint" and not self.checkpoint:
            raise ValueError("--policy checkpoint needs --checkpoint DIR")
        if self.policy == "external" and self.transport == "inprocess":
            raise ValueError("--policy external needs --transport ros (running nodes)")
        if self.episodes < 1:
            raise ValueError("episodes must be at least 1")
        if self.episode_steps < 0:
            raise ValueError("episode_steps must not be negative (0: the task's own limit)")
        if isinstance(self.loop, dict):
            self.loop = PolicyConfig(**self.loop)
        if self.loop is None:
            from ..robot.embodiment import Embodiment

            self.loop = PolicyConfig.for_robot(Embodiment.resolve(self.embodiment))
        if (self.rerun or self.loop.inference_delay_s > 0) and self.policy != "checkpoint":
            raise ValueError("--rerun and --inference-delay need --policy checkpoint")

    def to_dict(self) -> dict:
        """JSON-friendly dict (saved with the results)."""
        return asdict(self)


@dataclass
class EvaluationResult:
    """Per-episode results and their summary (also written to `results.json`)."""

    summary: dict
    episodes: list[dict]
