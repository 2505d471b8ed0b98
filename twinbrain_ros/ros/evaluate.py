"""Closed-loop evaluation through the robot's ROS topics: success rate per task, Avg@N.

    ros2 run twinbrain_ros evaluate --embodiment widowx --tasks pick_cube put_cube_on_plate \
        --episodes 20 --checkpoint runs/widowx/checkpoints/step_2000 --out runs/eval
    ros2 run twinbrain_ros evaluate --embodiment widowx --policy expert --episodes 20
    ros2 run twinbrain_ros evaluate --policy external ...   (bridge + policy already running,
                                                             e.g. from sim.launch.py)

For each task, episode k uses seed `seed + k`, so two policies evaluated with the same
arguments meet the same scenes. The evaluator asks the sim bridge for each episode on
`/sim/reset` and reads its outcome from `/sim/episode`; the policy acts only through the camera,
joint-state, instruction and trajectory topics a real robot has.

`--policy checkpoint` (the default with `--checkpoint`) starts the sim bridge and the policy
node (actuation enabled, simulated time), `--policy expert` starts the bridge with its scripted
expert, `--policy external` uses nodes that are already running. Results: `results.json` (per
episode and summary), a printed table, optionally `success.png` and the first episodes as mp4.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from ..embodiment import Embodiment, config_dir
from ..sim.evaluation import format_table, plot_success, save_results, write_video

POLICIES = ("checkpoint", "expert", "external")


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
        result = {key: result[key] for key in ("task", "seed", "instruction", "success",
                                               "steps", "trajectories", "sim_time", "info",
                                               "outcome", "error")}
        result["wall_time_s"] = round(time.monotonic() - started, 3)
        return result, frames

    def close(self) -> None:
        """Stop spinning and destroy the node."""
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation described by the parsed command line; returns the summary."""
    import rclpy

    from .processes import ros_environment, start_node, stop_node

    embodiment = Embodiment.load(args.embodiment)
    policy = args.policy or ("checkpoint" if args.checkpoint else "external")
    if policy == "checkpoint" and not args.checkpoint:
        raise ValueError("--policy checkpoint needs --checkpoint DIR")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = list(args.tasks)
    processes = []
    log_dir = out / "logs"
    env = ros_environment(Path(tempfile.mkdtemp(prefix="twinbrain_eval_ros_")))
    if policy != "external":
        bridge_params = {"embodiment": args.embodiment, "backend": args.backend,
                         "task": tasks[0], "start_episode": False,
                         "expert": policy == "expert", "image_width": args.image_size,
                         "image_height": args.image_size,
                         "real_time_factor": args.real_time_factor,
                         "camera_rate_hz": args.camera_rate_hz}
        processes.append(("sim_bridge", start_node("sim_bridge", env, bridge_params,
                                                   log_path=log_dir / "sim_bridge.log")))
    if policy == "checkpoint":
        node_params = {"checkpoint": str(Path(args.checkpoint).resolve()),
                       "device": args.device, "enable_actuation": True, "use_sim_time": True,
                       "seed": args.policy_seed}
        if args.actions_per_inference > 0:
            node_params["actions_per_inference"] = args.actions_per_inference
        processes.append(("policy_node", start_node(
            "policy_node", env, node_params,
            params_file=config_dir() / f"{embodiment.name}.yaml",
            log_path=log_dir / "policy_node.log")))
    rclpy.init()
    evaluator = None
    episodes: list[dict] = []
    try:
        evaluator = Evaluator(embodiment, video_episodes=args.video)
        evaluator.wait_for_bridge(args.startup_timeout_s, need_policy=policy != "expert",
                                  processes=processes)
        videos = 0
        for task in tasks:
            for k in range(args.episodes):
                seed = args.seed + k
                record = videos < args.video
                result, frames = evaluator.run_episode(task, seed, args.episode_timeout_s,
                                                       record, processes)
                result["policy"] = policy
                episodes.append(result)
                status = "success" if result["success"] else "failure"
                if result["error"]:
                    status += f" (simulation error: {result['error']})"
                print(f"  {result['task']} seed {seed}: {status} after {result['steps']} steps "
                      f"({result['wall_time_s']:.1f} s)  {result['instruction']!r}", flush=True)
                if record and frames:
                    camera_rate = args.camera_rate_hz or embodiment.control_rate_hz
                    write_video(frames, out / "videos" / f"{result['task']}_seed{seed}.mp4",
                                camera_rate)
                    videos += 1
    finally:
        if evaluator is not None:
            evaluator.close()
        if rclpy.ok():
            rclpy.shutdown()
        for _, process in reversed(processes):
            stop_node(process)
    config = {"embodiment": embodiment.name, "policy": policy, "checkpoint": args.checkpoint,
              "tasks": tasks,
              "episodes_per_task": args.episodes, "seed": args.seed}
    summary = save_results(out / "results.json", episodes, config)
    print(format_table(summary, title=f"\n{embodiment.name}, policy: {policy}"))
    if args.plot:
        plot_success({policy: summary}, out / "success.png")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line of `ros2 run twinbrain_ros evaluate`."""
    parser = argparse.ArgumentParser(
        prog="evaluate", description="Closed-loop success rates through the ROS topics.")
    parser.add_argument("--embodiment", default="widowx", help="widowx or gr1")
    parser.add_argument("--backend", default="", help="simulator backend (default: the "
                                                      "embodiment's CPU backend)")
    parser.add_argument("--tasks", nargs="+", required=True, help="task names of the backend")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task (Avg@N)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of each task's first episode (episode k: seed + k)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ros2 run twinbrain_ros evaluate`."""
    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
    except (ValueError, RuntimeError) as error:
        print(f"evaluate: {error}", flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
