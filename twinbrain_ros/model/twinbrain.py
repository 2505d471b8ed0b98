"""TwinBrainVLA: a frozen Left Brain, a trainable Right Brain joined by AsyMoT, and a DiT expert.

Asymmetric Mixture-of-Transformers (AsyMoT), as implemented here with stock transformers layers:

1. The Left Brain (frozen generalist VLM) runs the prompt (images + instruction) under
   `torch.no_grad()`, writing its keys and values of every decoder layer into a `DynamicCache`.
2. The Right Brain runs the same prompt plus one proprioceptive state token, with that cache as
   `past_key_values` and a 4-D mask covering [left | right] (`asymot_mask`). At every layer its
   queries therefore attend to concat(Left K/V, Right K/V): all valid Left tokens (or, with
   `left_visibility="causal"`, Left tokens 0..i for Right token i), and its own tokens
   causally. The Left K/V were made without autograd, so no gradient ever reaches the Left
   Brain (stop-gradient), and the Left Brain never sees a Right token.
3. Both brains use the same M-RoPE positions for the shared prompt (from `get_rope_index`); the
   state token takes the next position.

The Right Brain's final hidden states (prompt + state token) condition the flow-matching DiT action
expert. In `single` mode there is no Left Brain: the Right Brain alone (the QwenGR00T-style
baseline) feeds the same expert.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from ..transforms import (
    ChunkPrefix,
    EmbodimentNormStats,
    EmbodimentSpec,
    EmbodimentTransforms,
    NormStats,
)
from .action_expert import ActionExpertConfig, FlowMatchingActionExpert
from .backbone import QwenVLBackbone, QwenVLProcessor, VisionLanguageInputs, load_vlm
from .timing import NULL_TIMER

BRAIN_MODES = ("twin", "single")
LEFT_VISIBILITY = ("all", "causal")


@dataclass
class TwinBrainConfig:
    """Everything that defines a TwinBrainVLA besides the backbone's own config.

    Attributes:
        backbone_path: local HF checkpoint directory of the Qwen2.5-VL / Qwen3-VL base model.
        brain_mode: "twin" (AsyMoT, the default) or "single" (Right Brain alone, for ablations).
        embodiments: name -> state/action sizes; one state encoder is built per embodiment.
        max_state_dim: states are zero-padded to this size (with a mask) for the state encoders.
        image_size: (height, width) each camera frame is resized to before the image processor.
        freeze_right_vision: keep the Right Brain's vision tower frozen; its features are then
            identical to the Left Brain's, so they are computed once and not stored twice.
        left_visibility: which Left Brain tokens a Right Brain token attends to: "all" (every
            valid Left token, the paper's AsyMoT) or "causal" (Right token i sees Left tokens
            0..i, as the authors' released code does; the state token sees all).
        action_expert: DiT sizes, horizon, Euler steps; its `action_dim` is the padded maximum.
    """

    backbone_path: str = ""
    brain_mode: str = "twin"
    embodiments: dict[str, EmbodimentSpec] = field(
        default_factory=lambda: {"default": EmbodimentSpec(state_dim=8, action_dim=7)})
    max_state_dim: int = 32
    image_size: tuple[int, int] = (224, 224)
    freeze_right_vision: bool = False
    action_expert: ActionExpertConfig = field(default_factory=ActionExpertConfig)
    left_visibility: str = "all"

    def __post_init__(self):
        """Coerce nested dicts (from JSON) and check sizes."""
        if isinstance(self.action_expert, dict):
            self.action_expert = ActionExpertConfig.from_dict(self.action_expert)
        self.embodiments = {
            name: spec if isinstance(spec, EmbodimentSpec) else EmbodimentSpec(**spec)
            for name, spec in self.embodiments.items()}
        self.image_size = tuple(self.image_size)
        if self.brain_mode not in BRAIN_MODES:
            raise ValueError(f"brain_mode {self.brain_mode!r} is not one of {BRAIN_MODES}")
        if self.left_visibility not in LEFT_VISIBILITY:
            raise ValueError(f"left_visibility {self.left_visibility!r} is not one of "
                             f"{LEFT_VISIBILITY}")
        if not self.embodiments:
            raise ValueError("a TwinBrainConfig needs at least one embodiment")
        for name, spec in self.embodiments.items():
            if not 0 < spec.state_dim <= self.max_state_dim:
                raise ValueError(f"embodiment {name!r}: state_dim {spec.state_dim} must be in "
                                 f"1..max_state_dim={self.max_state_dim}")
            if not 0 < spec.action_dim <= self.action_expert.action_dim:
                raise ValueError(f"embodiment {name!r}: action_dim {spec.action_dim} must be in "
                                 f"1..action_expert.action_dim={self.action_expert.action_dim}")

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        data = asdict(self)
        data["action_expert"] = self.action_expert.to_dict()
        data["image_size"] = list(self.image_size)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TwinBrainConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TwinBrainConfig keys: {sorted(unknown)}")
        return cls(**data)


class AsyMoTCache(DynamicCache):
    """The Left Brain's per-layer K/V, written once and then only read by the Right Brain.

    The Left pass fills it like any `DynamicCache`. After `freeze()`, `update` returns
    concat(Left K/V, the Right layer's K/V) without storing anything, so the prefix never grows:
    a replay of a Right layer under activation checkpointing, or a second Right pass, sees the
    same Left K/V.
    """

    frozen = False

    def freeze(self) -> AsyMoTCache:
        """Stop storing; from now on `update` only concatenates."""
        self.frozen = True
        return self

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Store (while filling) or prepend the Left K/V (once frozen)."""
        if not self.frozen:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        # A Left Brain held in bf16 under fp32 Right weights: its K/V join in the Right's dtype.
        return (torch.cat([layer.keys.to(key_states.dtype), key_states], dim=-2),
                torch.cat([layer.values.to(value_states.dtype), value_states], dim=-2))


def asymot_mask(valid: torch.Tensor, causal_left: bool) -> torch.Tensor:
    """The Right Brain's 4-D attention mask over [Left | Right] (True: may attend).

    `valid` (B, L): the prompt's non-padding tokens, shared by both brains; the Right Brain has
    them plus the state token (R = L + 1 queries). Left block: every valid Left token, or with
    `causal_left` only Left tokens 0..i for Right token i (the state token sees all). Right
    block: causal over valid tokens. A padded query attends to itself only (no empty row).

    Returns:
        (B, 1, L + 1, 2 L + 1) bool.
    """
    batch, length = valid.shape
    right_valid = torch.cat([valid, valid.new_ones(batch, 1)], dim=1)
    left = valid[:, None, :].expand(batch, length + 1, length)
    if causal_left:
        below = torch.ones(length + 1, length, dtype=torch.bool, device=valid.device).tril()
        below[length] = True  # the state token
        left = left & below
    eye = torch.eye(length + 1, dtype=torch.bool, device=valid.device)
    right = (torch.ones(length + 1, length + 1, dtype=torch.bool, device=valid.device).tril()
             & (right_valid[:, None, :] | eye))
    return torch.cat([left, right], dim=2)[:, None]


class StateEncoder(nn.Module):
    """MLP from a zero-padded proprioceptive state and its mask to one Right Brain token."""

    def __init__(self, max_state_dim: int, hidden_size: int, width: int | None = None):
        """Build the MLP; `width` defaults to the backbone's hidden size."""
        super().__init__()
        width = width or hidden_size
        self.mlp = nn.Sequential(
            nn.Linear(2 * max_state_dim, width), nn.SiLU(), nn.Linear(width, hidden_size))

    def forward(self, state: torch.Tensor, state_mask: torch.Tensor) -> torch.Tensor:
        """(B, max_state_dim) state and mask -> (B, hidden_size) token."""
        mask = state_mask.to(state.dtype)
        return self.mlp(torch.cat([state * mask, mask], dim=-1))


class TwinBrainVLA(nn.Module):
    """The whole policy network: brains, state encoders, action expert, processor, statistics."""

    def __init__(self, config: TwinBrainConfig, right: QwenVLBackbone,
                 left: QwenVLBackbone | None = None, processor: QwenVLProcessor | None = None,
                 norm_stats: dict[str, EmbodimentNormStats] | None = None):
        """Assemble from already-built brains (see `from_backbone` / `load_checkpoint`)."""
        super().__init__()
        if (config.brain_mode == "twin") != (left is not None):
            raise ValueError(f"brain_mode {config.brain_mode!r} "
                             f"{'needs' if left is None else 'takes no'} Left Brain")
        self.config = config
        self.right = right
        self.left = left
        self.processor = processor
        hidden = right.hidden_size
        self.state_encoders = nn.ModuleDict({
            name: StateEncoder(config.max_state_dim, hidden) for name in config.embodiments})
        self.action_expert = FlowMatchingActionExpert(config.action_expert, cond_dim=hidden)
        if left is not None:
            left.requires_grad_(False)
            left.eval()
        self.share_vision = config.freeze_right_vision and left is not None
        if self.share_vision:
            # The frozen Right vision tower would equal the Left one: use the Left's features.
            right.vlm.visual = None
        elif config.freeze_right_vision:
            right.vlm.visual.requires_grad_(False)
        self.norm_stats = norm_stats or {
            name: EmbodimentNormStats(state=NormStats.identity(spec.state_dim),
                                      action=NormStats.identity(spec.action_dim))
            for name, spec in config.embodiments.items()}
        missing = set(config.embodiments) - set(self.norm_stats)
        if missing:
            raise ValueError(f"no normalization statistics for embodiments {sorted(missing)}")

    @classmethod
    def from_backbone(cls, config: TwinBrainConfig, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> TwinBrainVLA:
        """Build a fresh model whose brains both start from `config.backbone_path`."""
        vlm = load_vlm(config.backbone_path, dtype=dtype)
        processor = QwenVLProcessor.from_pretrained(config.backbone_path, config.image_size)
        return cls.from_vlm(config, vlm, processor).to(device=device, dtype=dtype)

    @classmethod
    def from_vlm(cls, config: TwinBrainConfig, vlm: nn.Module,
                 processor: QwenVLProcessor | None = None) -> TwinBrainVLA:
        """Build from an already-loaded base VLM: the Right Brain is a copy of it."""
        right = QwenVLBackbone(copy.deepcopy(vlm) if config.brain_mode == "twin" else vlm)
        left = QwenVLBackbone(vlm) if config.brain_mode == "twin" else None
        return cls(config, right=right, left=left, processor=processor)

    # -- modes and parameters ----------------------------------------------------------------

    def train(self, mode: bool = True) -> TwinBrainVLA:
        """Set train mode; the Left Brain always stays in eval mode."""
        super().train(mode)
        if self.left is not None:
            self.left.eval()
        return self

    def enable_activation_checkpointing(self) -> None:
        """Recompute the Right Brain's layer activations in backward instead of storing them.

        Uses transformers' own gradient checkpointing on the Right Brain (vision blocks and
        decoder layers). The decoder layers may keep `past_key_values` under checkpointing
        because the Left K/V cache is read-only once frozen (see `AsyMoTCache`).
        """
        self.right.vlm.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
        for layer in self.right.vlm.language_model.layers:
            layer._can_checkpoint_with_cache = True

    def cast_left(self, dtype: torch.dtype) -> TwinBrainVLA:
        """Hold the frozen Left Brain's weights in `dtype` whatever the Right Brain's.

        Training keeps fp32 master weights for what it trains, but the Left Brain is never
        trained: in bf16 it takes half the memory (8.9 instead of 17.7 GB for Qwen3-VL-4B) and
        runs at bf16 speed. Its K/V are cast to the Right Brain's dtype where they join it.
        """
        if self.left is not None:
            self.left.to(dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        """Device of the trainable weights."""
        return next(self.action_expert.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the Right Brain."""
        return next(self.right.parameters()).dtype

    # -- forward -------------------------------------------------------------------------------

    def encode_state(self, state: torch.Tensor, state_mask: torch.Tensor,
                     embodiments: list[str]) -> torch.Tensor:
        """One state token per sample, each from its own embodiment's encoder: (B, 1, hidden)."""
        if len(embodiments) != state.shape[0]:
            raise ValueError(
                f"{len(embodiments)} embodiment names for a batch of {state.shape[0]}")
        state = state.to(self.dtype)
        tokens = state.new_zeros(state.shape[0], self.right.hidden_size)
        for name in dict.fromkeys(embodiments):
            if name not in self.state_encoders:
                raise KeyError(f"unknown embodiment {name!r}; the model knows "
                               f"{sorted(self.state_encoders)}")
            index = torch.tensor([i for i, e in enumerate(embodiments) if e == name],
                                 device=state.device)
            encoded = self.state_encoders[name](state[index], state_mask[index])
            tokens = tokens.index_copy(0, index, encoded)
        return tokens.unsqueeze(1)

    def left_cache(self, inputs: VisionLanguageInputs, positions: torch.Tensor,
                   image_embeds: torch.Tensor, deepstack) -> AsyMoTCache:
        """Run the frozen Left Brain's decoder; returns its per-layer K/V, frozen."""
        with torch.no_grad():
            embeds = self.left.embed(inputs.input_ids, image_embeds)
            cache = AsyMoTCache(config=self.left.text_config)
            self.left.decode(embeds, inputs.attention_mask, positions, past_key_values=cache,
                             visual_pos_masks=inputs.visual_mask, deepstack_embeds=deepstack)
        return cache.freeze()

    def encode(self, inputs: VisionLanguageInputs, state: torch.Tensor, state_mask: torch.Tensor,
               embodiments: list[str], timer=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run both brains; returns the Right Brain's final hidden states and their validity mask.

        Args:
            inputs: processed prompts and images (left-padded batch).
            state: (B, max_state_dim) normalized, zero-padded states.
            state_mask: (B, max_state_dim) 1 on real state dims.
            embodiments: per sample, the embodiment name (selects the state encoder).
            timer: optional `StageTimer` recording the vision / left / right stages.

        Returns:
            hidden (B, S + 1, hidden) and mask (B, S + 1) bool, the last token being the state.
        """
        timer = timer or NULL_TIMER
        batch = inputs.input_ids.shape[0]
        positions = self.right.rope_index(inputs)
        with timer("vision"):
            if self.left is not None:
                with torch.no_grad():
                    left_vision = self.left.encode_images(
                        inputs.pixel_values, inputs.image_grid_thw)
            if self.share_vision:
                image_embeds, deepstack = left_vision
            else:
                image_embeds, deepstack = self.right.encode_images(
                    inputs.pixel_values, inputs.image_grid_thw)
        cache = None
        if self.left is not None:
            with timer("left_brain"):
                cache = self.left_cache(inputs, positions, *left_vision)
        with timer("right_brain"):
            embeds = self.right.embed(inputs.input_ids, image_embeds)
            state_token = self.encode_state(state, state_mask, embodiments).to(embeds.dtype)
            embeds = torch.cat([embeds, state_token], dim=1)
            # The state token takes the position after the prompt's last (per sample).
            state_pos = positions.amax(dim=(0, 2)) + 1
            positions = torch.cat([positions, state_pos.view(1, batch, 1).expand(3, -1, -1)], 2)
            ones = inputs.attention_mask.new_ones(batch, 1)
            right_mask = torch.cat([inputs.attention_mask, ones], dim=1)
            attn_mask = right_mask if cache is None else asymot_mask(
                inputs.attention_mask.bool(), self.config.left_visibility == "causal")
            visual = torch.cat([inputs.visual_mask, ones.bool().logical_not()], dim=1)
            hidden = self.right.decode(embeds, attn_mask, positions, past_key_values=cache,
                                       visual_pos_masks=visual, deepstack_embeds=deepstack)
        return hidden, right_mask.bool()

    def compute_loss(self, inputs: VisionLanguageInputs, state: torch.Tensor,
                     state_mask: torch.Tensor, embodiments: list[str], actions: torch.Tensor,
                     action_mask: torch.Tensor, generator: torch.Generator | None = None,
                     noise: torch.Tensor | None = None, t: torch.Tensor | None = None,
                     draws: int = 1) -> torch.Tensor:
        """Flow-matching loss of normalized, padded action chunks (B, horizon, action_dim).

        `draws`: flow-matching draws (noise and time) per sample for one pass of the brains;
        the action expert then sees each sample's conditioning `draws` times (B * draws rows,
        sample-major), which costs a DiT pass each while the brains, the expensive part, run
        once. `noise` (B * draws, horizon, action_dim) and `t` (B * draws,) may be given (e.g.
        drawn for the global batch so that a distributed run sees exactly the draws of a
        single-process one); otherwise they come from `generator`.
        """
        if draws < 1:
            raise ValueError(f"draws must be at least 1, got {draws}")
        hidden, mask = self.encode(inputs, state, state_mask, embodiments)
        if draws > 1:
            hidden, mask, actions, action_mask = (
                x.repeat_interleave(draws, dim=0) for x in (hidden, mask, actions, action_mask))
        return self.action_expert.loss(actions.to(hidden.dtype), action_mask, hidden, mask,
                                       generator=generator, noise=noise, t=t)

    forward = compute_loss

    @torch.no_grad()
    def sample_actions(self, inputs: VisionLanguageInputs, state: torch.Tensor,
                       state_mask: torch.Tensor, embodiments: list[str],
                       num_steps: int | None = None, generator: torch.Generator | None = None,
                       noise: torch.Tensor | None = None, timer=None,
                       prefix: torch.Tensor | None = None,
                       prefix_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized action chunks (B, horizon, max action_dim) by Euler integration.

        `prefix` and `prefix_weights`: real-time chunking (`FlowMatchingActionExpert.sample`).
        """
        timer = timer or NULL_TIMER
        hidden, mask = self.encode(inputs, state, state_mask, embodiments, timer=timer)
        with timer("action_expert"):
            return self.action_expert.sample(hidden, mask, num_steps=num_steps, noise=noise,
                                             generator=generator, prefix=prefix,
                                             prefix_weights=prefix_weights)

    # -- one observation, raw units ------------------------------------------------------------

    def transforms(self, embodiment: str) -> EmbodimentTransforms:
        """The embodiment's transforms into and out of this model (see `transforms`).

        Raises:
            KeyError: the model has no such embodiment.
        """
        if embodiment not in self.config.embodiments:
            raise KeyError(f"unknown embodiment {embodiment!r}; the model knows "
                           f"{sorted(self.config.embodiments)}")
        expert = self.config.action_expert
        return EmbodimentTransforms(embodiment, self.config.embodiments[embodiment],
                                    self.norm_stats[embodiment], self.config.max_state_dim,
                                    expert.action_dim, expert.horizon)

    def state_tensors(self, states, embodiment: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max_state_dim) normalized, padded states and masks from B raw states.

        Raises:
            ValueError: a state of the wrong shape or not finite.
        """
        transforms = self.transforms(embodiment)
        padded, masks = zip(*(transforms.state(state) for state in states), strict=True)
        return torch.from_numpy(np.stack(padded)), torch.from_numpy(np.stack(masks))

    @torch.no_grad()
    def predict_action(self, images: list[np.ndarray], instruction: str, state: np.ndarray,
                       embodiment: str, seed: int | None = None, num_steps: int | None = None,
                       timer=None, prefix: ChunkPrefix | None = None) -> np.ndarray:
        """One action chunk (horizon, action_dim) in raw units for one observation.

        Args:
            images: one HxWx3 uint8 RGB frame per camera.
            instruction: the language instruction.
            state: raw proprioceptive state of the embodiment, shape (state_dim,).
            embodiment: embodiment name (selects the state encoder and statistics).
            seed: seed of the initial noise; the same seed gives the same chunk.
            num_steps: Euler steps (default: the config's).
            timer: optional `StageTimer`.
            prefix: the previous plan's overlap, for real-time chunking (None: plain sampling).
        """
        return self.predict_action_batch([images], [instruction], [state], embodiment,
                                         [seed], num_steps=num_steps, timer=timer,
                                         prefixes=[prefix])[0]

    @torch.no_grad()
    def predict_action_batch(self, images: list[list[np.ndarray]], instructions: list[str],
                             states: list[np.ndarray], embodiment: str,
                             seeds: list[int | None], num_steps: int | None = None,
                             timer=None, prefixes: list[ChunkPrefix | None] | None = None
                             ) -> list[np.ndarray]:
        """Action chunks for several observations of one embodiment in one forward pass.

        Sample i gets exactly the noise `predict_action` draws for its own seed, so a batched
        observation gets the chunk it would get alone (up to the arithmetic of left padding).
        `prefixes` (one per observation, None for plain sampling) turn on real-time chunking.
        """
        if self.processor is None:
            raise RuntimeError("this model has no processor (built without a checkpoint dir)")
        transforms = self.transforms(embodiment)
        if not (len(images) == len(instructions) == len(states) == len(seeds)) or not images:
            raise ValueError("images, instructions, states and seeds must be equally long and "
                             "non-empty")
        padded, mask = self.state_tensors(states, embodiment)
        timer = timer or NULL_TIMER
        device = self.device
        with timer("preprocess"):
            inputs = self.processor([list(sample) for sample in images], list(instructions))
            inputs = self.right.with_positions(inputs).to(device, self.dtype)
        expert = self.config.action_expert
        shape = (1, expert.horizon, expert.action_dim)
        noise = torch.cat([
            torch.randn(shape, device=device, dtype=torch.float32, generator=None if seed is None
                        else torch.Generator(device=device).manual_seed(int(seed)))
            for seed in seeds])
        guided = self.prefix_tensors(prefixes, embodiment, len(images))
        chunks = self.sample_actions(inputs, padded.to(device), mask.to(device),
                                     [embodiment] * len(images), num_steps=num_steps,
                                     noise=noise, timer=timer,
                                     **({} if guided is None else
                                        {"prefix": guided[0].to(device),
                                         "prefix_weights": guided[1].to(device)}))
        return [transforms.output(chunk) for chunk in chunks.float().cpu().numpy()]

    def prefix_tensors(self, prefixes: list[ChunkPrefix | None] | None, embodiment: str,
                       batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Normalized (B, horizon, max action_dim) prefixes and weights; None if none given.

        An observation without a prefix gets weights 0 (its plain chunk).
        """
        if prefixes is None or all(p is None for p in prefixes):
            return None
        if len(prefixes) != batch:
            raise ValueError(f"{len(prefixes)} prefixes for {batch} observations")
        transforms = self.transforms(embodiment)
        values, weights = zip(*(transforms.prefix(prefix) for prefix in prefixes), strict=True)
        return torch.from_numpy(np.stack(values)), torch.from_numpy(np.stack(weights))
