"""Helpers of the model, runtime and policy tests: tiny configs, models, batches, checkpoints,
reference answers. Fixtures live in conftest.py; the ROS side in ros_harness.py."""

from __future__ import annotations

import numpy as np
import torch

from twinbrain_ros.model.action_expert import ActionExpertConfig
from twinbrain_ros.model.tiny import make_tiny_checkpoint
from twinbrain_ros.model.twinbrain import EmbodimentSpec, TwinBrainConfig, TwinBrainVLA

FAMILIES = ("qwen2_5_vl", "qwen3_vl")


def small_config(backbone_path: str, brain_mode: str = "twin", **overrides) -> TwinBrainConfig:
    """A TwinBrainConfig with a small DiT, fast on CPU."""
    expert = ActionExpertConfig(action_dim=8, horizon=6, hidden_size=32, num_layers=2,
                                num_heads=2, num_inference_steps=4)
    defaults = dict(backbone_path=backbone_path, brain_mode=brain_mode,
                    embodiments={"arm": EmbodimentSpec(state_dim=5, action_dim=7)},
                    max_state_dim=8, image_size=(56, 56), action_expert=expert)
    defaults.update(overrides)
    return TwinBrainConfig(**defaults)


def build_model(backbone_path: str, brain_mode: str = "twin", seed: int = 0, **overrides
                ) -> TwinBrainVLA:
    """A fresh float32 CPU model on a tiny backbone."""
    torch.manual_seed(seed)
    return TwinBrainVLA.from_backbone(small_config(backbone_path, brain_mode, **overrides))


def camera_frame(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    """A deterministic random RGB frame."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_batch(model: TwinBrainVLA, instructions=("pick up the red can",
                                                  "put the green block on the yellow plate")):
    """A batch with prompts of different lengths (so the shorter one is left-padded)."""
    images = [[camera_frame(i)] for i in range(len(instructions))]
    inputs = model.processor(images, list(instructions))
    gen = torch.Generator().manual_seed(1)
    batch = len(instructions)
    spec = next(iter(model.config.embodiments.values()))
    name = next(iter(model.config.embodiments))
    state, state_mask = model.state_tensors(
        torch.rand(batch, spec.state_dim, generator=gen).numpy(), name)
    horizon = model.config.action_expert.horizon
    actions = torch.rand(batch, horizon, model.config.action_expert.action_dim,
                         generator=gen) * 2 - 1
    action_mask = torch.zeros_like(actions)
    action_mask[..., :spec.action_dim] = 1.0
    embodiments = [next(iter(model.config.embodiments))] * batch
    return dict(inputs=inputs, state=state, state_mask=state_mask, embodiments=embodiments,
                actions=actions, action_mask=action_mask)


def save_policy_checkpoint(backbone_path: str, out, embodiment, nan_weights: bool = False,
                           seed: int = 0):
    """A tiny TwinBrainVLA checkpoint for an `Embodiment`.

    `nan_weights=True` writes a checkpoint whose action expert outputs NaN (a corrupt model).
    """
    from safetensors.torch import load_file, save_file

    from twinbrain_ros.model.tiny import make_tiny_policy_checkpoint

    spec = embodiment.spec()
    path = make_tiny_policy_checkpoint(backbone_path, out, embodiment.normalization_key, spec,
                                       seed=seed)
    if nan_weights:
        import json

        from twinbrain_ros.model.checkpoint import CONFIG_FILE, file_sha256

        weights = load_file(path / "model.safetensors")
        weights["action_expert.final_layer.proj.bias"].fill_(float("nan"))
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        # A model that is wrong, not a damaged file: its checksum is recorded anew.
        config = json.loads((path / CONFIG_FILE).read_text())
        config["weights_sha256"] = file_sha256(path / "model.safetensors")
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return path


def talkative_backbone(out, family: str, tie_word_embeddings: bool = True,
                       repetition_penalty: float | None = None):
    """A tiny backbone whose greedy answers vary from token to token.

    A random tiny model with tied embeddings only echoes its last input token (its residual
    stream is dominated by the token's own embedding); scaling the decoder MLPs' output makes
    the layers matter, so that a wrong position, cache or head shows up in the tokens.
    `repetition_penalty` goes into its generation config (Qwen2.5-VL-Instruct's has 1.05).
    """
    import json

    from transformers import AutoModelForImageTextToText

    path = make_tiny_checkpoint(family, out, seed=0, tie_word_embeddings=tie_word_embeddings)
    model = AutoModelForImageTextToText.from_pretrained(str(path))
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.mlp.down_proj.weight.mul_(50.0)
    model.save_pretrained(path)
    if repetition_penalty is not None:
        file = path / "generation_config.json"
        config = json.loads(file.read_text())
        file.write_text(json.dumps({**config, "repetition_penalty": repetition_penalty}))
    return str(path)


def reference_answer(backbone_path: str, images, question: str, image_size, max_new_tokens: int
                     ) -> list[int]:
    """transformers' own greedy `generate` of the base VLM: the answer's token ids.

    The prompt is built here from the tokenizer's chat template, each image pad expanded to the
    image processor's token count (transformers' processor class needs torchvision). The
    checkpoint's generation config applies (end tokens, repetition penalty), as in `generate`.
    """
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone_path)
    processor = AutoImageProcessor.from_pretrained(backbone_path, backend="pil")
    model = AutoModelForImageTextToText.from_pretrained(backbone_path, dtype=torch.float32)
    height, width = image_size
    frames = [np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
              for image in images]
    vision = processor(images=frames, return_tensors="pt")
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)
    for grid in vision["image_grid_thw"]:
        count = int(grid.prod()) // processor.merge_size**2
        text = text.replace("<|image_pad|>", "<|placeholder|>" * count, 1)
    tokens = tokenizer([text.replace("<|placeholder|>", "<|image_pad|>")], return_tensors="pt")
    mm_token_type_ids = (tokens["input_ids"] == model.config.image_token_id).int()
    out = model.generate(**tokens, pixel_values=vision["pixel_values"],
                         image_grid_thw=vision["image_grid_thw"],
                         mm_token_type_ids=mm_token_type_ids, do_sample=False,
                         max_new_tokens=max_new_tokens)
    return out[0, tokens["input_ids"].shape[1]:].tolist()


def observation(embodiment, k: int = 0):
    """A deterministic `Observation` of `embodiment` (one 56x56 frame, a state within limits)."""
    from twinbrain_ros.robot.observation import Observation

    image = np.random.default_rng(k).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    state = np.clip(0.1 * np.sin(np.arange(embodiment.state_dim) + k), embodiment.lower,
                    embodiment.upper)
    return Observation(images=[image], state=state, instruction="pick up the red cube")
