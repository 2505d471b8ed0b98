r"""Training options side by side on the demo's task: speed and held-out error per option.

Records the demo's scripted demonstrations (`pick_cube_two_slots`, WidowX, 96x96 camera) and a
held-out set from other seeds once, then trains the demo's model (tiny Qwen3-VL twin, small
DiT) for `--steps` steps with each option set and reports, per run: training time, samples/s,
seconds of data loading per step, and on the held-out frames the flow-matching loss (fixed
noise and times) and the error of sampled action chunks (4 Euler steps, normalized units,
mean squared) for the raw weights and, with `ema_decay`, for the moving average.

  python benchmarks/bench_train_options.py --steps 1000 \
      "cache_images=false flow_draws_per_sample=1" \
      "cache_images=true flow_draws_per_sample=1 ema_decay=0.995" \
      "cache_images=true flow_draws_per_sample=4 ema_decay=0.995"

Each option set is `key=value` pairs of `TrainConfig` on top of the demo's configuration.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from twinbrain_ros.demo import EMBODIMENT, TASK, DemoConfig  # noqa: E402
from twinbrain_ros.training import Collator, TrainConfig, train  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("options", nargs="+", help="option sets, e.g. 'flow_draws_per_sample=4'")
    parser.add_argument("--out", default="runs/bench_train_options")
    parser.add_argument("--demos", type=int, default=200)
    parser.add_argument("--held-out", type=int, default=20, help="held-out demonstrations")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-frames", type=int, default=128)
    return parser.parse_args(argv)


def demo_config(out: Path, backbone: Path, steps: int, options: str) -> TrainConfig:
    """The demo's training configuration with `options` applied."""
    cfg = DemoConfig()
    values = dict(
        backbone_path=str(backbone),
        datasets=[{"path": str(out / "dataset"), "embodiment": EMBODIMENT}],
        output_dir=str(out / "runs" / options.replace(" ", "_").replace("=", "-")),
        horizon=cfg.horizon, image_size=[cfg.image_size, cfg.image_size], max_state_dim=8,
        max_action_dim=8, action_expert={"hidden_size": 128, "num_layers": 4, "num_heads": 4},
        batch_size=cfg.batch_size, steps=steps, lr_right=cfg.lr, lr_expert=cfg.lr,
        warmup_steps=min(100, steps // 10), num_workers=0, save_every=steps, keep_last=1,
        log_every=max(1, steps // 50), seed=0)
    for pair in options.split():
        key, value = pair.split("=", 1)
        values[key] = json.loads(value) if value not in ("true", "false") else value == "true"
    return TrainConfig(**values)


@torch.no_grad()
def held_out_errors(model, held_out, frames: int) -> dict:
    """Flow-matching loss (fixed draws) and sampled-chunk MSE on held-out frames."""
    model.eval()
    collate = Collator(model)
    rng = np.random.default_rng(0)
    indices = rng.choice(len(held_out), size=min(frames, len(held_out)), replace=False)
    losses, errors = [], []
    for start in range(0, len(indices), 16):
        batch = collate([held_out[int(i)] for i in indices[start:start + 16]])
        generator = torch.Generator().manual_seed(start)
        expert = model.config.action_expert
        n = len(batch["embodiments"])
        noise = torch.randn(n, expert.horizon, expert.action_dim, generator=generator)
        t = model.action_expert.sample_timesteps(n, device="cpu", generator=generator)
        losses.append(float(model.compute_loss(
            batch["inputs"], batch["state"], batch["state_mask"], batch["embodiments"],
            batch["actions"], batch["action_mask"], noise=noise, t=t)))
        chunks = model.sample_actions(batch["inputs"], batch["state"], batch["state_mask"],
                                      batch["embodiments"], noise=torch.randn(
                                          n, expert.horizon, expert.action_dim,
                                          generator=generator))
        mask = batch["action_mask"].float()
        errors.append(float((((chunks - batch["actions"]) ** 2) * mask).sum() / mask.sum()))
    return {"flow_loss": statistics.mean(losses), "action_mse": statistics.mean(errors)}


def main(argv=None) -> int:
    """Record once, train each option set, print the table."""
    from twinbrain_ros.data.lerobot import LeRobotDataset
    from twinbrain_ros.model.checkpoint import load_checkpoint
    from twinbrain_ros.model.tiny import make_tiny_checkpoint
    from twinbrain_ros.robot.embodiment import Embodiment
    from twinbrain_ros.sim.record import record_demonstrations

    args = parse_args(argv)
    out = Path(args.out)
    image_size = DemoConfig().image_size
    if not (out / "held_out").is_dir():
        shutil.rmtree(out, ignore_errors=True)
        record_demonstrations(out / "dataset", EMBODIMENT, [TASK], args.demos, seed=0,
                              image_size=image_size)
        record_demonstrations(out / "held_out", EMBODIMENT, [TASK], args.held_out,
                              seed=50_000, image_size=image_size)
        make_tiny_checkpoint("qwen3_vl", out / "backbone")
    rows = []
    for options in args.options:
        config = demo_config(out, out / "backbone", args.steps, options)
        shutil.rmtree(config.output_dir, ignore_errors=True)
        start = time.monotonic()
        last = train(config)
        seconds = time.monotonic() - start
        held_out = LeRobotDataset(out / "held_out", horizon=config.horizon,
                                  embodiment=Embodiment.resolve(EMBODIMENT))
        row = {"options": options, "train_s": seconds,
               "samples_per_s": args.steps * config.batch_size / seconds}
        row["raw"] = held_out_errors(load_checkpoint(last, use_ema=False), held_out,
                                     args.eval_frames)
        if (last / "ema.safetensors").is_file():
            row["ema"] = held_out_errors(load_checkpoint(last), held_out, args.eval_frames)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.steps} steps, batch {DemoConfig().batch_size}, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| options | train s | samples/s | held-out flow loss | held-out action MSE |")
    print("|---|---|---|---|---|")
    for row in rows:
        for weights in ("raw", "ema"):
            if weights in row:
                label = row["options"] + (" (EMA weights)" if weights == "ema" else "")
                print(f"| {label} | {row['train_s']:.0f} | {row['samples_per_s']:.1f} | "
                      f"{row[weights]['flow_loss']:.4f} | {row[weights]['action_mse']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
