"""`ros2 run twinbrain_ros make_tiny_checkpoint`: tiny random-weight checkpoints to try things.

Usage:
    ros2 run twinbrain_ros make_tiny_checkpoint --family qwen3_vl --out DIR
    ros2 run twinbrain_ros make_tiny_checkpoint --policy widowx --out DIR
(or `python -m twinbrain_ros.tools.make_tiny_checkpoint ...`). The first writes a tiny Qwen-VL
backbone (`twinbrain_ros.model.tiny`). With `--policy EMBODIMENT` it writes a runnable
random-weight TwinBrainVLA checkpoint for that robot to `DIR/policy` on a tiny backbone in
`DIR/backbone`: what `policy.launch.py checkpoint:=DIR/policy` needs to try the node without
training (its actions are random: keep actuation off on a real robot).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..model.presets import FAMILIES
from ..robot.embodiment import Embodiment


def make_tiny_policy(embodiment: str, out: str | Path, family: str = "qwen2_5_vl",
                     seed: int = 0) -> Path:
    """A runnable random-weight policy for an embodiment: `out/backbone` and `out/policy`.

    The policy checkpoint records the backbone's absolute path, so it loads from anywhere.
    Returns the policy checkpoint directory.
    """
    from ..model.tiny import make_tiny_checkpoint, make_tiny_policy_checkpoint

    robot = Embodiment.resolve(embodiment)
    out = Path(out).resolve()
    backbone = make_tiny_checkpoint(family, out / "backbone", seed=seed)
    return make_tiny_policy_checkpoint(backbone, out / "policy", robot.normalization_key,
                                       robot.spec(), seed=seed)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl",
                        help="backbone family")
    parser.add_argument("--policy", default="", metavar="EMBODIMENT",
                        help="also write a runnable random-weight policy checkpoint for this "
                             "robot (widowx, gr1 or a YAML path) to OUT/policy, on a backbone "
                             "in OUT/backbone")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.policy:
            path = make_tiny_policy(args.policy, args.out, args.family, seed=args.seed)
            print(f"wrote a random-weight {args.policy} policy ({args.family} backbone) to "
                  f"{path}\ntry it: ros2 launch twinbrain_ros policy.launch.py "
                  f"embodiment:={args.policy} checkpoint:={path}")
            return 0
        from ..model.tiny import make_tiny_checkpoint

        path = make_tiny_checkpoint(args.family, args.out, seed=args.seed)
    except (OSError, ValueError) as error:
        print(f"make_tiny_checkpoint: {error}")
        return 1
    print(f"wrote tiny {args.family} checkpoint to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
