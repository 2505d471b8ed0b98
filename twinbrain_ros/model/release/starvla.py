"""starVLA's released Qwen-GR00T checkpoints, loaded as they are published.

A starVLA run directory holds `config.yaml` (the training configuration; `framework.name`
selects the model), `dataset_statistics.json` (per dataset key: action and state q01/q99, mean,
std, min, max and a mask of the dimensions that are normalized) and
`checkpoints/steps_<N>_pytorch_model.pt` (or `.safetensors`): one state dict holding the whole
VLM under `qwen_vl_interface.model.` and the action head under `action_model.`. The base VLM
directory named by `framework.qwenvl.base_vlm` supplies only the architecture config, the
tokenizer, chat template and image processor: every weight comes from the run's file.

What runs is written here from the facts of starVLA's `Qwen_GR00T.predict_action`:
images resized to `datasets.vla_data.obs_image_size`, one user turn
`[image..., text]` whose text is `CoT_prompt` with `{instruction}` filled in (the instruction
itself without one), rendered by the base VLM's own chat template with the generation prompt,
the VLM's last hidden states (after its final norm) with the attention mask as the action
head's cross-attention context, and the head's Euler sampling (`gr00t_head`). Un-normalizing
follows the release-era rule: clip to [-1, 1], the gripper (dimension 6) thresholded at 0.5 to
{0, 1}, then `0.5 (a + 1)(q99 - q01) + q01` where the mask is true.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backbone import SUPPORTED_MODEL_TYPES, BackboneError, QwenVLProcessor, read_backbone_config
from ..checkpoint import CheckpointError
from .gr00t_head import DIT_SIZES, GR00TFlowHead, GR00THeadConfig

CONFIG_FILE = "config.yaml"
STATS_FILE = "dataset_statistics.json"
VLM_PREFIX = "qwen_vl_interface.model."
HEAD_PREFIX = "action_model."
# The frameworks of starVLA this package runs (PhysBrainVLA: the TwinBrainVLA authors' twin,
# `physbrain.py`).
FRAMEWORKS = ("QwenGR00T", "PhysBrainVLA")
# Where each framework keeps its Qwen-VL(s) in the state dict.
VLM_PREFIXES = {"QwenGR00T": ("qwen_vl_interface.model.",),
                "PhysBrainVLA": ("qwen_vl_interface.frozen_vlm.model.",
                                 "qwen_vl_interface.trainable_vlm.model.",
                                 "qwen_vl_interface.model.")}
# starVLA's defaults for what a `framework.action_model` section may leave out.
HEAD_DEFAULTS = {"action_model_type": "DiT-B", "hidden_size": 1024, "add_pos_embed": True,
                 "max_seq_len": 1024, "action_dim": 7, "state_dim": 7, "action_horizon": 8,
                 "num_timestep_buckets": 1000, "num_inference_timesteps": 4,
                 "num_target_vision_tokens": 32}
DIT_DEFAULTS = {"num_layers": 16, "output_dim": 1024, "interleave_self_attention": False,
                "attention_bias": True, "norm_eps": 1e-5}
# PhysBrain-VLA's starVLA snapshot fills nothing in: what its DiT class itself defaults to.
SNAPSHOT_DIT_DEFAULTS = {**DIT_DEFAULTS, "num_layers": 12, "output_dim": 26}
# The gripper dimension the release-era un-normalization thresholds.
GRIPPER_DIM = 6


class ReleaseError(CheckpointError):
    """A released checkpoint that cannot be run here; the message says what differs."""


def is_release_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a starVLA run directory or one of its checkpoint files."""
    path = Path(path)
    run = path.parents[1] if path.is_file() and len(path.parents) > 1 else path
    return ((run / CONFIG_FILE).is_file() and (run / STATS_FILE).is_file()
            and (run / "checkpoints").is_dir())


def _step(file: Path) -> int:
    found = re.search(r"steps?_(\d+)", file.name)
    return int(found.group(1)) if found else -1


def find_weights(path: str | Path) -> tuple[Path, Path]:
    """(run directory, weights file): the file itself, or the run's latest step."""
    path = Path(path)
    if path.is_file():
        return path.parents[1], path
    files = sorted([*path.glob("checkpoints/*.pt"), *path.glob("checkpoints/*.safetensors")],
                   key=lambda f: (_step(f), f.name))
    if not files:
        raise ReleaseError(f"{path / 'checkpoints'} holds no *.pt or *.safetensors weights")
    return path, files[-1]


@dataclass
class ReleaseSpec:
    """What a released run's files say, checked."""

    run_dir: Path
    weights: Path
    stats: dict
    framework: str
    base_vlm: str
    head: dict
    dit: dict
    prompt: str | None
    image_size: tuple[int, int] | None
    include_state: bool
    action_type: str
    doublevla: dict = field(default_factory=dict)

    def stats_for(self, key: str | None) -> tuple[str, dict]:
        """(key, statistics) of a dataset key, or of the only one when `key` is None."""
        if key is None or key == "":
            if len(self.stats) != 1:
                raise ReleaseError(f"{self.run_dir / STATS_FILE} holds statistics for "
                                   f"{sorted(self.stats)}; choose one (unnorm_key)")
            key = next(iter(self.stats))
        if key not in self.stats:
            raise ReleaseError(f"{self.run_dir / STATS_FILE} has no statistics {key!r}; it "
                               f"has {sorted(self.stats)}")
        return key, self.stats[key]


def read_release(path: str | Path) -> ReleaseSpec:
    """Read and check a starVLA run's config and statistics (no weights are read)."""
    import yaml

    run_dir, weights = find_weights(path)
    for name in (CONFIG_FILE, STATS_FILE):
        if not (run_dir / name).is_file():
            raise ReleaseError(f"released checkpoint {run_dir} has no {name}")
    try:
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
        stats = json.loads((run_dir / STATS_FILE).read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ReleaseError(f"{run_dir}: unreadable config or statistics: {error}") from error
    framework_cfg = config.get("framework") or {}
    framework = framework_cfg.get("name") or framework_cfg.get("framework_py")
    if framework not in FRAMEWORKS:
        raise ReleaseError(f"{run_dir / CONFIG_FILE}: framework {framework!r} is not one this "
                           f"package runs ({', '.join(FRAMEWORKS)})")
    head = {**HEAD_DEFAULTS, **(framework_cfg.get("action_model") or {})}
    if "future_action_window_size" in head and "action_horizon" not in (
            framework_cfg.get("action_model") or {}):
        head["action_horizon"] = int(head["future_action_window_size"]) + 1
    defaults = SNAPSHOT_DIT_DEFAULTS if framework == "PhysBrainVLA" else DIT_DEFAULTS
    dit = {**defaults, **DIT_SIZES.get(head["action_model_type"], {}),
           **(head.get("diffusion_model_cfg") or {})}
    if "num_attention_heads" not in dit or "attention_head_dim" not in dit:
        raise ReleaseError(f"{run_dir / CONFIG_FILE}: action_model_type "
                           f"{head['action_model_type']!r} is not one of {sorted(DIT_SIZES)} and "
                           "its diffusion_model_cfg gives no num_attention_heads and "
                           "attention_head_dim")
    vla = (config.get("datasets") or {}).get("vla_data") or {}
    # The resolution their predict_action resizes frames to (the twin reads `image_size`).
    size = vla.get("image_size" if framework == "PhysBrainVLA" else "obs_image_size")
    for key, block in stats.items():
        action = (block or {}).get("action") or {}
        lengths = {name: len(action.get(name, [])) for name in ("q01", "q99")}
        if set(lengths.values()) != {int(head["action_dim"])}:
            raise ReleaseError(f"{run_dir / STATS_FILE}: statistics {key!r} have action "
                               f"q01/q99 of lengths {lengths}, the head predicts "
                               f"{head['action_dim']} dimensions")
    return ReleaseSpec(
        run_dir=run_dir, weights=weights, stats=stats, framework=framework,
        base_vlm=str((framework_cfg.get("qwenvl") or {}).get("base_vlm", "")), head=head,
        dit=dit, prompt=vla.get("CoT_prompt"),
        image_size=(int(size[0]), int(size[1])) if size else None,
        include_state=bool(vla.get("include_state", False)),
        action_type=str(vla.get("action_type", "")),
        doublevla=dict(config.get("doublevla") or {}))


def resolve_base_vlm(spec: ReleaseSpec, override: str | Path | None = None) -> Path:
    """The base VLM directory.

    The override, else the config's path as given (starVLA's scripts run from their repository
    root), or relative to the run directory.
    """
    candidates = [Path(override)] if override else [Path(spec.base_vlm),
                                                     spec.run_dir / spec.base_vlm]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise ReleaseError(
        f"released checkpoint {spec.run_dir}: its base VLM {str(candidates[0])!r} (the "
        "config's framework.qwenvl.base_vlm) was not found; pass backbone_path with the "
        "directory of the base model it was trained from (its config.json, tokenizer and "
        "processor files; its weights are not read)")


def head_config(spec: ReleaseSpec, vlm_hidden: int) -> GR00THeadConfig:
    """The action head's sizes from the release's config."""
    h, d = spec.head, spec.dit
    return GR00THeadConfig(
        action_dim=int(h["action_dim"]), action_horizon=int(h["action_horizon"]),
        cross_attention_dim=int(vlm_hidden), state_dim=int(h.get("state_dim") or 0),
        hidden_size=int(h["hidden_size"]), num_attention_heads=int(d["num_attention_heads"]),
        attention_head_dim=int(d["attention_head_dim"]), num_layers=int(d["num_layers"]),
        output_dim=int(d["output_dim"]),
        interleave_self_attention=bool(d["interleave_self_attention"]),
        add_pos_embed=bool(h["add_pos_embed"]), max_seq_len=int(h["max_seq_len"]),
        num_target_vision_tokens=int(h["num_target_vision_tokens"]),
        num_timestep_buckets=int(h["num_timestep_buckets"]),
        num_inference_timesteps=int(h["num_inference_timesteps"]),
        attention_bias=bool(d["attention_bias"]), norm_eps=float(d["norm_eps"]))


def modern_vlm_key(key: str) -> str:
    """A Qwen-VL parameter name in transformers' current layout.

    That is `model.visual.` and `model.language_model.`; checkpoints saved before transformers
    4.52 used `visual.` and `model.` for them.
    """
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.visual.",
                                                         "model.language_model.")):
        return "model.language_model." + key[len("model."):]
    return key


def resize_frames(images: list[np.ndarray], size: tuple[int, int] | None) -> list[np.ndarray]:
    """uint8 HxWx3 frames at `size` (width, height; None: as they are).

    OpenCV's area interpolation, as starVLA's clients resize them.
    """
    out = []
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"images must be HxWx3 uint8, got {image.dtype} {image.shape}")
        if size and tuple(image.shape[1::-1]) != tuple(size):
            import cv2

            image = cv2.resize(image, tuple(size), interpolation=cv2.INTER_AREA)
        out.append(image)
    return out


def initial_noise(noise: torch.Tensor | None, seed: int | None, horizon: int,
                  action_dim: int) -> torch.Tensor:
    """The flow's starting noise (1, horizon, action_dim).

    The given one, else drawn on the CPU from `seed` (None: a fresh seed).
    """
    if noise is not None:
        return noise
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return torch.randn((1, horizon, action_dim), generator=generator)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights file (`torch.save` of a state dict, or safetensors), tensors only."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        raise ReleaseError(f"{path} is not a readable state dict: {error}") from error
    if not isinstance(state, dict):
        raise ReleaseError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _vlm_class(model_type: str):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    return (Qwen2_5_VLForConditionalGeneration if model_type == "qwen2_5_vl"
            else Qwen3VLForConditionalGeneration)


def build_vlm(base: Path, device: str | torch.device | None = None,
              dtype: torch.dtype = torch.float32):
    """The base VLM's module tree from its config.json alone, built on `device`.

    None: the current default device; "meta" takes no memory (for checking a layout). The
    weights come from the release file.
    """
    import contextlib

    from transformers import AutoConfig

    model_type = read_backbone_config(base)["model_type"]
    config = AutoConfig.from_pretrained(str(base), local_files_only=True)
    config._attn_implementation = "sdpa"
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return _vlm_class(model_type)._from_config(config, dtype=dtype)


def check_keys(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor],
               source: str) -> None:
    """Every expected tensor present with its shape, nothing unknown; one message if not."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(found[k].shape)}, model {tuple(expected[k].shape)}"
                    for k in set(expected) & set(found) if found[k].shape != expected[k].shape)
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("of another shape", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8
                                            else "")
            problems.append(f"{len(items)} tensor(s) {label}: {shown}")
    if problems:
        raise ReleaseError(f"{source} does not fit the model its config describes: "
                           + "; ".join(problems))


class QwenGR00T(nn.Module):
    """starVLA's single-brain Qwen-GR00T policy: a Qwen-VL and the GR00T flow-matching head."""

    def __init__(self, spec: ReleaseSpec, vlm: nn.Module, processor, head_cfg: GR00THeadConfig):
        super().__init__()
        self.spec = spec
        self.vlm = vlm
        self.processor = processor
        self.action_model = GR00TFlowHead(head_cfg)
        self.horizon = head_cfg.action_horizon
        self.action_dim = head_cfg.action_dim
        self.model_type = vlm.config.model_type

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.action_model.parameters()).device

    def prompt_text(self, instruction: str) -> str:
        """The user text: the config's CoT_prompt with the instruction, or the instruction."""
        return self.spec.prompt.replace("{instruction}", instruction) if self.spec.prompt \
            else instruction

    def prepare_images(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 HxWx3 frames at the training resolution (`obs_image_size`, area resize)."""
        return resize_frames(images, self.spec.image_size)

    def vl_inputs(self, images: list[np.ndarray], instruction: str):
        """Token ids, attention mask and pixels of one observation.

        One user turn with the images, then the prompt text, in the base VLM's chat template
        with the generation prompt (as their processor renders it).
        """
        frames = self.prepare_images(images)
        text = self.processor.chat_prompt(self.prompt_text(instruction), len(frames))
        return self.processor.encode([frames], [text])

    @torch.no_grad()
    def context(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(the VLM's last hidden states as their head was trained on, bool attention mask).

        What starVLA reads as `hidden_states[-1]` under its pinned transformers (4.57): for
        Qwen2.5-VL the states after the final norm, for Qwen3-VL the last decoder layer's output
        before it (4.57 records Qwen3-VL's hidden states un-normed).
        """
        device = self.device
        before_norm = {}
        hook = None
        if self.model_type == "qwen3_vl":
            hook = self.vlm.model.language_model.norm.register_forward_pre_hook(
                lambda module, args: before_norm.setdefault("states", args[0]))
        dtype = next(self.vlm.parameters()).dtype
        extra = {}
        if "mm_token_type_ids" in inspect.signature(self.vlm.model.forward).parameters:
            extra["mm_token_type_ids"] = inputs.mm_token_type_ids.to(device)
        try:
            out = self.vlm.model(input_ids=inputs.input_ids.to(device),
                                 attention_mask=inputs.attention_mask.to(device),
                                 pixel_values=inputs.pixel_values.to(device, dtype),
                                 image_grid_thw=inputs.image_grid_thw.to(device),
                                 use_cache=False, return_dict=True, **extra)
        finally:
            if hook is not None:
                hook.remove()
        hidden = before_norm.get("states", out.last_hidden_state)
        return hidden, inputs.attention_mask.to(device, torch.bool)

    @torch.no_grad()
    def sample(self, images: list[np.ndarray], instruction: str,
               state: np.ndarray | None = None, noise: torch.Tensor | None = None,
               seed: int | None = None) -> np.ndarray:
        """Normalized actions (horizon, action_dim) for one observation.

        `state`: (state_dim,) as the release's data pipeline prepares it, or None (no state token);
        `noise`: the starting noise (1, horizon, action_dim), else drawn (seeded by `seed`).
        """
        hidden, mask = self.context(self.vl_inputs(images, instruction))
        head = self.action_model
        dtype = hidden.dtype
        noise = initial_noise(noise, seed, self.horizon, self.action_dim).to(self.device, dtype)
        state_t = None
        if state is not None:
            state_t = torch.as_tensor(np.asarray(state, dtype=np.float32),
                                      device=self.device).reshape(1, 1, -1).to(dtype)
        head_dtype = next(head.parameters()).dtype
        actions = head.sample(hidden.to(head_dtype), noise.to(head_dtype),
                              None if state_t is None else state_t.to(head_dtype), mask)
        return actions[0].float().cpu().numpy()


def unnormalize_actions(normalized: np.ndarray, stats: dict) -> np.ndarray:
    """The release-era rule: clip, gripper to {0, 1}, q01/q99 scaling where the mask says."""
    actions = np.clip(np.asarray(normalized, dtype=np.float64), -1.0, 1.0)
    actions[:, GRIPPER_DIM] = np.where(actions[:, GRIPPER_DIM] < 0.5, 0.0, 1.0)
    low, high = np.asarray(stats["q01"], dtype=np.float64), np.asarray(stats["q99"],
                                                                         dtype=np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    return np.where(mask, 0.5 * (actions + 1.0) * (high - low) + low, actions)


def _modern_names(state: dict, prefixes: tuple[str, ...]) -> dict:
    """The state dict with every Qwen-VL name under `prefixes` in today's layout."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = prefix + modern_vlm_key(key[len(prefix):])
                break
        out[key] = value
    return out


def _build(spec: ReleaseSpec, base: Path, state: dict, processor, dtype: torch.dtype):
    """(model on the current default device, the file's tensors under the model's names)."""
    if spec.framework == "PhysBrainVLA":
        from .physbrain import PhysBrainTwin

        left, right = build_vlm(base, dtype=dtype), build_vlm(base, dtype=dtype)
        trainable, alias = VLM_PREFIXES["PhysBrainVLA"][1:]
        rows = state.get(trainable + "model.language_model.embed_tokens.weight")
        if rows is not None and rows.shape[0] != right.get_input_embeddings().weight.shape[0]:
            right.resize_token_embeddings(rows.shape[0], mean_resizing=False)  # added tokens
        if not any(key.startswith(alias) for key in state):  # saved without the alias
            state.update({alias + k[len(trainable):]: v for k, v in state.items()
                          if k.startswith(trainable)})
        hidden = right.config.get_text_config().hidden_size
        model = PhysBrainTwin(spec, left, right, processor, head_config(spec, hidden),
                              spec.doublevla)
        return model.to(dtype), state
    vlm = build_vlm(base, dtype=dtype)
    model = QwenGR00T(spec, vlm, processor,
                      head_config(spec, vlm.config.get_text_config().hidden_size))
    return model.to(dtype), {("vlm." + k[len(VLM_PREFIX):]) if k.startswith(VLM_PREFIX) else k:
                             v for k, v in state.items()}


def load_release(path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32,
                 backbone_path: str | Path | None = None, spec: ReleaseSpec | None = None):
    """Load a released run (directory or weights file) for inference.

    Returns a `QwenGR00T` or, for the authors' twin, a `physbrain.PhysBrainTwin`. `spec`: the
    run's files as `read_release(path)` already read them.

    Raises:
        ReleaseError: naming the missing file, an unsupported framework or backbone, or the
            tensors that do not fit the model the config describes.
    """
    spec = spec or read_release(path)
    base = resolve_base_vlm(spec, backbone_path)
    try:
        backbone = read_backbone_config(base)
        processor = QwenVLProcessor.from_pretrained(base)
    except BackboneError as error:
        raise ReleaseError(f"released checkpoint {spec.run_dir}: {error}") from error
    if backbone["model_type"] not in SUPPORTED_MODEL_TYPES:
        raise ReleaseError(f"{base}: model_type {backbone['model_type']!r} is not a Qwen-VL")
    state = _modern_names(read_state_dict(spec.weights), VLM_PREFIXES[spec.framework])
    with torch.device(torch.device(device)):
        model, state = _build(spec, base, state, processor, dtype)
    check_keys(model.state_dict(), state, str(spec.weights))
    model.load_state_dict(state, strict=True)
    del state
    return model.eval()
