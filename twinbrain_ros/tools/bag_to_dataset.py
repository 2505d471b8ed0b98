"""Convert rosbag2 recordings (MCAP or sqlite3) into a LeRobot dataset, without ROS.

Usage:
    ros2 run twinbrain_ros bag_to_dataset BAG [BAG ...] --out DIR --embodiment widowx
    python -m twinbrain_ros.tools.bag_to_dataset BAG --out DIR --embodiment gr1 --fps 20

Each bag's camera images, joint states, commanded trajectories (or next states) and
instructions are resampled on a time grid at `--fps` by zero-order hold; stale streams are
never interpolated: those steps are dropped and the episode is split there. A summary per bag
(episodes, frames, gaps per stream with their time spans) is printed. The alignment rules are
documented in `twinbrain_ros.data.rosbag`.
"""

from __future__ import annotations

import argparse
import sys

from ..data.rosbag import ACTION_SOURCES, TIME_SOURCES, BagError, ConversionOptions, convert_bags
from ..robot.embodiment import Embodiment, EmbodimentError


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="bag_to_dataset", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("bags", nargs="+", metavar="BAG", help="rosbag2 directories")
    parser.add_argument("--out", required=True, help="dataset directory to create")
    parser.add_argument("--embodiment", required=True,
                        help="embodiment name (config/<name>.yaml: widowx, gr1) or a YAML path")
    parser.add_argument("--fps", type=float, default=None,
                        help="grid rate (default: the embodiment's control_rate_hz)")
    parser.add_argument("--actions", choices=ACTION_SOURCES, default=None,
                        help="commanded JointTrajectory, or the next joint state (default: "
                             "trajectory for joint-position embodiments, next-state for "
                             "end-effector delta ones)")
    parser.add_argument("--format", choices=("v2.1", "v3.0"), default="v3.0",
                        help="LeRobot dataset format version")
    parser.add_argument("--no-videos", action="store_true",
                        help="store images in the parquet files instead of MP4 videos")
    parser.add_argument("--image-topics", nargs="+", default=None, metavar="TOPIC",
                        help="camera topics (default: the embodiment's image_topics)")
    parser.add_argument("--image-keys", nargs="+", default=None, metavar="KEY",
                        help="dataset image keys (or names after 'observation.images.'), one "
                             "per image topic (default: from the topic names)")
    parser.add_argument("--max-gap", type=float, default=None, metavar="SECONDS",
                        help="oldest message a stream may hold at a grid time (default 2/fps)")
    parser.add_argument("--episode-marker-topic", default="/episode_marker",
                        help="std_msgs/String topic that splits episodes ('end' ends one)")
    parser.add_argument("--default-instruction", default=None, metavar="TEXT",
                        help="instruction for bags without one (and before the first one)")
    parser.add_argument("--time-source", choices=TIME_SOURCES, default="auto",
                        help="auto: header stamps when non-zero, else bag time; receive: "
                             "bag time")
    parser.add_argument("--min-episode-frames", type=int, default=1,
                        help="drop shorter runs of frames (between gaps)")
    return parser



def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the exit status (0 ok, 1 conversion error)."""
    args = build_parser().parse_args(argv)
    options = ConversionOptions(
        fps=args.fps, actions=args.actions, image_topics=args.image_topics,
        image_keys=args.image_keys, max_gap_s=args.max_gap,
        episode_marker_topic=args.episode_marker_topic,
        default_instruction=args.default_instruction, time_source=args.time_source,
        min_episode_frames=args.min_episode_frames)
    try:
        embodiment = Embodiment.resolve(args.embodiment)
        root, reports = convert_bags(args.bags, args.out, embodiment, options,
                                     version=args.format, use_videos=not args.no_videos)
    except (BagError, EmbodimentError, ImportError, OSError, ValueError) as exc:
        # ValueError covers the dataset writer's DatasetError.
        print(f"bag_to_dataset: error: {exc}", file=sys.stderr)
        return 1
    for report in reports:
        print(report.format())
    episodes = sum(len(r.episodes) for r in reports)
    frames = sum(r.frames for r in reports)
    print(f"wrote {episodes} episodes, {frames} frames from {len(reports)} bag(s) to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
