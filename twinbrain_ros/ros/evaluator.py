"""Evaluation episodes through the robot's ROS topics: the sim bridge and the policy node.

The evaluator asks the sim bridge for each episode on `/sim/reset` and reads its outcome from
`/sim/episode`; the policy acts only through the camera, joint-state, instruction and
trajectory topics a real robot has. `ros2 run twinbrain_ros evaluate` (`evaluate.py`) is the
command line.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict
from pathlib import Path

from ..evaluation.config import EvaluationConfig
from ..robot.embodiment import Embodiment, description_file


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
        self._frames: list | None = None
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
        frames = self._frames
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

    def run_episode(self, task: str, seed: int, timeout_s: float, keep_frames: bool,
                    processes=()) -> tuple[dict, list]:
        """Request one episode and wait for its end event; returns (result, frames)."""
        with self._cond:
            seen = len(self._events)
        self._frames = [] if keep_frames else None
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
        frames, self._frames = self._frames or [], None
        result = {key: result.get(key) for key in ("task", "seed", "instruction", "success",
                                                   "steps", "trajectories", "sim_time", "info",
                                                   "outcome", "final_state", "error", "motion")}
        result["wall_time_s"] = round(time.monotonic() - started, 3)
        return result, frames

    def close(self) -> None:
        """Stop spinning and destroy the node."""
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()


def run_over_ros(config: EvaluationConfig, embodiment: Embodiment, out: Path
                 ) -> tuple[list[dict], dict]:
    """The episodes of `config`, the sim bridge and policy node as processes over ROS.

    Returns the per-episode results and {episode name: frames} of the first `config.video`
    episodes (the camera topic).
    """
    import rclpy

    from .processes import ros_environment, start_node, stop_node

    tasks = config.tasks
    processes = []
    log_dir = out / "logs"
    env = ros_environment(log_dir / "ros")  # the nodes' ROS logs, beside their output
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
        # The loop's settings as the evaluation resolved them (the robot's file, then the
        # command line), over the params file's.
        node_params = {**asdict(config.loop), "checkpoint": str(Path(config.checkpoint).resolve()),
                       "device": config.device, "enable_actuation": True,
                       "use_sim_time": True, "seed": config.policy_seed,
                       "release_protocol": config.release_protocol,
                       "backbone_path": config.backbone_path}
        if config.rerun:
            node_params["rerun_path"] = str((out / "rerun").resolve())
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
                keep = len(videos) < config.video
                result, frames = evaluator.run_episode(task, seed, config.episode_timeout_s,
                                                       keep, processes)
                result["policy"] = config.policy
                episodes.append(result)
                status = "success" if result["success"] else "failure"
                if result["error"]:
                    status += f" (simulation error: {result['error']})"
                print(f"  {result['task']} seed {seed}: {status} after {result['steps']} steps "
                      f"({result['wall_time_s']:.1f} s)  {result['instruction']!r}", flush=True)
                if keep:
                    videos[f"{result['task']}_seed{seed}"] = frames
    finally:
        if evaluator is not None:
            evaluator.close()
        if rclpy.ok():
            rclpy.shutdown()
        for _, process in reversed(processes):
            stop_node(process)
    return episodes, videos
