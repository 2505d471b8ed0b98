"""Scripted demonstrations in simulation, written as a LeRobot dataset (training input).

    ros2 run twinbrain_ros record_demos --embodiment widowx --task pick_cube \
        --episodes 100 --out data/widowx_pick_cube
    ros2 run twinbrain_ros train dataset=data/widowx_pick_cube embodiment=widowx ...

Each seeded episode runs the task's scripted expert in the closed loop of
`twinbrain_ros.sim.rollout` and records, per control step, the camera frame(s), the joint state
and the expert's action in the embodiment's action space (Bridge end-effector deltas for the
WidowX, absolute joint positions for the GR1) with the episode's instruction as its task.
Failed episodes are left out by default (a demonstration should show success); their seeds are
reported. With `--workers N` the episodes run in N processes (each with its own simulator); the
dataset is the same as with one: episodes are written in seed order.
"""

from __future__ import annotations

import argparse
import atexit
import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.lerobot import LeRobotWriter
from ..robot.embodiment import Embodiment
from .base import make_backend
from .rollout import run_episode


@dataclass
class RecordReport:
    """What a recording run produced."""

    root: Path
    recorded: int = 0
    failed_seeds: list[int] = field(default_factory=list)
    frames: int = 0
    seconds: float = 0.0


@dataclass
class _Demonstration:
    """What a recording needs of one episode (small enough to pass between processes)."""

    seed: int
    success: bool
    steps: int
    instruction: str
    images: dict[str, np.ndarray]   # camera -> T x H x W x 3
    states: np.ndarray
    actions: np.ndarray


def _make_sim(backend: str, task: str, embodiment: Embodiment, image_size: int):
    """The task's simulator with a square camera (the embodiment's CPU backend by default)."""
    return make_backend(backend or embodiment.name, task=task, embodiment=embodiment,
                        image_width=image_size, image_height=image_size)


def _demonstrate(sim, seed: int) -> _Demonstration:
    record = run_episode(sim, seed, record=True, stop_when_done=True)
    images = {camera: np.stack([frames[c] for frames in record.frames])
              for c, camera in enumerate(sim.camera_names)}
    return _Demonstration(seed, record.success, record.steps, record.episode.instruction, images,
                          np.stack(record.states), np.stack(record.actions))


_WORKER: dict = {}


def _worker_demonstrate(job: tuple) -> _Demonstration:
    """One episode in a worker process; the simulator is built once per task and kept."""
    backend, task, embodiment, image_size, seed = job
    key = (backend, task, embodiment.name, image_size)
    if _WORKER.get("key") != key:
        _close_worker_sim()
        if "key" not in _WORKER:
            atexit.register(_close_worker_sim)
        _WORKER["sim"] = _make_sim(backend, task, embodiment, image_size)
        _WORKER["key"] = key
    return _demonstrate(_WORKER["sim"], seed)


def _close_worker_sim() -> None:
    sim = _WORKER.pop("sim", None)
    if sim is not None:
        sim.close()


def record_demonstrations(out: str | Path, embodiment: str | Embodiment, tasks: list[str],
                          episodes: int, seed: int = 0, backend: str = "",
                          image_size: int = 224, version: str = "v3.0",
                          keep_failures: bool = False, progress: bool = True,
                          workers: int = 1) -> RecordReport:
    """Record `episodes` scripted episodes of each task into one LeRobot dataset.

    Args:
        out: dataset directory (must not exist or be empty).
        embodiment: embodiment name or description.
        tasks: tasks of the backend; episode k of each task uses seed `seed + k`.
        episodes: episodes per task.
        seed: first seed.
        backend: backend name (default: the embodiment's CPU backend).
        image_size: square camera size in pixels (even, for video encoding).
        version: LeRobot dataset version, "v3.0" (LeRobot's current format) or "v2.1".
        keep_failures: also record episodes where the expert failed.
        progress: show a progress bar.
        workers: processes running episodes side by side (1: this process). The dataset is
            the same whatever their number.

    Returns:
        A report with the number of recorded episodes and the seeds that failed.
    """
    from ..progress import progress_bar

    emb = embodiment if isinstance(embodiment, Embodiment) else Embodiment.resolve(embodiment)
    report = RecordReport(root=Path(out))
    started = time.monotonic()
    writer = None
    if workers < 1:
        raise ValueError(f"workers must be 1 or more, not {workers}")
    bar = progress_bar(episodes * len(tasks), "demonstrations", unit="episode",
                       disable=not progress)
    pool = None
    try:
        if workers > 1:
            # spawn: a fresh interpreter per worker (no forked OpenGL or torch thread state)
            pool = multiprocessing.get_context("spawn").Pool(workers)
        for task in tasks:
            if pool is None:
                sim = _make_sim(backend, task, emb, image_size)
                results = (_demonstrate(sim, seed + k) for k in range(episodes))
            else:
                sim = None
                jobs = [(backend, task, emb, image_size, seed + k) for k in range(episodes)]
                results = pool.imap(_worker_demonstrate, jobs)
            try:
                for demo in results:
                    bar.update(1)
                    if writer is None:
                        writer = LeRobotWriter(out, fps=emb.control_rate_hz, embodiment=emb,
                                               image_keys=list(demo.images), version=version)
                    if not demo.success and not keep_failures:
                        report.failed_seeds.append(demo.seed)
                        continue
                    writer.add_episode(demo.images, demo.states,
                                       demo.actions, task=demo.instruction)
                    report.recorded += 1
                    report.frames += demo.steps
                    bar.set_postfix(recorded=report.recorded, failed=len(report.failed_seeds),
                                    refresh=False)
            finally:
                if sim is not None:
                    sim.close()
    except BaseException:
        if pool is not None:
            pool.terminate()  # the queued episodes are not wanted any more
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    bar.close()
    if writer is None or report.recorded == 0:
        raise RuntimeError(f"no successful episode to record (failed seeds: "
                           f"{report.failed_seeds})")
    writer.finalize()
    report.seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ros2 run twinbrain_ros record_demos`."""
    parser = argparse.ArgumentParser(prog="record_demos", description=__doc__.splitlines()[0])
    parser.add_argument("--embodiment", default="widowx", help="widowx or gr1")
    parser.add_argument("--backend", default="", help="simulator backend (default: the "
                                                      "embodiment's CPU backend)")
    parser.add_argument("--task", "--tasks", dest="tasks", nargs="+", required=True,
                        help="task name(s) of the backend")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode")
    parser.add_argument("--image-size", type=int, default=224, help="camera size in pixels")
    parser.add_argument("--version", choices=("v2.1", "v3.0"), default="v3.0",
                        help="LeRobot dataset version")
    parser.add_argument("--keep-failures", action="store_true",
                        help="also record episodes where the expert failed")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes running episodes side by side (same dataset)")
    parser.add_argument("--out", required=True, help="dataset directory (new or empty)")
    args = parser.parse_args(argv)
    try:
        report = record_demonstrations(args.out, args.embodiment, args.tasks, args.episodes,
                                       seed=args.seed, backend=args.backend,
                                       image_size=args.image_size, version=args.version,
                                       keep_failures=args.keep_failures,
                                       workers=args.workers)
    except (ValueError, RuntimeError, ImportError) as error:
        print(f"record_demos: {error}", flush=True)
        return 1
    print(f"recorded {report.recorded} episodes ({report.frames} frames) in "
          f"{report.seconds:.1f} s to {report.root}"
          + (f"; expert failed on seeds {report.failed_seeds}" if report.failed_seeds else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
