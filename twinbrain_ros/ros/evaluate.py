"""Closed-loop evaluation through the robot's ROS topics: success rate per task, Avg@N.

    ros2 run twinbrain_ros evaluate --embodiment widowx --tasks pick_cube put_cube_on_plate \
        --episodes 20 --checkpoint runs/widowx/checkpoints/step_2000 --out runs/eval
    ros2 run twinbrain_ros evaluate --embodiment widowx --policy expert --episodes 20
    ros2 run twinbrain_ros evaluate --policy external ...   (bridge + policy already running,
                                                             e.g. from sim.launch.py)
    ros2 run twinbrain_ros evaluate --transport inprocess --checkpoint DIR ...   (no ROS)

For each task, episode k uses seed `seed + k`, so two policies evaluated with the same
arguments meet the same scenes. The evaluator asks the sim bridge for each episode on
`/sim/reset` and reads its outcome from `/sim/episode`; the policy acts only through the camera,
joint-state, instruction and trajectory topics a real robot has.

`--policy checkpoint` (the default with `--checkpoint`) starts the sim bridge and the policy
node (actuation enabled, simulated time), `--policy expert` starts the bridge with its scripted
expert, `--policy external` uses nodes that are already running. `--transport inprocess` runs
the same policy loop and trajectory follower in this process instead (no ROS; the simulation
waits for the model). Results: `results.json` (per episode and summary, with the motion
metrics of `twinbrain_ros.evaluation.motion`), a printed table, optionally `success.png` and
the first episodes as mp4. From Python: `evaluate(EvaluationConfig(...))` returns the summary
and the episodes.

Motion at realistic latencies: `--chunk-transition blend|rtc` picks how chunks take over,
`--inference-delay S` adds S seconds to every inference, `--rerun` writes a rerun log per
episode (`out/rerun/`), and in process the first episode's joints are plotted to
`out/motion.png`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation.config import POLICIES, TRANSPORTS, EvaluationConfig, EvaluationResult
from ..evaluation.results import format_table, plot_success, save_results, write_video
from ..evaluation.tables import format_simpler_table
from ..policy.config import CHUNK_TRANSITIONS, PolicyConfig
from ..robot.embodiment import Embodiment
from ..transforms.rtc import RTC_SCHEDULES

# Command-line flags that set the policy loop's settings (`PolicyConfig`), by field name.
LOOP_FLAGS = ("actions_per_inference", "chunk_transition", "rtc_schedule", "inference_delay_s")


def evaluate(config: EvaluationConfig) -> EvaluationResult:
    """Run an evaluation; prints a line per episode and the table, writes `results.json`."""
    embodiment = Embodiment.resolve(config.embodiment)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.transport == "inprocess":
        from ..evaluation.inprocess import run_inprocess

        episodes, videos = run_inprocess(config, embodiment,
                                         progress=lambda line: print(line, flush=True))
    else:
        from .evaluator import run_over_ros

        episodes, videos = run_over_ros(config, embodiment, out)
    camera_rate = config.camera_rate_hz or embodiment.control_rate_hz
    for name, frames in videos.items():
        if frames:
            write_video(frames, out / "videos" / f"{name}.mp4", camera_rate)
    summary = save_results(out / "results.json", episodes, config.to_dict())
    print(format_table(summary, title=f"\n{embodiment.name}, policy: {config.policy} "
                                      f"({config.transport})"))
    if config.backend == "simpler_widowx":
        print("\n" + format_simpler_table(summary, episodes))
    if config.plot:
        plot_success({config.policy: summary}, out / "success.png")
    return EvaluationResult(summary=summary, episodes=episodes)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `ros2 run twinbrain_ros evaluate`."""
    parser = argparse.ArgumentParser(
        prog="evaluate", description="Closed-loop success rates through the ROS topics.")
    parser.add_argument("--embodiment", default="widowx", help="widowx or gr1")
    parser.add_argument("--backend", default="", help="simulator backend (default: the "
                                                      "embodiment's CPU backend)")
    parser.add_argument("--tasks", "--task", dest="tasks", nargs="+", required=True,
                        help="task names of the backend")
    parser.add_argument("--episodes", type=int, default=None,
                        help="episodes per task (Avg@N; default 10, and 24 with --backend "
                             "simpler_widowx: SimplerEnv's Bridge protocol with --seed 0)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of each task's first episode (episode k: seed + k)")
    parser.add_argument("--transport", choices=TRANSPORTS, default="ros",
                        help="ros: the sim bridge and the policy node as processes, through "
                             "the robot's topics; inprocess: the node's pipeline and the "
                             "bridge's trajectory follower in this process, without ROS")
    parser.add_argument("--policy", choices=POLICIES, default=None,
                        help="checkpoint (start bridge + policy node), expert (start the "
                             "bridge with its scripted expert) or external (already running); "
                             "default: checkpoint if --checkpoint is given, else external")
    parser.add_argument("--checkpoint", default="",
                        help="checkpoint directory: TwinBrainVLA, or a released starVLA run "
                             "(see docs/released.md)")
    parser.add_argument("--backbone-path", default="",
                        help="base Qwen-VL directory, overriding the one the checkpoint names")
    parser.add_argument("--device", default="auto", help="policy node torch device")
    parser.add_argument("--policy-seed", type=int, default=0,
                        help="seed of the policy's flow-matching noise (-1: fresh noise)")
    parser.add_argument("--actions-per-inference", type=int, default=None,
                        help="policy replanning period in control steps (default: the "
                             "embodiment file's value)")
    parser.add_argument("--image-size", type=int, default=224, help="camera image size (px)")
    parser.add_argument("--camera-rate-hz", type=float, default=0.0,
                        help="camera rate (0: the embodiment's control rate)")
    parser.add_argument("--real-time-factor", type=float, default=1.0,
                        help="simulated seconds per wall-clock second")
    parser.add_argument("--out", default="runs/eval", help="output directory")
    parser.add_argument("--video", type=int, default=0,
                        help="save the first N episodes as mp4 (camera topic)")
    parser.add_argument("--plot", action="store_true", help="save success.png")
    parser.add_argument("--startup-timeout-s", type=float, default=120.0,
                        help="how long to wait for the bridge and policy node")
    parser.add_argument("--episode-timeout-s", type=float, default=300.0,
                        help="wall-clock limit of one episode")
    parser.add_argument("--episode-steps", type=int, default=0,
                        help="length of every episode in control periods (0: the task's own "
                             "limit)")
    parser.add_argument("--chunk-transition", choices=CHUNK_TRANSITIONS, default=None,
                        help="how a new chunk takes over the executing plan: blend "
                             "(cross-fade), rtc (real-time chunking) or ensemble (adaptive "
                             "ensembling, one action per inference); default: the embodiment "
                             "file's chunk_transition")
    parser.add_argument("--rtc-schedule", choices=RTC_SCHEDULES, default=None,
                        help="real-time chunking's guidance weights over the overlap "
                             "(default: the embodiment file's, else exp)")
    parser.add_argument("--inference-delay", dest="inference_delay_s", type=float,
                        default=None, metavar="S",
                        help="add S seconds to every inference (behaviour at realistic "
                             "latencies with a fast model)")
    parser.add_argument("--no-release-protocol", dest="release_protocol",
                        action="store_false",
                        help="run a released checkpoint with the loop settings given here "
                             "instead of its authors' protocol (one action per inference, "
                             "adaptive ensembling over 7 predictions)")
    parser.add_argument("--rerun", action="store_true",
                        help="write a rerun log of the policy's cycles per episode to "
                             "OUT/rerun")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ros2 run twinbrain_ros evaluate`."""
    args = build_parser().parse_args(argv)
    if args.episodes is None:
        args.episodes = 24 if args.backend == "simpler_widowx" else 10
    loop = {name: vars(args).pop(name) for name in LOOP_FLAGS}
    try:
        robot = Embodiment.resolve(args.embodiment)
        evaluate(EvaluationConfig(**vars(args), loop=PolicyConfig.for_robot(robot, **loop)))
    except (ValueError, RuntimeError) as error:
        print(f"evaluate: {error}", flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
