"""Training memory of a TwinBrainVLA per GPU: a table from the real parameter counts, checked.

    python benchmarks/bench_memory.py                  # 3B and 4B twins, then the mid check
    python benchmarks/bench_memory.py --batch-size 16 --skip-check

Per process under DDP (every GPU holds the whole model), in GiB:

    weights      Left Brain (frozen) x 2 bytes (bf16) or 4 (fp32)
                 + trainable parts (Right Brain, state encoder, DiT) x 4 (fp32 master weights)
    gradients    trainable x 4
    AdamW        trainable x 8 (two fp32 moments)
    activations  what autograd keeps for backward (bf16 autocast):
                 base + L x per decoder layer + V x per vision block, each measured by
                 counting the tensors autograd saves (unique storages) in one forward pass of
                 the real-width model cut to 1-2 layers (see `activation_terms`). With
                 activation checkpointing it keeps each layer's input only, and a backward
                 recomputes one layer at a time: kept + one layer + one vision block.

Parameter counts come from the real configs (`model/presets.py`, random weights built on the
meta device: no memory, no download). DDP's own gradient buckets would add another x 4 per
trainable weight; training builds DDP with `gradient_as_bucket_view=True`, so gradients live in
the buckets and there is no copy.

The check (`--skip-check` to leave it out) trains the mid preset (8 decoder layers of width 512,
152k-token embeddings, fp32 on the CPU) in a fresh process and compares the formula with the
process's measured peak resident memory above what it held before building the model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_inference import expert_config, synthetic_inputs, vision_geometry  # noqa: E402
from bench_train import batched  # noqa: E402

from twinbrain_ros.model.backbone import build_vlm  # noqa: E402
from twinbrain_ros.model.presets import backbone_config  # noqa: E402
from twinbrain_ros.model.twinbrain import TwinBrainConfig, TwinBrainVLA  # noqa: E402

GIB = 2**30
NAMES = {"qwen2_5_vl": "Qwen2.5-VL-3B", "qwen3_vl": "Qwen3-VL-4B"}


def model_config(family: str, size: str, image_size: int) -> TwinBrainConfig:
    """The training model of a backbone size (DiT-B at full size)."""
    side = vision_geometry(backbone_config(family, size), image_size)["side"]
    return TwinBrainConfig(brain_mode="twin", image_size=(side, side),
                           action_expert=expert_config(size, 4))


def build(family: str, size: str, image_size: int, device: str, text_layers: int | None = None,
          vision_depth: int | None = None) -> TwinBrainVLA:
    """A random-weight twin, optionally cut in depth (the widths stay the real ones).

    `text_layers` decoder layers and `vision_depth` vision blocks, when given.
    """
    vlm_config = backbone_config(family, size)
    if text_layers is not None:
        text = vlm_config.text_config
        text.num_hidden_layers = text_layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:text_layers]
    if vision_depth is not None:
        vision = vlm_config.vision_config
        vision.depth = vision_depth
        if hasattr(vision, "deepstack_visual_indexes"):
            vision.deepstack_visual_indexes = [0]
        if hasattr(vision, "fullatt_block_indexes"):
            vision.fullatt_block_indexes = [vision_depth - 1]
    with torch.device(device):
        return TwinBrainVLA.from_vlm(model_config(family, size, 224),
                                     build_vlm(vlm_config, dtype=torch.float32))


def parameter_counts(family: str, size: str) -> dict:
    """Frozen and trainable weights of the twin (built on the meta device)."""
    model = build(family, size, 224, "meta")
    left = sum(p.numel() for p in model.left.parameters())
    right = sum(p.numel() for p in model.right.parameters())
    expert = sum(p.numel() for p in list(model.action_expert.parameters())
                 + list(model.state_encoders.parameters()))
    embedding = model.right.vlm.get_input_embeddings().weight.numel()
    vision = sum(p.numel() for p in model.right.vlm.visual.parameters())
    config = backbone_config(family, size)
    return {"left": left, "right": right, "expert": expert, "trainable": right + expert,
            "embedding": embedding, "vision": vision,
            "layers": config.text_config.num_hidden_layers,
            "vision_depth": config.vision_config.depth}


class SavedBytes:
    """Bytes of the tensors autograd saves for backward, each storage counted once."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor):
        """Note the tensor's storage; keep the tensor as it is."""
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        """The tensor, unchanged."""
        return tensor


def _batch(model: TwinBrainVLA, family: str, size: str, batch_size: int, image_size: int,
           instruction_tokens: int):
    inputs = batched(synthetic_inputs(backbone_config(family, size), image_size,
                                      instruction_tokens, torch.float32, torch.device("cpu"),
                                      seed=0), batch_size)
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    state = torch.rand(batch_size, cfg.max_state_dim, generator=gen)
    actions = torch.rand(batch_size, cfg.action_expert.horizon, cfg.action_expert.action_dim,
                         generator=gen) * 2 - 1
    return (inputs, state, torch.ones_like(state), ["default"] * batch_size, actions,
            torch.ones_like(actions, dtype=torch.bool))


def saved_activation_bytes(model: TwinBrainVLA, batch: tuple, autocast: bool,
                           checkpointing: bool) -> int:
    """What one training forward keeps for backward (the loss's graph), in bytes."""
    if checkpointing:
        model.enable_activation_checkpointing()
    model.train()
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.compute_loss(*batch)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del loss
    # Weights saved for backward are the weights themselves (counted under weights), unless a
    # cast copy (autocast's bf16 weight copies live as long as the graph: they count).
    return sum(n for ptr, n in counter.storages.items() if ptr not in parameters)


def activation_terms(family: str, size: str, image_size: int, instruction_tokens: int,
                     autocast: bool, left_bf16: bool) -> dict:
    """Activation bytes split into terms, with and without checkpointing.

    Each term has a part per sample and a fixed part (autocast's bf16 copies of the trained
    weights live as long as the graph, whatever the batch): base (embeddings, the DiT, ...),
    per decoder layer and per vision block. Measured on the real-width model cut to one or
    two layers and blocks, at batch 1 and 2.
    """
    measured = {}
    for layers, depth in ((1, 1), (2, 1), (1, 2)):
        # A fresh process per cut model: the last one's memory is surely gone.
        job = json.dumps({"family": family, "size": size, "layers": layers, "depth": depth,
                          "image_size": image_size, "instruction_tokens": instruction_tokens,
                          "autocast": autocast, "left_bf16": left_bf16})
        out = subprocess.run([sys.executable, __file__, "--probe", job], capture_output=True,
                             text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"probe {job} failed ({out.returncode}): {out.stderr[-2000:]}")
        for batch_size, values in json.loads(out.stdout.strip().splitlines()[-1]).items():
            measured[(layers, depth, int(batch_size))] = tuple(values)
    terms = {}
    for index, key in enumerate(("plain", "checkpointed")):
        term = {}
        for part, (layers, depth) in (("one", (1, 1)), ("two_layers", (2, 1)),
                                      ("two_blocks", (1, 2))):
            a = measured[(layers, depth, 1)][index]
            b = measured[(layers, depth, 2)][index]
            term[part] = (a - (b - a), b - a)  # (fixed, per sample)
        one, layer2, block2 = term["one"], term["two_layers"], term["two_blocks"]
        layer = tuple(x - y for x, y in zip(layer2, one, strict=True))
        block = tuple(x - y for x, y in zip(block2, one, strict=True))
        base = tuple(o - lay - blk for o, lay, blk in zip(one, layer, block, strict=True))
        terms[key] = {"base": base, "layer": layer, "block": block}
    return terms


def probe(job: dict) -> dict:
    """Saved bytes (plain, checkpointed) at batch 1 and 2 of one cut model (`activation_terms`)."""
    torch.manual_seed(0)
    model = build(job["family"], job["size"], job["image_size"], "cpu",
                  text_layers=job["layers"], vision_depth=job["depth"])
    if job["left_bf16"]:
        model.cast_left(torch.bfloat16)
    result = {}
    for batch_size in (1, 2):
        batch = _batch(model, job["family"], job["size"], batch_size, job["image_size"],
                       job["instruction_tokens"])
        plain = saved_activation_bytes(model, batch, job["autocast"], checkpointing=False)
        kept = saved_activation_bytes(model, batch, job["autocast"], checkpointing=True)
        model.right.vlm.activation_checkpointing_disable()
        result[batch_size] = (plain, kept)
    return result


def _at(term: tuple[int, int], batch_size: int) -> int:
    fixed, per_sample = term
    return fixed + batch_size * per_sample


def activations(terms: dict, counts: dict, batch_size: int) -> tuple[int, int]:
    """(without, with) activation checkpointing, bytes, for the model's real depths."""
    plain, ckpt = terms["plain"], terms["checkpointed"]
    without = (_at(plain["base"], batch_size) + counts["layers"] * _at(plain["layer"], batch_size)
               + counts["vision_depth"] * _at(plain["block"], batch_size))
    kept = (_at(ckpt["base"], batch_size) + counts["layers"] * _at(ckpt["layer"], batch_size)
            + counts["vision_depth"] * _at(ckpt["block"], batch_size))
    # Backward recomputes one decoder layer (and one vision block) at a time.
    return without, kept + _at(plain["layer"], batch_size) + _at(plain["block"], batch_size)


def frozen_vision(counts: dict, terms: dict) -> tuple[dict, dict]:
    """Counts and terms with `freeze_right_vision`: the Right Brain uses the Left's tower.

    Its vision weights, their gradients and moments, and the vision blocks' activations go
    (the frozen tower runs without autograd); the patch embedding and merger stay counted in
    the base term, a slight overestimate.
    """
    counts = dict(counts, right=counts["right"] - counts["vision"],
                  trainable=counts["trainable"] - counts["vision"], vision_depth=0)
    return counts, terms


def memory_rows(counts: dict, terms: dict, left_bytes: int, batch_size: int) -> dict:
    """The table's values in bytes."""
    without, with_ckpt = activations(terms, counts, batch_size)
    if counts["vision_depth"] == 0:  # no vision block is recomputed either
        with_ckpt -= _at(terms["plain"]["block"], batch_size)
    weights = counts["left"] * left_bytes + counts["trainable"] * 4
    states = counts["trainable"] * (4 + 8)  # gradients + AdamW moments
    return {"left_weights": counts["left"] * left_bytes,
            "trainable_weights": counts["trainable"] * 4,
            "gradients": counts["trainable"] * 4, "adamw": counts["trainable"] * 8,
            "activations": without, "activations_ckpt": with_ckpt,
            "total": weights + states + without, "total_ckpt": weights + states + with_ckpt}


def print_table(args) -> None:
    """The table for the 3B and 4B twins."""
    print(f"training memory per GPU under DDP, GiB (batch {args.batch_size} per GPU, one "
          f"{args.image_size}x{args.image_size} frame, {args.instruction_tokens} instruction "
          f"tokens, bf16 autocast, AdamW, DiT-B expert)")
    header = (f"{'twin':<22}{'trainable':>10}{'Left':>7}{'Left':>7}{'trainable':>10}"
              f"{'grads':>7}{'AdamW':>7}{'act.':>7}{'act.':>7}{'total':>8}{'total':>8}")
    sub = (f"{'':<22}{'params':>10}{'params':>7}{'bf16':>7}{'fp32 w.':>10}{'':>7}{'':>7}"
           f"{'':>7}{'ckpt':>7}{'':>8}{'ckpt':>8}")
    print(header)
    print(sub)
    results = {}
    for family in ("qwen2_5_vl", "qwen3_vl"):
        counts = parameter_counts(family, "full")
        terms = activation_terms(family, "full", args.image_size, args.instruction_tokens,
                                 autocast=True, left_bf16=True)
        rows = memory_rows(counts, terms, left_bytes=2, batch_size=args.batch_size)
        fp32_left = memory_rows(counts, terms, left_bytes=4, batch_size=args.batch_size)
        frozen = memory_rows(*frozen_vision(counts, terms), left_bytes=2,
                             batch_size=args.batch_size)
        results[family] = {"counts": counts, "terms": terms, "bytes": rows,
                           "total_ckpt_fp32_left": fp32_left["total_ckpt"],
                           "freeze_right_vision": frozen}
        for label, values, trainable in (
                (NAMES[family] + " twin", rows, counts["trainable"]),
                ("  frozen Right vision", frozen, counts["trainable"] - counts["vision"])):
            print(f"{label:<22}{trainable / 1e9:>9.2f}B{counts['left'] / 1e9:>6.2f}B"
                  f"{values['left_weights'] / GIB:>7.1f}"
                  f"{values['trainable_weights'] / GIB:>10.1f}{values['gradients'] / GIB:>7.1f}"
                  f"{values['adamw'] / GIB:>7.1f}{values['activations'] / GIB:>7.1f}"
                  f"{values['activations_ckpt'] / GIB:>7.1f}{values['total'] / GIB:>8.1f}"
                  f"{values['total_ckpt'] / GIB:>8.1f}", flush=True)
    for family, r in results.items():
        c, t = r["counts"], r["terms"]["plain"]
        mib = 2**20
        print(f"{NAMES[family]}: Right embedding {c['embedding'] / 1e6:.0f}M and vision tower "
              f"{c['vision'] / 1e6:.0f}M of {c['right'] / 1e6:.0f}M Right weights; "
              f"activations per decoder layer {t['layer'][0] / mib:.0f} MiB + "
              f"{t['layer'][1] / mib:.1f} MiB per sample, per vision block "
              f"{t['block'][0] / mib:.0f} + {t['block'][1] / mib:.1f} MiB per sample (the "
              f"fixed parts: autocast's bf16 copies of the trained weights); with an fp32 Left "
              f"Brain the checkpointed total is {r['total_ckpt_fp32_left'] / GIB:.1f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


CHECK_SCRIPT = r"""
import json, re, sys, torch
sys.path[:0] = sys.argv[1:3]
from bench_memory import _batch, build
family, batch_size, steps = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
def rss(key):
    text = open("/proc/self/status").read()
    return int(re.search(key + r":\s+(\d+) kB", text).group(1)) * 1024
torch.manual_seed(0)
before = rss("VmRSS")
model = build(family, "mid", 224, "cpu").train()
batch = _batch(model, family, "mid", batch_size, 224, 20)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)  # as `train` builds it
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
for step in range(steps):
    loss = model.compute_loss(*batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
print(json.dumps({"peak_above_start": rss("VmHWM") - before}))
"""


def check_mid(args) -> None:
    """The formula against a measured training run of the mid preset (fp32, CPU)."""
    family = args.check_family
    counts = parameter_counts(family, "mid")
    terms = activation_terms(family, "mid", 224, 20, autocast=False, left_bf16=False)
    rows = memory_rows(counts, terms, left_bytes=4, batch_size=args.check_batch_size)
    # Large allocations go straight to mmap and back to the system when freed, so the resident
    # set follows the live tensors (glibc would otherwise keep freed memory in its arenas).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", CHECK_SCRIPT, str(REPO_ROOT),
                          str(REPO_ROOT / "benchmarks"), family, str(args.check_batch_size),
                          "3"], env=env, capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_above_start"]
    # The first steps create the AdamW moments: the peak is at the end of a backward, with
    # weights, moments, all gradients and the last activations alive; transient buffers of the
    # kernels come on top.
    predicted = rows["total"]
    print(f"\ncheck: mid preset ({family}, {counts['trainable'] / 1e6:.0f}M trainable, "
          f"{counts['left'] / 1e6:.0f}M frozen, batch {args.check_batch_size}, fp32, CPU)")
    for key in ("left_weights", "trainable_weights", "gradients", "adamw", "activations"):
        print(f"  {key:<18}{rows[key] / GIB:8.3f} GiB")
    print(f"  {'formula':<18}{predicted / GIB:8.3f} GiB")
    print(f"  {'measured peak':<18}{measured / GIB:8.3f} GiB (resident memory above the "
          f"process's before the model was built)")
    print(f"  measured / formula = {measured / predicted:.3f}")


def main(argv: list[str] | None = None) -> int:
    """Print the table, then the check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8, help="samples per GPU")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--instruction-tokens", type=int, default=20)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--check-only", action="store_true", help="only the mid-preset check")
    parser.add_argument("--check-family", default="qwen3_vl",
                        choices=["qwen2_5_vl", "qwen3_vl"])
    parser.add_argument("--check-batch-size", type=int, default=4)
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    parser.add_argument("--probe", default="", help=argparse.SUPPRESS)  # one cut model (JSON)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return 0
    if not args.check_only:
        print_table(args)
    if not args.skip_check:
        check_mid(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
