r"""Per-stage inference latency of TwinBrainVLA: one action chunk for one observation (batch 1).

For every (backbone family, brain mode) the script builds a model, runs `--warmup` untimed
chunks, then `--repeats` chunks with a `StageTimer` (per-stage medians: preprocess, vision,
left_brain, right_brain, action_expert) and, separately, `--repeats` chunks without a timer for
the end-to-end total (median and p90). On CUDA the stage timer synchronises at every stage
boundary, which costs a little; the untimed total synchronises only before and after the chunk,
so it is the latency to quote. "sum of stages" and "unattributed" (total minus that sum: M-RoPE
indexing, Python glue, the missing stage-boundary syncs) show how the two relate.

Sizes:
  * `--size tiny`: a tiny random-weight checkpoint is written to a temporary directory and loaded
    like a real one (`TwinBrainVLA.from_backbone`); chunks come from `predict_action`, i.e. from
    a camera frame and an instruction string through the real tokenizer and image processor,
    whose CPU time is the `preprocess` stage. The tiny image processor caps frames at 112x112
    pixels, so the image-token count is lower than `--image-size` suggests (the table says so).
    Small DiT: 4 layers, width 128, 4 heads.
  * `--size full`: Qwen2.5-VL-3B / Qwen3-VL-4B dimensions with random weights, built directly on
    `--device` (no checkpoint is needed or downloaded), and the default DiT-B action expert
    (16 layers, width 768, 12 heads). The processor is not used: the prompt token ids, pixel
    values and grid are built synthetically with exactly the shapes the processor gives for an
    `--image-size` square frame, and chunks come from `sample_actions` (no `preprocess` stage).
  * `--size tiny --synthetic`: the `full` code path (synthetic inputs, model built on the device)
    with the tiny configs; this is how the full-size path is checked on a CPU.

Usage (from the repository root):
  python benchmarks/bench_inference.py --size tiny
  python benchmarks/bench_inference.py --size tiny --synthetic --brain-mode all
  python benchmarks/bench_inference.py --size full --device cuda --dtype bfloat16
  python benchmarks/bench_inference.py --size full --device cuda --dtype bfloat16 \
      --family all --brain-mode all --json bench_full_bf16.json
  python benchmarks/bench_inference.py --size full --device cuda:0 --dtype bfloat16 \
      --family qwen3_vl --image-size 448 --instruction-tokens 32 --euler-steps 8

Paths (`--compare eager,compiled`): the same model, the same camera frame(s), instruction, state
and noise seed, through `TwinBrainVLA.predict_action` (eager: DynamicCache, Python dispatch),
`InferenceEngine` uncompiled (static: padded buckets, 4-D masks, one function) and
`InferenceEngine` compiled (torch.compile; CUDA graphs on CUDA). Each path is timed end to end
(processor included) after its warm-up, which for `compiled` is the compile; the table shows
per-stage medians where the path has stages, the total's median and p99, the ratio to eager
and the largest difference of its actions from eager's. `--size mid` is a CPU-sized model with
8 decoder layers of width 512 per brain; mid and full sizes get the real Qwen tokenizer and an
image processor of the backbone's patch sizes.

  python benchmarks/bench_inference.py --compare eager,compiled --size tiny --family all
  python benchmarks/bench_inference.py --compare eager,compiled --size full --device cuda \
      --dtype bfloat16 --family all --brain-mode all

Random weights do the same arithmetic as trained ones, so the timings hold for real checkpoints
of the same sizes; the actions themselves are meaningless.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers

# Benchmark the checkpoint this script lives in, installed or not.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from twinbrain_ros.model.action_expert import ActionExpertConfig  # noqa: E402
from twinbrain_ros.model.backbone import VisionLanguageInputs, build_vlm  # noqa: E402
from twinbrain_ros.model.presets import (  # noqa: E402
    FAMILIES,
    QWEN_TOKEN_IDS,
    SIZES,
    backbone_config,
)
from twinbrain_ros.model.timing import StageTimer  # noqa: E402
from twinbrain_ros.model.tiny import make_tiny_checkpoint  # noqa: E402
from twinbrain_ros.model.twinbrain import BRAIN_MODES, TwinBrainConfig, TwinBrainVLA  # noqa: E402

STAGES = ("preprocess", "vision", "left_brain", "right_brain", "action_expert")
PATHS = ("eager", "static", "compiled")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EMBODIMENT = "default"  # TwinBrainConfig's default embodiment: state 8, action 7

# Qwen chat-template token ids (shared by the Qwen2.5-VL and Qwen3-VL tokenizers).
IM_START, IM_END = 151644, 151645
NEWLINE, USER, ASSISTANT = 198, 872, 77091
NUM_ORDINARY_TOKENS = 151643  # ids below this are BPE tokens; special tokens start here

# Single-token words (with their leading space) for an instruction of an exact token count.
INSTRUCTION_WORDS = ("pick up the red block and place it in the blue bowl next to the green cup "
                     "on the left side of the table then").split()


# -- arguments and environment ------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; resolves `device` and `dtype`."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--family", choices=(*FAMILIES, "all"), default="all")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--synthetic", action="store_true",
                        help="with --size tiny: use the full-size code path (synthetic inputs, "
                             "model built on the device) with the tiny configs; --size full "
                             "always uses it")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="weights and activations dtype (default float32 on cpu; required "
                             "on other devices)")
    parser.add_argument("--brain-mode", choices=(*BRAIN_MODES, "all"), default="twin")
    parser.add_argument("--repeats", type=int, default=20, help="timed chunks per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed chunks first")
    parser.add_argument("--image-size", type=int, default=224,
                        help="square camera frame side in pixels (one camera)")
    parser.add_argument("--instruction-tokens", type=int, default=20)
    parser.add_argument("--euler-steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the results to this JSON file")
    parser.add_argument("--compare", default="", metavar="PATHS",
                        help="e.g. eager,compiled: run the inference paths side by side in one "
                             "process through the processor (see 'Paths' above)")
    parser.add_argument("--cameras", type=int, default=1, help="cameras (with --compare)")
    args = parser.parse_args(argv)

    args.synthetic = args.synthetic or args.size in ("mid", "full")
    args.compare = [p.strip() for p in args.compare.split(",")] if args.compare else []
    unknown = sorted(set(args.compare) - set(PATHS))
    if unknown:
        parser.error(f"--compare: unknown paths {unknown}; choose from {PATHS}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    for name, minimum in (("repeats", 1), ("warmup", 0), ("image_size", 32),
                          ("instruction_tokens", 1), ("euler_steps", 1)):
        if getattr(args, name) < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}")

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch build ({torch.__version__}) has no CUDA support"
                   if torch.version.cuda is None else
                   f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU "
                   f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
            parser.error(f"--device {args.device}: CUDA is not available: {why}. Run on a GPU "
                         "machine with a CUDA build of torch, or use --device cpu.")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA "
                         "device(s) visible")
        device = torch.device("cuda", index)
        # StageTimer synchronises the *current* device: make it this one.
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        parser.error(f"--device {args.device}: only cpu and cuda are supported")
    args.device = device

    if args.dtype is None:
        if device.type != "cpu":
            parser.error(f"--dtype is required with --device {args.device}: pass --dtype "
                         "bfloat16 (the deployment dtype) or --dtype float32")
        args.dtype = "float32"
    return args


def device_name(device: torch.device) -> str:
    """Human-readable name of the device the model runs on."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    cpu = platform.processor() or platform.machine() or "unknown CPU"
    return f"CPU {cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def environment(device: torch.device) -> dict:
    """What the numbers depend on besides the model."""
    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return env


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Release what the previous configuration left behind."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- models and inputs --------------------------------------------------------------------------


def expert_config(size: str, euler_steps: int) -> ActionExpertConfig:
    """DiT-B (the default) at full size, a small DiT for the tiny backbones."""
    if size == "full":
        return ActionExpertConfig(action_dim=32, num_inference_steps=euler_steps)
    if size == "mid":
        return ActionExpertConfig(action_dim=32, hidden_size=384, num_layers=8, num_heads=6,
                                  num_inference_steps=euler_steps)
    return ActionExpertConfig(action_dim=32, hidden_size=128, num_layers=4, num_heads=4,
                              num_inference_steps=euler_steps)


def vision_geometry(vlm_config, image_size: int) -> dict:
    """Patch sizes of a backbone and the processed size / grid / token count of a square frame."""
    vision = vlm_config.vision_config
    patch, merge = vision.patch_size, vision.spatial_merge_size
    factor = patch * merge
    side = max(factor, round(image_size / factor) * factor)
    grid = side // patch
    return dict(patch=patch, merge=merge, temporal_patch=vision.temporal_patch_size,
                in_channels=vision.in_channels, side=side, grid_h=grid, grid_w=grid,
                image_tokens=grid * grid // merge**2)


def synthetic_inputs(vlm_config, image_size: int, instruction_tokens: int, dtype: torch.dtype,
                     device: torch.device, seed: int) -> VisionLanguageInputs:
    r"""Exactly what `QwenVLProcessor` gives for one square frame and an instruction, but random.

    The prompt is `<|im_start|>user\n<|vision_start|>` + image pads + `<|vision_end|>` +
    instruction + `<|im_end|>\n<|im_start|>assistant\n`, as in `QwenVLProcessor.prompt`.
    """
    for key, value in QWEN_TOKEN_IDS.items():
        if getattr(vlm_config, key) != value:
            raise ValueError(f"backbone config {key}={getattr(vlm_config, key)} != {value}")
    geo = vision_geometry(vlm_config, image_size)
    gen = torch.Generator().manual_seed(seed)  # CPU: the same inputs on every device
    text = torch.randint(0, NUM_ORDINARY_TOKENS, (instruction_tokens,), generator=gen).tolist()
    image = QWEN_TOKEN_IDS["image_token_id"]
    ids = ([IM_START, USER, NEWLINE, QWEN_TOKEN_IDS["vision_start_token_id"]]
           + [image] * geo["image_tokens"] + [QWEN_TOKEN_IDS["vision_end_token_id"]] + text
           + [IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE])
    input_ids = torch.tensor([ids], dtype=torch.long)
    patches = 1 * geo["grid_h"] * geo["grid_w"]  # grid_t = 1: one frame (temporal patch 2)
    patch_dim = geo["in_channels"] * geo["temporal_patch"] * geo["patch"] ** 2
    return VisionLanguageInputs(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=(input_ids == image).to(torch.int32),
        pixel_values=torch.randn(patches, patch_dim, generator=gen).to(dtype),
        image_grid_thw=torch.tensor([[1, geo["grid_h"], geo["grid_w"]]], dtype=torch.long),
    ).to(device)


def build_synthetic_model(family: str, brain_mode: str, args) -> TwinBrainVLA:
    """Random-weight model of `args.size` built directly on the device in the target dtype."""
    dtype, device = DTYPES[args.dtype], args.device
    vlm_config = backbone_config(family, args.size)
    side = vision_geometry(vlm_config, args.image_size)["side"]
    config = TwinBrainConfig(brain_mode=brain_mode, image_size=(side, side),
                             action_expert=expert_config(args.size, args.euler_steps))
    torch.manual_seed(args.seed)
    # Allocate on the target device from the start: a 4B model is never materialised on the
    # host, and the Right Brain's deep copy is made on the device too.
    with torch.device(device):
        vlm = build_vlm(vlm_config, dtype=dtype)
        model = TwinBrainVLA.from_vlm(config, vlm, processor=None)
        # As `from_backbone` does: the state encoders and the DiT go to the same dtype.
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def build_tiny_model(checkpoint: Path, brain_mode: str, args) -> TwinBrainVLA:
    """Tiny model loaded from a checkpoint directory exactly like a real one."""
    config = TwinBrainConfig(backbone_path=str(checkpoint), brain_mode=brain_mode,
                             image_size=(args.image_size, args.image_size),
                             action_expert=expert_config("tiny", args.euler_steps))
    torch.manual_seed(args.seed)
    model = TwinBrainVLA.from_backbone(config, dtype=DTYPES[args.dtype], device=args.device)
    return model.eval()


def instruction_text(tokenizer, num_tokens: int) -> str:
    """An English instruction that the tokenizer splits into exactly `num_tokens` tokens."""
    words = [INSTRUCTION_WORDS[i % len(INSTRUCTION_WORDS)] for i in range(num_tokens)]
    text = " ".join(words)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > num_tokens:  # not expected with these words; trim and re-check
        text = tokenizer.decode(ids[:num_tokens])
    return text


def count_params(module: torch.nn.Module | None) -> int:
    """Number of parameters of a module (0 for None)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def model_info(model: TwinBrainVLA) -> dict:
    """Sizes of the brains and the DiT, and the attention implementation."""
    expert = model.config.action_expert
    vlm_config = model.right.vlm.config
    return {
        "attention": {"text": vlm_config.get_text_config()._attn_implementation,
                      "vision": vlm_config.vision_config._attn_implementation,
                      "dit": "torch sdpa"},
        "params_left_brain": count_params(model.left),
        "params_right_brain": count_params(model.right),
        "params_action_expert": count_params(model.action_expert),
        "params_total": count_params(model),
        "dit": {"num_layers": expert.num_layers, "hidden_size": expert.hidden_size,
                "num_heads": expert.num_heads, "horizon": expert.horizon,
                "action_dim": expert.action_dim},
        "text_layers": vlm_config.get_text_config().num_hidden_layers,
        "text_hidden": vlm_config.get_text_config().hidden_size,
        "vision_layers": vlm_config.vision_config.depth,
    }


# -- measuring ----------------------------------------------------------------------------------


def summarize(seconds: list[float]) -> dict:
    """Median / p90 / min / mean in milliseconds."""
    ms = np.asarray(seconds) * 1000.0
    return {"median": float(statistics.median(ms)), "p90": float(np.percentile(ms, 90)),
            "min": float(ms.min()), "mean": float(ms.mean()), "n": int(ms.size)}


def measure(run: Callable[[StageTimer | None], object], device: torch.device, warmup: int,
            repeats: int) -> tuple[dict, dict, object]:
    """Warm up, then time `repeats` staged chunks and, separately, `repeats` untimed ones.

    Returns the per-stage summaries, the end-to-end summary and the last chunk.
    """
    with torch.inference_mode():
        for _ in range(warmup):
            run(None)
        synchronize(device)
        timer = StageTimer(device)  # synchronises CUDA at each stage boundary
        for _ in range(repeats):
            run(timer)
        totals = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            chunk = run(None)
            synchronize(device)
            totals.append(time.perf_counter() - start)
    stages = {name: summarize(timer.samples[name]) for name in STAGES if name in timer.samples}
    return stages, summarize(totals), chunk


def bench_one(family: str, brain_mode: str, args, checkpoint: Path | None) -> dict:
    """Build one configuration, time it and return its results (the model is dropped here)."""
    device = args.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    build_start = time.perf_counter()
    if args.synthetic:
        model = build_synthetic_model(family, brain_mode, args)
    else:
        model = build_tiny_model(checkpoint, brain_mode, args)
    synchronize(device)
    build_s = time.perf_counter() - build_start
    weights_gib = build_peak_gib = None
    if device.type == "cuda":
        weights_gib = torch.cuda.memory_allocated(device) / 2**30
        build_peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)

    rng = np.random.default_rng(args.seed)
    spec = model.config.embodiments[EMBODIMENT]
    state = rng.standard_normal(spec.state_dim).astype(np.float32)
    if args.synthetic:
        inputs = synthetic_inputs(model.right.vlm.config, args.image_size,
                                  args.instruction_tokens, model.dtype, device, args.seed)
        # As predict_action does: M-RoPE positions on the CPU (its preprocess stage), so the
        # timed chunk has no host synchronisation for them.
        inputs = model.right.with_positions(inputs.to("cpu")).to(device)
        padded, mask = model.state_tensors([state], EMBODIMENT)
        padded, mask = padded.to(device), mask.to(device)
        generator = torch.Generator(device=device)

        def run(timer):
            generator.manual_seed(args.seed)  # the same noise every chunk, as predict_action
            return model.sample_actions(inputs, padded, mask, [EMBODIMENT],
                                        num_steps=args.euler_steps, generator=generator,
                                        timer=timer)
    else:
        image = rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
        instruction = instruction_text(model.processor.tokenizer, args.instruction_tokens)
        inputs = model.processor([[image]], [instruction])  # for the token counts only

        def run(timer):
            return model.predict_action([image], instruction, state, EMBODIMENT, seed=args.seed,
                                        num_steps=args.euler_steps, timer=timer)

    grid = inputs.image_grid_thw[0].tolist()
    patch = model.right.vlm.config.vision_config.patch_size
    instruction_tokens = args.instruction_tokens
    if not args.synthetic:
        instruction_tokens = len(model.processor.tokenizer(
            instruction, add_special_tokens=False)["input_ids"])
    result = {
        "family": family,
        "brain_mode": brain_mode,
        "size": args.size,
        "inputs": "synthetic" if args.synthetic else "processor",
        "dtype": args.dtype,
        "device": device_name(device),
        "frame_size": [args.image_size, args.image_size],
        "image_size": [grid[1] * patch, grid[2] * patch],
        "image_grid_thw": grid,
        "image_tokens": int(inputs.visual_mask.sum()),
        "instruction_tokens": instruction_tokens,
        "prompt_tokens": int(inputs.input_ids.shape[1]),
        "euler_steps": args.euler_steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "build_s": build_s,
        **model_info(model),
    }

    stages, total, chunk = measure(run, device, args.warmup, args.repeats)
    chunk = torch.as_tensor(chunk)
    result.update(
        stages_ms=stages,
        sum_of_stage_medians_ms=sum(s["median"] for s in stages.values()),
        total_ms=total,
        output_shape=list(chunk.shape),
        output_finite=bool(torch.isfinite(chunk).all()),
    )
    result["unattributed_ms"] = total["median"] - result["sum_of_stage_medians_ms"]
    if device.type == "cuda":
        result["weights_gpu_gib"] = weights_gib
        result["build_peak_gpu_gib"] = build_peak_gib
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


# -- reporting ----------------------------------------------------------------------------------


def millions(n: int) -> str:
    """Parameter count in millions or billions."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def print_result(r: dict, env: dict) -> None:
    """One readable table for one (family, brain mode)."""
    dit = r["dit"]
    att = r["attention"]
    title = f"{r['family']} / {r['brain_mode']}  ({r['size']}, {r['inputs']} inputs)"
    lines = [
        "", title, "=" * len(title),
        f"device          {r['device']}",
        f"dtype           {r['dtype']}  (fp32 matmul precision: "
        f"{env['float32_matmul_precision']})",
        f"torch           {env['torch']}  transformers {env['transformers']}"
        + (f"  CUDA {env['cuda']}" if "cuda" in env else ""),
        f"attention       text {att['text']}, vision {att['vision']}, DiT {att['dit']}",
        f"image           1 camera, frame {r['frame_size'][0]}x{r['frame_size'][1]} -> "
        f"processed {r['image_size'][0]}x{r['image_size'][1]} px, grid "
        f"{'x'.join(map(str, r['image_grid_thw']))} -> {r['image_tokens']} image tokens",
        f"prompt          {r['prompt_tokens']} tokens ({r['instruction_tokens']} instruction) "
        "+ 1 state token",
        f"brains          {'left + right' if r['brain_mode'] == 'twin' else 'right only'}: "
        f"{r['text_layers']} text layers x {r['text_hidden']}, {r['vision_layers']} vision "
        f"layers; {millions(r['params_right_brain'])} params per brain",
        f"DiT             {dit['num_layers']} layers x {dit['hidden_size']} wide, "
        f"{dit['num_heads']} heads, horizon {dit['horizon']}, action dim {dit['action_dim']} "
        f"({millions(r['params_action_expert'])} params)",
        f"Euler steps     {r['euler_steps']}",
        f"runs            {r['repeats']} staged + {r['repeats']} untimed after "
        f"{r['warmup']} warm-up (build {r['build_s']:.1f} s)",
        "",
        f"{'stage':<34}{'median ms':>11}{'p90 ms':>11}",
    ]
    for name in STAGES:
        if name in r["stages_ms"]:
            s = r["stages_ms"][name]
            lines.append(f"  {name:<32}{s['median']:>11.2f}{s['p90']:>11.2f}")
        else:
            lines.append(f"  {name:<32}{'-':>11}{'-':>11}")
    lines += [
        f"  {'sum of stage medians':<32}{r['sum_of_stage_medians_ms']:>11.2f}",
        f"{'total (untimed, end to end)':<34}{r['total_ms']['median']:>11.2f}"
        f"{r['total_ms']['p90']:>11.2f}",
        f"  {'unattributed (total - sum)':<32}{r['unattributed_ms']:>11.2f}",
        f"output          {r['output_shape']} actions, finite: {r['output_finite']}",
    ]
    if "peak_gpu_gib" in r:
        lines.append(f"GPU memory      weights {r['weights_gpu_gib']:.2f} GiB, peak while "
                     f"building {r['build_peak_gpu_gib']:.2f} GiB, peak during inference "
                     f"{r['peak_gpu_gib']:.2f} GiB (torch.cuda.max_memory_allocated)")
    print("\n".join(lines), flush=True)


def print_summary(results: list[dict]) -> None:
    """One line per configuration: stage medians and totals in milliseconds."""
    short = {"preprocess": "prep", "vision": "vision", "left_brain": "left",
             "right_brain": "right", "action_expert": "DiT"}
    header = (f"{'family':<12}{'mode':<8}" + "".join(f"{short[s]:>9}" for s in STAGES)
              + f"{'sum':>9}{'total':>9}{'p90':>9}{'peak GiB':>10}")
    print("\nSummary (median ms per chunk; total = untimed end-to-end)")
    print(header)
    print("-" * len(header))
    for r in results:
        cells = "".join(f"{r['stages_ms'][s]['median']:>9.2f}" if s in r["stages_ms"]
                        else f"{'-':>9}" for s in STAGES)
        peak = f"{r['peak_gpu_gib']:>10.2f}" if "peak_gpu_gib" in r else f"{'-':>10}"
        print(f"{r['family']:<12}{r['brain_mode']:<8}{cells}{r['sum_of_stage_medians_ms']:>9.2f}"
              f"{r['total_ms']['median']:>9.2f}{r['total_ms']['p90']:>9.2f}{peak}")


# -- main ---------------------------------------------------------------------------------------


# -- side by side: eager, static and compiled paths ----------------------------------------------


def attach_processor(model: TwinBrainVLA, family: str, image_size: int) -> None:
    """A processor for a synthetic model: the real Qwen tokenizer, the backbone's patch sizes."""
    from twinbrain_ros.model.backbone import QwenVLProcessor
    from twinbrain_ros.model.tiny import build_image_processor, build_qwen_tokenizer

    geo = vision_geometry(model.right.vlm.config, image_size)
    processor = build_image_processor(family, max_pixels=geo["side"] ** 2)
    model.processor = QwenVLProcessor(build_qwen_tokenizer(), processor,
                                      QWEN_TOKEN_IDS["image_token_id"],
                                      image_size=(geo["side"], geo["side"]))


def compare_one(family: str, brain_mode: str, args, checkpoint: Path | None) -> dict:
    """Time the inference paths side by side on one model; returns the rows."""
    from twinbrain_ros.model.engine import InferenceEngine

    device = args.device
    if args.synthetic:
        model = build_synthetic_model(family, brain_mode, args)
        attach_processor(model, family, args.image_size)
    else:
        model = build_tiny_model(checkpoint, brain_mode, args)
    rng = np.random.default_rng(args.seed)
    spec = model.config.embodiments[EMBODIMENT]
    state = rng.standard_normal(spec.state_dim).astype(np.float32)
    side = model.processor.image_size[0]
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
              for _ in range(args.cameras)]
    instruction = instruction_text(model.processor.tokenizer, args.instruction_tokens)
    rows, reference = [], None
    for path in args.compare:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warmup_s = None
        if path == "eager":
            def run(timer, model=model):
                return model.predict_action(images, instruction, state, EMBODIMENT,
                                            seed=args.seed, timer=timer)
        else:
            engine = InferenceEngine(model, num_cameras=args.cameras,
                                     token_budgets=(max(32, args.instruction_tokens),),
                                     compile=path == "compiled")
            tick = time.perf_counter()
            engine.warmup(EMBODIMENT)
            synchronize(device)
            warmup_s = time.perf_counter() - tick

            def run(timer, engine=engine):
                return engine.predict_action(images, instruction, state, EMBODIMENT,
                                             seed=args.seed, timer=timer)
        with torch.inference_mode():
            for _ in range(args.warmup):
                run(None)
            timer = StageTimer(device)
            for _ in range(args.repeats):
                run(timer)
            totals, chunk = [], None
            for _ in range(args.repeats):
                synchronize(device)
                start = time.perf_counter()
                chunk = run(None)
                synchronize(device)
                totals.append(time.perf_counter() - start)
        chunk = np.asarray(chunk)
        if reference is None:
            reference = chunk
        ms = np.asarray(totals) * 1000.0
        row = {"family": family, "brain_mode": brain_mode, "path": path,
               "stages_ms": {k: float(np.median(v) * 1000) for k, v in timer.samples.items()},
               "median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
               "warmup_s": warmup_s, "max_abs_diff_vs_first": float(np.abs(chunk
                                                                           - reference).max()),
               "size": args.size, "dtype": args.dtype, "cameras": args.cameras}
        if device.type == "cuda":
            row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(row)
    for row in rows:
        row["speedup_vs_first"] = rows[0]["median_ms"] / row["median_ms"]
    del model
    return {"family": family, "brain_mode": brain_mode, "rows": rows}


def print_comparison(results: list[dict]) -> None:
    """One table: paths side by side per model."""
    columns = ("preprocess", "vision", "left_brain", "right_brain", "action_expert", "model")
    header = (f"{'family':<12}{'mode':<8}{'path':<10}" + "".join(f"{c[:11]:>12}" for c in columns)
              + f"{'p50 ms':>9}{'p99 ms':>9}{'ratio':>7}{'warm-up s':>10}{'|diff|':>9}")
    print(header)
    print("-" * len(header))
    for result in results:
        for r in result["rows"]:
            cells = "".join(f"{r['stages_ms'][c]:>12.2f}" if c in r["stages_ms"] else f"{'-':>12}"
                            for c in columns)
            warm = f"{r['warmup_s']:>10.1f}" if r["warmup_s"] is not None else f"{'-':>10}"
            print(f"{r['family']:<12}{r['brain_mode']:<8}{r['path']:<10}{cells}"
                  f"{r['median_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['speedup_vs_first']:>6.2f}x"
                  f"{warm}{r['max_abs_diff_vs_first']:>9.1e}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    env = environment(args.device)
    if args.compare:
        print(f"TwinBrainVLA inference paths side by side: size {args.size}, device "
              f"{env['device']}, dtype {args.dtype}, batch 1, {args.cameras} camera(s) "
              f"{args.image_size}x{args.image_size}, {args.instruction_tokens}-token "
              f"instruction, {args.euler_steps} Euler steps, {args.repeats} timed chunks per "
              "path", flush=True)
        results = run_each(args, compare_one)
        print_comparison(results)
        payload = {"environment": env, "results": results}
    else:
        print(f"TwinBrainVLA inference benchmark: size {args.size}, "
              f"{'synthetic' if args.synthetic else 'processor'} inputs, device "
              f"{env['device']}, dtype {args.dtype}, batch 1", flush=True)
        results = run_each(args, bench_one, lambda result: print_result(result, env))
        print_summary(results)
        payload = {"environment": env,
                   "args": {k: str(v) if isinstance(v, torch.device | Path) else v
                            for k, v in vars(args).items()},
                   "results": results}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def run_each(args, measure, report=lambda result: None) -> list[dict]:
    """`measure(family, mode, args, checkpoint)` for every family and brain mode asked for."""
    families = FAMILIES if args.family == "all" else (args.family,)
    modes = BRAIN_MODES if args.brain_mode == "all" else (args.brain_mode,)
    results = []
    with tempfile.TemporaryDirectory(prefix="twinbrain_bench_") as tmp:
        for family in families:
            checkpoint = None
            if not args.synthetic:
                checkpoint = make_tiny_checkpoint(family, Path(tmp) / family, seed=args.seed)
            for mode in modes:
                results.append(measure(family, mode, args, checkpoint))
                report(results[-1])
                free_memory(args.device)
    return results


if __name__ == "__main__":
    raise SystemExit(main())
