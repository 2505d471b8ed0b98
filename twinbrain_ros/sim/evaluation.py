"""Evaluations: their configuration, the in-process loop, and the bookkeeping (no ROS).

The paper reports Avg@N: the success rate over N episodes of each task, and their mean over
tasks. `summarize` computes exactly that from per-episode results. An evaluation runs through
the ROS topics (`twinbrain_ros.ros.evaluate`, the integration path) or in this process
(`run_inprocess`): the same policy pipeline and trajectory follower, without ROS in between.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

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
            or `inprocess` (the node's pipeline and the bridge's follower in this process).
        backend: simulator backend ("" for the embodiment's CPU default).
        device: torch device of the policy.
        policy_seed: seed of the flow-matching noise (-1: fresh noise every chunk).
        actions_per_inference: replanning period in control periods (0: the embodiment
            file's `actions_per_inference`).
        image_size: square camera size in pixels.
        camera_rate_hz: camera rate (0: the control rate; ROS only).
        real_time_factor: simulated seconds per wall-clock second (ROS only).
        out: output directory (`results.json`, `success.png`, videos, logs).
        video: save the first N episodes as mp4.
        plot: save `success.png`.
        startup_timeout_s: how long to wait for the bridge and policy node (ROS only).
        episode_timeout_s: wall-clock limit of one episode (ROS only).
        episode_steps: length of every episode in control periods (0: the task's own limit).
        chunk_transition: how a new chunk takes over, ``blend`` or ``rtc`` ("": the
            embodiment file's `chunk_transition`, else blend).
        rtc_schedule: real-time chunking's guidance weights over the overlap.
        inference_delay_s: time added to every inference, to see the behaviour at realistic
            latencies with a fast model (simulated time in process, the node's clock via ROS).
        record: write a rerun recording per episode under `out/recordings`.
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
    actions_per_inference: int = 0
    image_size: int = 224
    camera_rate_hz: float = 0.0
    real_time_factor: float = 1.0
    out: str = "runs/eval"
    video: int = 0
    plot: bool = False
    startup_timeout_s: float = 120.0
    episode_timeout_s: float = 300.0
    episode_steps: int = 0
    chunk_transition: str = ""
    rtc_schedule: str = "exp"
    inference_delay_s: float = 0.0
    record: bool = False

    def __post_init__(self):
        """Resolve the policy and check the choices."""
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
        if self.chunk_transition not in ("", "blend", "rtc"):
            raise ValueError(f"chunk_transition {self.chunk_transition!r} is not blend or rtc")
        if self.inference_delay_s < 0:
            raise ValueError("inference_delay_s must not be negative")
        if (self.record or self.inference_delay_s > 0) and self.policy != "checkpoint":
            raise ValueError("--record and --inference-delay need --policy checkpoint")

    def to_dict(self) -> dict:
        """JSON-friendly dict (saved with the results)."""
        return asdict(self)


@dataclass
class EvaluationResult:
    """Per-episode results and their summary (also written to `results.json`)."""

    summary: dict
    episodes: list[dict]


def run_inprocess(config: EvaluationConfig, embodiment, pipeline=None,
                  actions_per_inference: int = 1, progress=print) -> tuple[list[dict], dict]:
    """Run the episodes of `config` in this process; returns (episode results, videos).

    Args:
        config: the evaluation (its `inference_delay_s` passes in simulated time; with
            `record`, one rerun file per episode goes to `out/recordings`).
        embodiment: the robot (`Embodiment`).
        pipeline: the policy node's `PolicyPipeline` (None: the task's scripted expert).
        actions_per_inference: the pipeline's replanning period.
        progress: called with one line per episode.

    Returns:
        The results (the same keys as the ROS evaluation's, with the motion metrics) and
        {episode name: frames} of the first `config.video` episodes. The first policy
        episode's joints are plotted to `out/motion.png`.
    """
    from .base import make_backend
    from .motion import plot_motion
    from .rollout import run_episode

    backend = None
    episodes, videos = [], {}
    sim_time = 0.0
    try:
        for task in config.tasks:
            if backend is None or backend.task != task:
                if backend is not None:
                    backend.close()
                backend = make_backend(config.backend or embodiment.name, task=task,
                                       embodiment=embodiment, image_width=config.image_size,
                                       image_height=config.image_size)
            for k in range(config.episodes):
                seed = config.seed + k
                keep = len(videos) < config.video
                started = time.monotonic()
                recorder = None
                if config.record and pipeline is not None:
                    from ..policy.recording import CycleRecorder

                    recorder = CycleRecorder(Path(config.out) / "recordings" /
                                             f"{task}_seed{seed}.rrd", embodiment.joint_names)
                try:
                    record = run_episode(backend, seed, pipeline=pipeline,
                                         actions_per_inference=actions_per_inference,
                                         record=keep, render=pipeline is not None or keep,
                                         inference_delay_s=config.inference_delay_s,
                                         recorder=recorder, max_steps=config.episode_steps)
                finally:
                    if recorder is not None:
                        recorder.close()
                if record.motion is not None and not episodes:
                    plot_motion(record.motion, Path(config.out) / "motion.png",
                                title=f"{task} seed {seed}: commanded (solid) vs measured "
                                      f"(dashed); grey: chunk starts, red: holds")
                sim_time += record.steps * embodiment.dt
                result = {"task": task, "seed": seed, "instruction": record.episode.instruction,
                          "success": record.success, "steps": record.steps,
                          "trajectories": record.trajectories, "sim_time": round(sim_time, 6),
                          "info": jsonable(record.episode.info),
                          "outcome": jsonable(record.outcome),
                          "final_state": record.final_state, "error": "",
                          "wall_time_s": round(time.monotonic() - started, 3),
                          "policy": config.policy, "holds": record.holds,
                          "hold_causes": dict(record.hold_causes),
                          "motion": record.motion.metrics() if record.motion else {}}
                episodes.append(result)
                if keep:
                    videos[f"{task}_seed{seed}"] = [frames[0] for frames in record.frames]
                progress(f"  {task} seed {seed}: "
                         f"{'success' if record.success else 'failure'} after {record.steps} "
                         f"steps ({result['wall_time_s']:.1f} s)  {result['instruction']!r}")
    finally:
        if backend is not None:
            backend.close()
    return episodes, videos


def jsonable(value):
    """`value` with NumPy arrays and scalars (nested in dicts and lists) as plain Python."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def summarize(episodes: list[dict]) -> dict:
    """Per-task success rates and their average over tasks; motion metrics when recorded.

    Args:
        episodes: one dict per episode with at least "task" and "success" (and "motion").

    Returns:
        {"tasks": {task: {"episodes", "successes", "success_rate"}}, "average": mean rate over
        tasks (Avg@N), "episodes": total, "motion": median and largest of each motion number
        (`twinbrain_ros.sim.motion.summarize_motion`; absent without motion data)}.
    """
    from .motion import summarize_motion

    per_task: dict[str, list[bool]] = defaultdict(list)
    for episode in episodes:
        per_task[episode["task"]].append(bool(episode["success"]))
    tasks = {task: {"episodes": len(results), "successes": int(sum(results)),
                    "success_rate": float(np.mean(results))}
             for task, results in per_task.items()}
    average = float(np.mean([t["success_rate"] for t in tasks.values()])) if tasks else 0.0
    summary = {"tasks": tasks, "average": average, "episodes": len(episodes)}
    motion = summarize_motion(episodes)
    if motion:
        summary["motion"] = motion
    return summary


def format_table(summary: dict, title: str = "") -> str:
    """A plain-text success-rate table."""
    lines = [title] if title else []
    width = max([len("task")] + [len(t) for t in summary["tasks"]])
    lines.append(f"{'task':<{width}}  episodes  successes  success rate")
    for task, row in summary["tasks"].items():
        lines.append(f"{task:<{width}}  {row['episodes']:>8}  {row['successes']:>9}  "
                     f"{100 * row['success_rate']:>11.1f}%")
    n = max((row["episodes"] for row in summary["tasks"].values()), default=0)
    lines.append(f"{'average':<{width}}  {summary['episodes']:>8}  {'':>9}  "
                 f"{100 * summary['average']:>11.1f}%  (Avg@{n})")
    motion = summary.get("motion")
    if motion:
        lines.append("motion (arm joints; median / largest over episodes): boundary velocity "
                     f"jump {motion['boundary_velocity_jump']['median']:.3g} / "
                     f"{motion['boundary_velocity_jump']['max']:.3g} per s, peak jerk "
                     f"{motion['max_jerk']['median']:.3g} / {motion['max_jerk']['max']:.3g} "
                     f"per s^3, held {motion['hold_time_s']['total']:.1f} s in all")
    return "\n".join(lines)


def format_simpler_table(summary: dict, episodes: list[dict]) -> str:
    """The SimplerEnv WidowX table as the paper lays it out.

    A column per Bridge task and the average, with SimplerEnv's partial metric (the object
    grasped at some point) above the success rate, and the paper's published average below.
    """
    from .simpler_widowx import PAPER_AVERAGE, PROTOCOL_EPISODES, TITLES

    tasks = [t for t in TITLES if t in summary["tasks"]] + \
        [t for t in summary["tasks"] if t not in TITLES]
    grasped: dict[str, list[bool]] = defaultdict(list)
    for episode in episodes:
        grasped[episode["task"]].append(bool(episode.get("outcome", {}).get("grasped")))
    columns = [TITLES.get(t, t) for t in tasks] + ["Average"]
    width = max(12, *(len(c) for c in columns))
    header = f"{'':<22}" + "".join(f"{c:>{width + 2}}" for c in columns)
    counts = {summary["tasks"][t]["episodes"] for t in tasks}
    # The protocol: SimplerEnv's own first 24 layouts of each task (seeds 0-23).
    protocol = counts == {PROTOCOL_EPISODES} and all(
        e.get("info", {}).get("protocol") for e in episodes)
    lines = [f"SimplerEnv WidowX (Bridge), {'/'.join(str(n) for n in sorted(counts))} episodes "
             f"per task{' (its protocol)' if protocol else ' (not its protocol: episodes 0-23)'}",
             header]
    grasp_rates = [float(np.mean(grasped[t])) if grasped[t] else 0.0 for t in tasks]
    success_rates = [summary["tasks"][t]["success_rate"] for t in tasks]
    for label, rates in (("grasp", grasp_rates), ("success", success_rates)):
        cells = [*rates, float(np.mean(rates)) if rates else 0.0]
        lines.append(f"{label:<22}" + "".join(f"{100 * r:>{width + 1}.1f}%" for r in cells))
    lines.append(f"{'paper (Qwen3-VL-4B)':<22}" + f"{'':>{(width + 2) * len(tasks)}}"
                 + f"{100 * PAPER_AVERAGE:>{width + 1}.1f}%")
    return "\n".join(lines)


def save_results(path: Path, episodes: list[dict], config: dict) -> dict:
    """Write per-episode results, the summary and the run's configuration as JSON."""
    summary = summarize(episodes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config, "summary": summary, "episodes": episodes},
                               indent=2))
    return summary


def plot_success(summaries: dict[str, dict], path: Path) -> Path:
    """Bar chart of per-task success rates for one or more policies ({label: summary})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for s in summaries.values() for t in s["tasks"]})
    labels = list(summaries)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(tasks) * len(labels)), 3.2))
    width = 0.8 / max(len(labels), 1)
    for k, label in enumerate(labels):
        rates = [100 * summaries[label]["tasks"].get(t, {}).get("success_rate", 0.0)
                 for t in tasks]
        x = np.arange(len(tasks)) + (k - (len(labels) - 1) / 2) * width
        bars = ax.bar(x, rates, width, label=label)
        ax.bar_label(bars, fmt="%.0f%%", fontsize=8)
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_ylim(0, 110)
    ax.set_ylabel("success rate (%)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Lay out, write (creating the directory) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_video(frames: list[np.ndarray], path: Path, fps: float) -> Path:
    """Encode HxWx3 uint8 RGB frames as an H.264 mp4 with PyAV (sizes rounded down to even)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = (frames[0].shape[0] // 2) * 2, (frames[0].shape[1] // 2) * 2
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=max(1, round(fps)))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:height, :width]),
                                               format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
