"""Training throughput (samples/s) and peak memory, activation checkpointing off and on.

One training step = forward (frozen Left Brain under no_grad, Right Brain, DiT flow-matching
loss), backward, gradient clipping and an AdamW step over the Right Brain, the state encoder and
the action expert, on a synthetic batch shaped exactly like the processor's output (one square
frame, an instruction, a state, a chunk of actions). Medians over `--steps` after `--warmup`.

  python benchmarks/bench_train.py --size tiny                       # CPU, fp32
  python benchmarks/bench_train.py --size full --device cuda --family qwen3_vl --batch-size 8
      # Qwen3-VL-4B twin with random weights: Left Brain bf16, trainable parts fp32 master
      # weights with bf16 autocast; activation checkpointing off and on

Random weights do the arithmetic of real ones; the losses are meaningless.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_inference import expert_config, synthetic_inputs, vision_geometry  # noqa: E402

from twinbrain_ros.model.backbone import VisionLanguageInputs, build_vlm  # noqa: E402
from twinbrain_ros.model.presets import backbone_config  # noqa: E402
from twinbrain_ros.model.twinbrain import TwinBrainConfig, TwinBrainVLA  # noqa: E402


def batched(inputs: VisionLanguageInputs, batch: int) -> VisionLanguageInputs:
    """The same prompt and frame `batch` times (equal lengths: no padding)."""
    return VisionLanguageInputs(
        input_ids=inputs.input_ids.repeat(batch, 1),
        attention_mask=inputs.attention_mask.repeat(batch, 1),
        mm_token_type_ids=inputs.mm_token_type_ids.repeat(batch, 1),
        pixel_values=inputs.pixel_values.repeat(batch, 1),
        image_grid_thw=inputs.image_grid_thw.repeat(batch, 1))


def build(family: str, args, device: torch.device) -> TwinBrainVLA:
    """Random-weight model: frozen Left Brain in the compute dtype, trainable parts fp32."""
    vlm_config = backbone_config(family, args.size)
    side = vision_geometry(vlm_config, args.image_size)["side"]
    config = TwinBrainConfig(brain_mode="twin", image_size=(side, side),
                             action_expert=expert_config(args.size, 4))
    left_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = TwinBrainVLA.from_vlm(config, build_vlm(vlm_config, dtype=left_dtype))
    for part in (model.right, model.state_encoders, model.action_expert):
        part.to(torch.float32)
    return model.train()


def bench(family: str, checkpointing: bool, args) -> dict:
    """Time training steps of one configuration."""
    device = torch.device(args.device)
    model = build(family, args, device)
    if checkpointing:
        model.enable_activation_checkpointing()
    vlm_config = backbone_config(family, args.size)
    inputs = batched(synthetic_inputs(vlm_config, args.image_size, 20, torch.float32, device,
                                      seed=0), args.batch_size)
    horizon = model.config.action_expert.horizon
    action_dim = model.config.action_expert.action_dim
    gen = torch.Generator().manual_seed(0)
    state = torch.rand(args.batch_size, model.config.max_state_dim, generator=gen).to(device)
    state_mask = torch.ones_like(state)
    actions = (torch.rand(args.batch_size, horizon, action_dim, generator=gen) * 2 - 1).to(device)
    action_mask = torch.ones_like(actions, dtype=torch.bool)
    embodiments = ["default"] * args.batch_size
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model.compute_loss(inputs, state, state_mask, embodiments, actions,
                                      action_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # resident set size of the whole process (kB on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {"family": family, "checkpointing": checkpointing, "step_ms": 1000 * median,
              "samples_s": args.batch_size / median, "peak_gib": peak,
              "prompt_tokens": inputs.input_ids.shape[1],
              "trainable_m": sum(p.numel() for p in params) / 1e6}
    del model, optimizer, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the configurations and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--family", choices=["qwen2_5_vl", "qwen3_vl", "all"], default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available in this torch build")
    families = ["qwen2_5_vl", "qwen3_vl"] if args.family == "all" else [args.family]
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    print(f"training step, {args.size} twin, batch {args.batch_size}, device {args.device}, "
          f"torch {torch.__version__}, {args.steps} steps after {args.warmup} warm-up")
    print(f"{'family':<12}{'act. ckpt':>10}{'prompt':>8}{'trainable M':>13}{'step ms':>10}"
          f"{'samples/s':>11}{'peak GiB':>10}")
    for family in families:
        for checkpointing in modes:
            r = bench(family, checkpointing, args)
            print(f"{r['family']:<12}{str(r['checkpointing']):>10}{r['prompt_tokens']:>8}"
                  f"{r['trainable_m']:>13.1f}{r['step_ms']:>10.1f}{r['samples_s']:>11.2f}"
                  f"{r['peak_gib']:>10.2f}", flush=True)
    if args.device == "cpu":
        print("peak GiB on CPU is the process's maximum resident set size so far")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
