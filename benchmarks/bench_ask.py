r"""What asking the Left Brain costs: prompt pass, time per answer token, effect on chunks.

For each backbone family, a random-weight twin model of `--size` (tiny, mid, full: see
`bench_inference.py`; the real Qwen tokenizer, the backbone's image patch sizes) answers
`--questions` questions of `--max-new-tokens` tokens about one `--image-size` frame, greedy, and
reports the median prompt pass (vision tower + Left Brain decoder + first token) and the median
time per further token. Then the policy's loop as the node runs it: `--cycles` times, a
chunk that follows a chunk and a chunk that follows an answer slice of `--tokens-per-slice`
tokens, in turn; the table gives the chunk latency median of both (side by side, same model)
and the slice median.

Random weights do the arithmetic of trained ones; the answers themselves are meaningless.

  python benchmarks/bench_ask.py --size tiny
  python benchmarks/bench_ask.py --size mid --family all
  python benchmarks/bench_ask.py --size full --device cuda --dtype bfloat16 --family all
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_inference import (  # noqa: E402
    DTYPES,
    attach_processor,
    build_synthetic_model,
    device_name,
    synchronize,
)

from twinbrain_ros.model.ask import LeftBrainAnswerer  # noqa: E402
from twinbrain_ros.model.presets import FAMILIES  # noqa: E402

QUESTION = "Which object on the table is closest to the gripper, and what color is it?"


def parse_args(argv=None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "mid", "full"))
    parser.add_argument("--family", default="qwen2_5_vl", choices=(*FAMILIES, "all"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--tokens-per-slice", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # What build_synthetic_model reads.
    args.synthetic, args.euler_steps = True, 4
    return args


def ms(seconds: list[float]) -> str:
    """Median in milliseconds."""
    return f"{statistics.median(seconds) * 1000:.1f}"


def bench(family: str, args) -> dict:
    """Time answers and the chunk loop with and without slices on one model."""
    device = torch.device(args.device)
    model = build_synthetic_model(family, "twin", args)
    attach_processor(model, family, args.image_size)
    answerer = LeftBrainAnswerer(model)
    frame = np.random.default_rng(args.seed).integers(0, 256, (args.image_size,
                                                               args.image_size, 3), np.uint8)
    state = np.zeros(next(iter(model.config.embodiments.values())).state_dim, np.float32)
    key = next(iter(model.config.embodiments))
    answerer.answer([frame], QUESTION, 2)  # warm-up
    prefill, per_token = [], []
    for _ in range(args.questions):
        generation = answerer.start([frame], QUESTION, args.max_new_tokens)
        synchronize(device)
        start = time.perf_counter()
        generation.step(1)
        synchronize(device)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        while not generation.done:
            generation.step(args.max_new_tokens)
        synchronize(device)
        per_token.append((time.perf_counter() - start) / max(1, len(generation.token_ids) - 1))

    def chunk() -> float:
        synchronize(device)
        start = time.perf_counter()
        model.predict_action([frame], "put the carrot on the plate", state, key, seed=0)
        synchronize(device)
        return time.perf_counter() - start

    for _ in range(3):
        chunk()
    alone, with_slices, slices = [], [], []
    generation = None
    for _ in range(args.cycles):
        # Side by side: a chunk after a chunk, then a chunk after an answer slice.
        chunk()
        alone.append(chunk())
        if generation is None or generation.done:
            generation = answerer.start([frame], QUESTION, 10_000)
            budget = 1
        else:
            budget = args.tokens_per_slice
        start = time.perf_counter()
        generation.step(budget)
        synchronize(device)
        if budget == args.tokens_per_slice:
            slices.append(time.perf_counter() - start)
        with_slices.append(chunk())
    return {"family": family, "prefill": prefill, "per_token": per_token, "alone": alone,
            "with_slices": with_slices, "slices": slices}


def main(argv=None) -> int:
    """Run and print the tables."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    families = FAMILIES if args.family == "all" else (args.family,)
    print(f"device {device_name(torch.device(args.device))}, {args.dtype}, size {args.size}, "
          f"{args.image_size}x{args.image_size} frame, torch threads {torch.get_num_threads()}")
    rows = [bench(family, args) for family in families]
    print("\n| family | prompt pass ms | ms per answer token | tokens/s |")
    print("|---|---|---|---|")
    for r in rows:
        token = statistics.median(r["per_token"])
        print(f"| {r['family']} | {ms(r['prefill'])} | {token * 1000:.2f} | {1 / token:.0f} |")
    print(f"\n| family | chunk ms, after a chunk | chunk ms, after a slice | slice ms "
          f"({args.tokens_per_slice} tokens) | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = statistics.median(r["with_slices"]) / statistics.median(r["alone"])
        print(f"| {r['family']} | {ms(r['alone'])} | {ms(r['with_slices'])} | "
              f"{ms(r['slices'])} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
