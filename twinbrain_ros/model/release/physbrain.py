"""The TwinBrainVLA authors' release (PhysBrain-VLA), loaded and run as their code runs it.

Written from the facts of PhysBrain-VLA's `PhysBrainVLA` (built on a starVLA snapshot), in the
mode their inference uses (posterior, `mot_attention_mode: unidirectional`):

- Two copies of a Qwen-VL: the frozen Left Brain reads the images and the instruction; the Right
  Brain reads the images and `Instruction: {inst}` and, on the next line,
  `Action Query: <|action|> ... <|action|>`
  (`action_query_token_num` query tokens; its tokenizer has two added special tokens,
  `<|propri|>` and `<|action|>`, and its embedding table grows to fit them). Each prompt is one
  user turn rendered by the base model's chat template, with its own M-RoPE positions.
- At every decoder layer each brain projects its own queries, keys and values (Qwen3-VL: with
  its q/k norms) and applies its own rotary embedding; the Left Brain attends causally to
  itself; the Right Brain attends to [Left keys/values ; its own], where Right token i sees
  Left tokens 0..i (by index: the prompts differ) and every Right token past the Left sequence
  sees all of it, and its own tokens causally. Each brain then runs its own output projection,
  norm and MLP. Deepstack visual features are not injected into the decoder (their layer loop
  has no such step, for Qwen3-VL too).
- The Right Brain's final hidden states (after its final norm; with `hidden_states_selected_
  layer` another layer's, normed) at the query tokens condition the GR00T flow-matching head
  (`gr00t_head`), without a mask.

The module tree carries their parameter names (`qwen_vl_interface.frozen_vlm.model.`,
`qwen_vl_interface.trainable_vlm.model.`, and the alias `qwen_vl_interface.model.` of the
trainable one, as their interface registers it), so a checkpoint loads by name and, where a
file holds different values under the alias, the same value wins as in their loader.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import QwenVLBackbone, QwenVLProcessor
from .gr00t_head import GR00TFlowHead, GR00THeadConfig

ADDED_TOKENS = ("<|propri|>", "<|action|>")
ACTION_TOKEN = "<|action|>"
# The `doublevla` settings their inference reads, with their defaults.
DOUBLEVLA_DEFAULTS = {"action_query_token_num": 8, "hidden_states_selected_layer": -1,
                      "mot_attention_mode": "unidirectional"}


def _rotary(model_type: str):
    if model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb
    else:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb
    return apply_rotary_pos_emb


def right_tokenizer_processor(left: QwenVLProcessor) -> QwenVLProcessor:
    """The Right Brain's processor: the base tokenizer with the two added special tokens."""
    import copy

    tokenizer = copy.deepcopy(left.tokenizer)
    existing = list(getattr(tokenizer, "additional_special_tokens", None) or [])
    new = [t for t in ADDED_TOKENS if t not in existing]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": existing + new})
    return QwenVLProcessor(tokenizer, left.image_processor, left.image_token_id,
                           chat_template=left.chat_template)


class PhysBrainTwin(nn.Module):
    """PhysBrain-VLA's twin (posterior inference): two Qwen-VLs joined by unidirectional MoT."""

    def __init__(self, spec, left_vlm: nn.Module, right_vlm: nn.Module,
                 processor: QwenVLProcessor, head_cfg: GR00THeadConfig, doublevla: dict):
        super().__init__()
        self.spec = spec
        # Containers whose attribute names reproduce their parameter names.
        self.qwen_vl_interface = nn.Module()
        self.qwen_vl_interface.frozen_vlm = nn.Module()
        self.qwen_vl_interface.frozen_vlm.model = left_vlm
        self.qwen_vl_interface.trainable_vlm = nn.Module()
        self.qwen_vl_interface.trainable_vlm.model = right_vlm
        self.qwen_vl_interface.model = right_vlm     # their interface's alias of the Right VLM
        self.action_model = GR00TFlowHead(head_cfg)
        settings = {**DOUBLEVLA_DEFAULTS, **(doublevla or {})}
        if settings["mot_attention_mode"] != "unidirectional":
            raise ValueError(f"mot_attention_mode {settings['mot_attention_mode']!r}: only "
                             "'unidirectional' (the released models') is implemented")
        self.num_queries = int(settings["action_query_token_num"])
        self.selected_layer = int(settings["hidden_states_selected_layer"])
        self.processor = processor                  # the Left Brain's (the base tokenizer)
        self.right_processor = right_tokenizer_processor(processor)
        self.action_token_id = self.right_processor.tokenizer.convert_tokens_to_ids(ACTION_TOKEN)
        self.horizon = head_cfg.action_horizon
        self.action_dim = head_cfg.action_dim
        self.model_type = left_vlm.config.model_type
        self.apply_rotary = _rotary(self.model_type)

    @property
    def left(self) -> nn.Module:
        """The Left Brain's `Qwen*VLForConditionalGeneration`."""
        return self.qwen_vl_interface.frozen_vlm.model

    @property
    def right(self) -> nn.Module:
        """The Right Brain's `Qwen*VLForConditionalGeneration`."""
        return self.qwen_vl_interface.trainable_vlm.model

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.action_model.parameters()).device

    # -- inputs ------------------------------------------------------------------------------

    def prompt_texts(self, instruction: str) -> tuple[str, str]:
        """(Left, Right) user texts, with the config's CoT_prompt around each if it has one."""
        queries = " ".join([ACTION_TOKEN] * self.num_queries)
        texts = [instruction, f"Instruction: {instruction}\nAction Query: {queries}"]
        if self.spec.prompt:
            texts = [self.spec.prompt.replace("{instruction}", text) for text in texts]
        return texts[0], texts[1]

    def prepare_images(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 HxWx3 frames at the training resolution (`image_size`, area resize)."""
        from .starvla import resize_frames

        return resize_frames(images, self.spec.image_size)

    def vl_inputs(self, images: list[np.ndarray], instruction: str):
        """(Left inputs, Right inputs) of one observation, each in the base chat template."""
        frames = self.prepare_images(images)
        left_text, right_text = self.prompt_texts(instruction)
        left = self.processor.encode([frames], [self.processor.chat_prompt(left_text,
                                                                           len(frames))])
        right = self.right_processor.encode(
            [frames], [self.right_processor.chat_prompt(right_text, len(frames))])
        return left, right

    # -- the joint decoder -------------------------------------------------------------------

    def _prepare(self, vlm: nn.Module, inputs):
        """Embeddings with image features, rotary (cos, sin) and the causal + padding mask."""
        brain = QwenVLBackbone(vlm.model)
        device = self.device
        dtype = next(vlm.parameters()).dtype
        image_embeds, _ = brain.encode_images(inputs.pixel_values.to(device, dtype),
                                              inputs.image_grid_thw.to(device))
        ids = inputs.input_ids.to(device)
        hidden = brain.embed(ids, image_embeds)
        positions = brain.rope_index(inputs).to(device)
        rotary = vlm.model.language_model.rotary_emb(hidden, positions)
        length = ids.shape[1]
        mask = torch.triu(torch.full((length, length), float("-inf"), device=device,
                                     dtype=hidden.dtype), diagonal=1)[None, None]
        padding = inputs.attention_mask.to(device)[:, None, None, :].to(hidden.dtype)
        mask = mask + (1.0 - padding) * torch.finfo(hidden.dtype).min
        return hidden, rotary, mask

    def _qkv(self, attn: nn.Module, x: torch.Tensor, rotary) -> tuple[torch.Tensor, ...]:
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q, k = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)
        v = attn.v_proj(x).view(shape)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.apply_rotary(q, k, *rotary)
        return q, k, v

    @staticmethod
    def _attend(attn: nn.Module, q, k, v, mask) -> torch.Tensor:
        groups = attn.num_key_value_groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        out = out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        return attn.o_proj(out)

    @staticmethod
    def joint_mask(left_mask: torch.Tensor, right_mask: torch.Tensor) -> torch.Tensor:
        """The Right Brain's mask over [Left ; Right].

        Right token i sees Left tokens 0..i (the Left Brain's own causal and padding mask, row
        i) and, past the end of the Left sequence, all of it; its own tokens causally.
        """
        batch, right_len, left_len = right_mask.shape[0], right_mask.shape[-1], left_mask.shape[-1]
        over_left = torch.zeros((batch, 1, right_len, left_len), dtype=right_mask.dtype,
                                device=right_mask.device)
        rows = min(right_len, left_len)
        over_left[:, :, :rows, :] = left_mask[:, :, :rows, :]
        return torch.cat([over_left, right_mask], dim=-1)

    @torch.no_grad()
    def context(self, left_inputs, right_inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(the query tokens' hidden states (B, queries, H), the Right Brain's final states)."""
        left_h, left_rot, left_mask = self._prepare(self.left, left_inputs)
        right_h, right_rot, right_mask = self._prepare(self.right, right_inputs)
        joint = self.joint_mask(left_mask, right_mask)
        left_layers = self.left.model.language_model.layers
        right_layers = self.right.model.language_model.layers
        count = len(right_layers)
        selected = self.selected_layer % count
        chosen = None
        for i, (lay_l, lay_r) in enumerate(zip(left_layers, right_layers, strict=True)):
            lq, lk, lv = self._qkv(lay_l.self_attn, lay_l.input_layernorm(left_h), left_rot)
            rq, rk, rv = self._qkv(lay_r.self_attn, lay_r.input_layernorm(right_h), right_rot)
            if i < count - 1:  # the Left Brain's last layer output is never read
                left_h = left_h + self._attend(lay_l.self_attn, lq, lk, lv, left_mask)
                left_h = left_h + lay_l.mlp(lay_l.post_attention_layernorm(left_h))
            right_h = right_h + self._attend(lay_r.self_attn, rq, torch.cat([lk, rk], dim=2),
                                             torch.cat([lv, rv], dim=2), joint)
            right_h = right_h + lay_r.mlp(lay_r.post_attention_layernorm(right_h))
            if i == selected:
                chosen = right_h
        final = self.right.model.language_model.norm(chosen)
        ids = right_inputs.input_ids.to(final.device)
        where = ids == self.action_token_id
        counts = where.sum(dim=1)
        if not bool((counts == self.num_queries).all()):
            raise ValueError(f"expected {self.num_queries} action query tokens per sample, "
                             f"found {counts.tolist()}")
        queries = final[where].view(final.shape[0], self.num_queries, final.shape[-1])
        return queries, final

    @torch.no_grad()
    def sample(self, images: list[np.ndarray], instruction: str,
               state: np.ndarray | None = None, noise: torch.Tensor | None = None,
               seed: int | None = None) -> np.ndarray:
        """Normalized actions (horizon, action_dim) for one observation (see `QwenGR00T`)."""
        from .starvla import initial_noise

        queries, _ = self.context(*self.vl_inputs(images, instruction))
        head = self.action_model
        dtype = next(head.parameters()).dtype
        noise = initial_noise(noise, seed, self.horizon, self.action_dim)
        state_t = None
        if state is not None:
            state_t = torch.as_tensor(np.asarray(state, dtype=np.float32)).reshape(1, 1, -1)
            state_t = state_t.to(self.device, dtype)
        actions = head.sample(queries.to(dtype), noise.to(self.device, dtype), state_t, None)
        return actions[0].float().cpu().numpy()
