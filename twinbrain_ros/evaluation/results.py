"""Evaluation results: per-episode records, the Avg@N summary, tables, plots and videos.

The paper reports Avg@N: the success rate over N episodes of each task, and their mean over
tasks. `summarize` computes exactly that from per-episode results; `save_results` writes them
with the run's configuration to `results.json`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np


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
        (`twinbrain_ros.evaluation.motion.summarize_motion`; absent without motion data)}.
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
