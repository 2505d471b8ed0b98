r"""Chunk transitions at realistic latencies: blend against real-time chunking, side by side.

One trained checkpoint, one task, the same held-out seeds for every cell; the policy node's
pipeline and the sim bridge's trajectory follower run in this process (`evaluate --transport
inprocess`), and every inference takes `delay` seconds of simulated time (the robot executes
its plan meanwhile). For each delay and each transition: success rate, the velocity jump at
chunk boundaries and the peak commanded jerk over the arm joints (median over episodes of the
per-episode largest, and the largest of all), hold time, and how often the robot left its plan.

Usage (the demo's checkpoint, from the directory `make demo` ran in):
  python benchmarks/bench_chunk_transitions.py \
      --checkpoint runs/demo/train/checkpoints/step_00005000 --task pick_cube_two_slots \
      --episodes 20 --seed 10000 --image-size 96 --delays 0 0.3 0.6
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main() -> int:
    """Run the grid and print the table (and write it as JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--embodiment", default="widowx")
    parser.add_argument("--task", default="pick_cube_two_slots")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    parser.add_argument("--transitions", nargs="+", default=["blend", "rtc"])
    parser.add_argument("--rtc-schedule", default="exp")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args()

    from twinbrain_ros.demo import wrong_object_rate
    from twinbrain_ros.evaluation.config import EvaluationConfig
    from twinbrain_ros.evaluation.inprocess import run_inprocess
    from twinbrain_ros.evaluation.results import summarize
    from twinbrain_ros.policy.config import PolicyConfig
    from twinbrain_ros.policy.pipeline import PolicyPipeline
    from twinbrain_ros.policy.runtime import PolicyRuntime
    from twinbrain_ros.robot.embodiment import Embodiment

    embodiment = Embodiment.resolve(args.embodiment)
    period = PolicyConfig.for_robot(embodiment).actions_per_inference
    runtime = PolicyRuntime(str(Path(args.checkpoint).resolve()), embodiment, device=args.device,
                            seed=0)
    rows = []
    out = Path(tempfile.mkdtemp(prefix="bench_transitions_"))
    print(f"{embodiment.name} {args.task}, {args.episodes} seeds from {args.seed}, control "
          f"period {embodiment.dt:.2f} s, a chunk every {period} periods, horizon "
          f"{runtime.horizon}", flush=True)
    for delay in args.delays:
        for transition in args.transitions:
            loop = PolicyConfig.for_robot(embodiment, inference_delay_s=delay,
                                          chunk_transition=transition,
                                          rtc_schedule=args.rtc_schedule)
            pipeline = PolicyPipeline(runtime, embodiment, loop)
            config = EvaluationConfig(embodiment=args.embodiment, tasks=[args.task],
                                      episodes=args.episodes, seed=args.seed,
                                      checkpoint=args.checkpoint, transport="inprocess",
                                      image_size=args.image_size, loop=loop,
                                      out=str(out / f"{transition}_{delay}"))
            started = time.monotonic()
            episodes, _ = run_inprocess(config, embodiment, pipeline=pipeline,
                                        progress=lambda line: None)
            summary = summarize(episodes)
            motion = summary["motion"]
            row = {"delay_s": delay, "transition": transition,
                   "success": summary["average"],
                   "wrong_object": wrong_object_rate(episodes),
                   "boundary_jump_median": motion["boundary_velocity_jump"]["median"],
                   "boundary_jump_max": motion["boundary_velocity_jump"]["max"],
                   "jerk_median": motion["max_jerk"]["median"],
                   "jerk_max": motion["max_jerk"]["max"],
                   "hold_time_s": motion["hold_time_s"]["total"],
                   "plan_left": pipeline.divergences,
                   "seconds": round(time.monotonic() - started, 1)}
            rows.append(row)
            print(f"delay {delay:.1f} s  {transition:5s}  success {100 * row['success']:5.1f}%  "
                  f"boundary jump {row['boundary_jump_median']:.3f} / "
                  f"{row['boundary_jump_max']:.3f} rad/s  jerk {row['jerk_median']:.1f} / "
                  f"{row['jerk_max']:.1f} rad/s^3  held {row['hold_time_s']:.1f} s  "
                  f"left plan {row['plan_left']}  ({row['seconds']:.0f} s)", flush=True)
    print("\n| delay | transition | success | other cube | boundary velocity jump, median / "
          "max (rad/s) | peak jerk, median / max (rad/s³) | held (s) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['delay_s']:.1f} s | {row['transition']} | {100 * row['success']:.0f}% | "
              f"{100 * row['wrong_object']:.0f}% | {row['boundary_jump_median']:.3f} / "
              f"{row['boundary_jump_max']:.3f} | "
              f"{row['jerk_median']:.1f} / {row['jerk_max']:.1f} | {row['hold_time_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
