"""An evaluation in this process: the policy node's loop and the bridge's follower, no ROS.

The same episodes, seeds and result keys as an evaluation through ROS
(`twinbrain_ros.ros.evaluate`); the simulation waits for the model, so the outcome does not
depend on how fast this machine is.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .config import EvaluationConfig
from .results import jsonable


def run_inprocess(config: EvaluationConfig, embodiment, pipeline=None, progress=print
                  ) -> tuple[list[dict], dict]:
    """Run the episodes of `config` in this process; returns (episode results, videos).

    Args:
        config: the evaluation (its loop's `inference_delay_s` passes in simulated time; with
            `rerun`, one rerun log per episode goes to `out/rerun`).
        embodiment: the robot (`Embodiment`).
        pipeline: the policy's `PolicyPipeline` (None: built on `config.checkpoint` with the
            loop's settings; with `--policy expert`, the task's scripted expert runs).
        progress: called with one line per episode.

    Returns:
        The results (the same keys as the ROS evaluation's, with the motion metrics) and
        {episode name: frames} of the first `config.video` episodes. The first policy
        episode's joints are plotted to `out/motion.png`.
    """
    from ..policy.cycle_log import CycleLogs
    from ..sim.base import make_backend
    from ..sim.rollout import run_episode
    from .motion import plot_motion
    from .rollout import run_policy_episode

    if config.policy != "checkpoint":
        pipeline = None
    elif pipeline is None:
        pipeline = _pipeline(config, embodiment)
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
                if pipeline is None:
                    result = run_episode(backend, seed, record=keep, render=keep,
                                         max_steps=config.episode_steps)
                else:
                    logs = None
                    if config.rerun:
                        path = Path(config.out) / "rerun" / f"{task}_seed{seed}.rrd"
                        logs = CycleLogs(embodiment.joint_names, path_for=lambda *_, p=path: p)
                    try:
                        result = run_policy_episode(backend, seed, pipeline, config.loop,
                                                    keep_frames=keep, logs=logs,
                                                    max_steps=config.episode_steps)
                    finally:
                        if logs is not None:
                            logs.close()
                if result.motion is not None and not episodes:
                    plot_motion(result.motion, Path(config.out) / "motion.png",
                                title=f"{task} seed {seed}: commanded (solid) vs measured "
                                      f"(dashed); grey: chunk starts, red: holds")
                sim_time += result.steps * embodiment.dt
                row = {"task": task, "seed": seed, "instruction": result.episode.instruction,
                       "success": result.success, "steps": result.steps,
                       "trajectories": result.trajectories, "sim_time": round(sim_time, 6),
                       "info": jsonable(result.episode.info), "outcome": jsonable(result.outcome),
                       "final_state": result.final_state, "error": "",
                       "wall_time_s": round(time.monotonic() - started, 3),
                       "policy": config.policy, "holds": result.holds,
                       "hold_causes": dict(result.hold_causes),
                       "motion": result.motion.metrics() if result.motion else {}}
                episodes.append(row)
                if keep:
                    videos[f"{task}_seed{seed}"] = [frames[0] for frames in result.frames]
                progress(f"  {task} seed {seed}: "
                         f"{'success' if result.success else 'failure'} after {result.steps} "
                         f"steps ({row['wall_time_s']:.1f} s)  {row['instruction']!r}")
    finally:
        if backend is not None:
            backend.close()
    return episodes, videos


def _pipeline(config: EvaluationConfig, embodiment):
    """The policy node's stages on the checkpoint, with the evaluation's loop settings."""
    from ..policy.pipeline import PolicyPipeline
    from ..policy.runtime import local_runtime

    runtime = local_runtime(str(Path(config.checkpoint).resolve()), embodiment,
                            device=config.device, backbone_path=config.backbone_path or None,
                            seed=None if config.policy_seed < 0 else config.policy_seed)
    loop = config.loop
    if config.release_protocol and getattr(runtime, "protocol", None):
        loop = dataclasses.replace(loop, **runtime.protocol)
        config.loop = loop
    return PolicyPipeline(runtime, embodiment, loop)
