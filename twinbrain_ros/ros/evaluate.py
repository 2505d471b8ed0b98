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
the same policy pipeline and trajectory follower in this process instead (no ROS; the
simulation waits for the model). Results: `results.json` (per episode and summary, with the
motion metrics of `twinbrain_ros.sim.motion`), a printed table, optionally `success.png` and the
first episodes as mp4. From Python: `evaluate(EvaluationConfig(...))` returns the summary and
the episodes.

Motion at realistic latencies: `--chunk-transition blend|rtc` picks how chunks take over,
`--inference-delay S` adds S seconds to every inference, `--record` writes a rerun recording
per episode (`out/recordings/`), and in process the first episode's joints are plotted to
`out/motion.png`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from ..robot.embodiment import Embodiment, description_file
from ..sim.evaluation import (
    POLICIES,
    TRANSPORTS,
    EvaluationConfig,
    EvaluationResult,
    format_simpler_table,
    format_table,
    plot_success,
    run_inprocess,
    save_results,
    write_video,
)


class EpisodeTimeout(RuntimeError):
    """The bridge did not report an episode's end in time."""


class Evaluator:
    """A ROS node that runs episodes on the sim bridge and collects their outcomes."""

    def __init__(self, embodiment: Embodiment, video_episodes: int = 0):
        """Create the node, its reset publisher, episode and (for videos) camera subscriptions."""
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        from .conversions import image_to_rgb
        from .sim_bridge import EPISODE_TOPIC, EVENT_QOS, RESET_TOPIC

        self._rclpy = rclpy
        self._string = String
        self._image_to_rgb = image_to_rgb
        self.embodiment = embodiment
        self.node = rclpy.create_node("evaluate")
        self.reset_publisher = self.node.create_publisher(String, RESET_TOPIC, 10)
        self._events: list[dict] = []
        self._cond = threading.Condition()
        self.node.create_subscription(String, EPISODE_TOPIC, self._on_event, EVENT_QOS)
        self.video_episodes = video_episodes
        self._recording: list | None = None
        if video_episodes > 0:
            self.node.create_subscription(Image, embodiment.image_topics[0], self._on_image,
                                          qos_profile_sensor_data)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self._spin = threading.Thread(target=self._spin_loop, daemon=True)
        self._spin.start()

    def _spin_loop(self) -> None:
        while self._rclpy.ok():
            try:
                self.executor.spin_once(timeout_sec=0.1)
            except Exception:  # noqa: BLE001 - shutting down
                break

    def _on_event(self, msg) -> None:
        try:
            event = json.loads(msg.data)
        except ValueError:
            return
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def _on_image(self, msg) -> None:
        frames = self._recording
        if frames is not None:
            try:
                frames.append(self._image_to_rgb(msg))
            except ValueError:
                pass

    def wait_for_bridge(self, timeout_s: float, need_policy: bool, processes=()) -> None:
        """Wait until the bridge (and a policy subscribed to the instruction) is up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {process.returncode}")
            bridge = self.reset_publisher.get_subscription_count() > 0
            policy = (not need_policy or self.node.count_subscribers(
                self.embodiment.instruction_topic) > 0)
            if bridge and policy:
                return
            time.sleep(0.1)
        raise RuntimeError(f"no sim bridge{' and policy node' if need_policy else ''} on the "
                           f"graph after {timeout_s:.0f} s (is sim.launch.py running in this "
                           "ROS_DOMAIN_ID?)")

    def run_episode(self, task: str, seed: int, timeout_s: float, record: bool,
                    processes=()) -> tuple[dict, list]:
        """Request one episode and wait for its end event; returns (result, frames)."""
        with self._cond:
            seen = len(self._events)
        self._recording = [] if record else None
        self.reset_publisher.publish(self._string(data=json.dumps({"seed": seed,
                                                                   "task": task})))
        started = time.monotonic()
        deadline = started + timeout_s
        result = None
        with self._cond:
            while result is None:
                for event in self._events[seen:]:
                    if (event.get("event") == "end" and event.get("seed") == seed
                            and event.get("task") == task):
                        result = event
                seen = len(self._events)
                if result is not None:
                    break
                for name, process in processes:
                    if process.poll() is not None:
                        raise RuntimeError(f"{name} exited with code {process.returncode}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise EpisodeTimeout(f"episode {task} seed {seed}: no end event within "
                                         f"{timeout_s:.0f} s")
                self._cond.wait(min(remaining, 0.5))
        frames, self._recording = self._recording or [], None
        result = {key: result.get(key) for key in ("task", "seed", "instruction", "success",
                                                   "steps", "trajectories", "sim_time", "info",
                                                   "outcome", "final_state", "error", "motion")}
        result["wall_time_s"] = round(time.monotonic() - started, 3)
        return result, frames

    def close(self) -> None:
        """Stop spinning and destroy the node."""
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()


def node_defaults(embodiment: str) -> dict:
    """The policy node's parameters in an embodiment's YAML (scheduling defaults)."""
    import yaml

    path = description_file(embodiment)
    if not path.is_file():
        return {}
    document = yaml.safe_load(path.read_text()) or {}
    return dict(document.get("policy_node", {}).get("ros__parameters", {}))


def evaluate(config: EvaluationConfig) -> EvaluationResult:
    """Run an evaluation; prints a line per episode and the table, writes `results.json`."""
    embodiment = Embodiment.resolve(config.embodiment)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.transport == "inprocess":
        episodes, videos = _evaluate_inprocess(config, embodiment)
    else:
        episodes, videos = _evaluate_ros(config, embodiment, out)
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


def _evaluate_inprocess(config: EvaluationConfig, embodiment: Embodiment):
    """The policy node's pipeline and the bridge's follower, without ROS in between."""
    pipeline, period = None, 1
    if config.policy == "checkpoint":
        from ..policy.pipeline import PolicyPipeline
        from ..policy.runtime import PolicyRuntime

        defaults = node_defaults(config.embodiment)
        runtime = PolicyRuntime(str(Path(config.checkpoint).resolve()), embodiment,
                                device=config.device,
                                seed=None if config.policy_seed < 0 else config.policy_seed)
        pipeline = PolicyPipeline(
            runtime, embodiment, blend_steps=int(defaults.get("blend_steps", 2)),
            chunk_transition=(config.chunk_transition
                              or defaults.get("chunk_transition", "blend")),
            rtc_schedule=config.rtc_schedule)
        period = config.actions_per_inference or int(defaults.get("actions_per_inference", 4))
    return run_inprocess(config, embodiment, pipeline=pipeline, actions_per_inference=period,
                         progress=lambda line: print(line, flush=True))


def _evaluate_ros(config: EvaluationConfig, embodiment: Embodiment, out: Path):
    """Sim bridge and policy node as processes, talking over the robot's topics."""
    import rclpy

    from .processes import ros_environment, start_node, stop_node

    tasks = config.tasks
    processes = []
    log_dir = out / "logs"
    env = ros_environment(Path(tempfile.mkdtemp(prefix="twinbrain_eval_ros_")))
    if config.policy != "external":
        bridge_params = {"embodiment": config.embodiment, "backend": config.backend,
                         "task": tasks[0], "start_episode": False,
                         "expert": config.policy == "expert",
                         "image_width": config.image_size, "image_height": config.image_size,
                         "real_time_factor": config.real_time_factor,
                         "camera_rate_hz": config.camera_rate_hz,
                         "episode_steps": config.episode_steps,
                         "wait_for_policy": config.policy == "checkpoint"}
        processes.append(("sim_bridge", start_node("sim_bridge", env, bridge_params,
                                                   log_path=log_dir / "sim_bridge.log")))
    if config.policy == "checkpoint":
        node_params = {"checkpoint": str(Path(config.checkpoint).resolve()),
                       "device": config.device, "enable_actuation": True,
                       "use_sim_time": True, "seed": config.policy_seed}
        if config.actions_per_inference > 0:
            node_params["actions_per_inference"] = config.actions_per_inference
        if config.chunk_transition:
            node_params["chunk_transition"] = config.chunk_transition
        node_params["rtc_schedule"] = config.rtc_schedule
        node_params["inference_delay_s"] = float(config.inference_delay_s)
        if config.record:
            node_params["record_path"] = str((out / "recordings").resolve())
        processes.append(("policy_node", start_node(
            "policy_node", env, node_params,
            params_file=description_file(config.embodiment),
            log_path=log_dir / "policy_node.log")))
    rclpy.init()
    evaluator = None
    episodes: list[dict] = []
    videos: dict[str, list] = {}
    try:
        evaluator = Evaluator(embodiment, video_episodes=config.video)
        evaluator.wait_for_bridge(config.startup_timeout_s,
                                  need_policy=config.policy != "expert", processes=processes)
        for task in tasks:
            for k in range(config.episodes):
                seed = config.seed + k
                record = len(videos) < config.video
                result, frames = evaluator.run_episode(task, seed, config.episode_timeout_s,
                                                       record, processes)
                result["policy"] = config.policy
                episodes.append(result)
                status = "success" if result["success"] else "failure"
                if result["error"]:
                    status += f" (simulation error: {result['error']})"
                print(f"  {result['task']} seed {seed}: {status} after {result['steps']} steps "
                      f"({result['wall_time_s']:.1f} s)  {result['instruction']!r}", flush=True)
                if record:
                    videos[f"{result['task']}_seed{seed}"] = frames
    finally:
        if evaluator is not None:
            evaluator.close()
        if rclpy.ok():
            rclpy.shutdown()
        for _, process in reversed(processes):
            stop_node(process)
    return episodes, videos


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
    parser.add_argument("--checkpoint", default="", help="TwinBrainVLA checkpoint directory")
    parser.add_argument("--device", default="auto", help="policy node torch device")
    parser.add_argument("--policy-seed", type=int, default=0,
                        help="seed of the policy's flow-matching noise (-1: fresh noise)")
    parser.add_argument("--actions-per-inference", type=int, default=0,
                        help="policy node replanning period in control steps (0: the "
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
    parser.add_argument("--chunk-transition", choices=("blend", "rtc"), default="",
                        help="how a new chunk takes over the executing plan: blend "
                             "(cross-fade) or rtc (real-time chunking); default: the "
                             "embodiment file's chunk_transition")
    parser.add_argument("--rtc-schedule", choices=("exp", "linear", "hard"), default="exp",
                        help="real-time chunking's guidance weights over the overlap")
    parser.add_argument("--inference-delay", dest="inference_delay_s", type=float,
                        default=0.0, metavar="S",
                        help="add S seconds to every inference (behaviour at realistic "
                             "latencies with a fast model)")
    parser.add_argument("--record", action="store_true",
                        help="write a rerun recording per episode to OUT/recordings")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ros2 run twinbrain_ros evaluate`."""
    args = build_parser().parse_args(argv)
    if args.episodes is None:
        args.episodes = 24 if args.backend == "simpler_widowx" else 10
    try:
        evaluate(EvaluationConfig(**vars(args)))
    except (ValueError, RuntimeError) as error:
        print(f"evaluate: {error}", flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
