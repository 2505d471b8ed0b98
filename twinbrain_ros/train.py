r"""Train TwinBrainVLA's Right Brain, state encoders and action expert on LeRobot datasets.

    ros2 run twinbrain_ros train --config config/train.yaml backbone_path=/ckpt/Qwen3-VL-4B \
        datasets='[{path: /data/bridge, embodiment: widowx}]' steps=40000
    torchrun --nproc_per_node 8 -m twinbrain_ros.train --config my.yaml         # one node, 8 GPUs
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint HOST:29500 -m twinbrain_ros.train --config my.yaml      # two nodes

The Left Brain stays frozen and is never saved again (checkpoints point at the backbone). The
only loss is flow matching. Data order and flow-matching noise are functions of (seed, step):
a run resumed with `resume=true` from its newest complete checkpoint continues exactly as the
uninterrupted run would, and N processes with per-process batch B see the same samples and
noise as one process with batch N x B.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (`ros2 run twinbrain_ros train`, `python -m ...`, torchrun)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="training YAML (see config/train.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (YAML values)")
    args = parser.parse_args(argv)
    from .training import load_config, train  # torch: after --help has answered

    try:
        config = load_config(args.config, args.overrides)
        last = train(config)
    except ValueError as error:  # includes dataset and checkpoint errors, which name the cause
        print(f"train: {error}", file=sys.stderr, flush=True)
        return 1
    if last is not None:
        print(f"last checkpoint: {last}", flush=True)
        print(json.dumps({"checkpoint": str(last)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
