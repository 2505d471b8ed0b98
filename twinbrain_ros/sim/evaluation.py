"""Success-rate bookkeeping for evaluations: tables, JSON, plots and videos (no ROS).

The paper reports Avg@N: the success rate over N episodes of each task, and their mean over
tasks. `summarize` computes exactly that from per-episode results.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def summarize(episodes: list[dict]) -> dict:
    """Per-task success rates and their average over tasks.

    Args:
        episodes: one dict per episode with at least "task" and "success".

    Returns:
        {"tasks": {task: {"episodes", "successes", "success_rate"}}, "average": mean rate over
        tasks (Avg@N), "episodes": total}.
    """
    per_task: dict[str, list[bool]] = defaultdict(list)
    for episode in episodes:
        per_task[episode["task"]].append(bool(episode["success"]))
    tasks = {task: {"episodes": len(results), "successes": int(sum(results)),
                    "success_rate": float(np.mean(results))}
             for task, results in per_task.items()}
    average = float(np.mean([t["success_rate"] for t in tasks.values()])) if tasks else 0.0
    return {"tasks": tasks, "average": average, "episodes": len(episodes)}


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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
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
