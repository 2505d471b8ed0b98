"""Qwen2.5-VL / Qwen3-VL backbones through transformers' own classes, and their input processing.

A backbone is loaded offline from one local HF checkpoint directory (the user's downloaded
checkpoint, or a tiny one from `twinbrain_ros.model.tiny`). Only the base model (`model.model`:
vision tower + language model) is kept: the LM head is never computed, which also unties the
embeddings so that freezing one brain never freezes a tied head of the other.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CausedError, refuse_long_text, shorten

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")


class BackboneError(ValueError):
    """A backbone checkpoint directory is missing, incomplete or of an unsupported type."""


class InstructionError(CausedError, ValueError):
    """An instruction the model must not see: too long or carrying the prompt's own tokens."""


def read_backbone_config(path: str | Path) -> dict:
    """Read and check `config.json` of a backbone checkpoint directory."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise BackboneError(f"backbone checkpoint directory {path} does not exist")
    if not config_file.is_file():
        raise BackboneError(f"backbone checkpoint {path} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise BackboneError(f"{config_file} is not valid JSON: {exc}") from exc
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BackboneError(
            f"{config_file}: model_type {model_type!r} is not supported; expected one of "
            f"{SUPPORTED_MODEL_TYPES} (a Qwen2.5-VL or Qwen3-VL checkpoint)")
    return config


QUICK_JSON_BYTES = 1 << 20  # larger JSON files (tokenizer.json) are checked at both ends only


def check_backbone_files(path: str | Path, weights: bool = True, full: bool = False) -> None:
    """Open every JSON file (and safetensors header) of a checkpoint directory.

    transformers and tokenizers report a truncated file without its name; this names it.
    JSON files above `QUICK_JSON_BYTES` are only checked to begin with '{' and end with '}'
    (a truncated one does not), unless `full`: parsing the 7 MB Qwen tokenizer.json costs
    about a second, and the tokenizer parses it anyway (a failure there runs the full check).

    Raises:
        BackboneError: naming the first unreadable file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    for file in sorted(path.glob("*.json")):
        try:
            if not full and file.stat().st_size > QUICK_JSON_BYTES:
                with open(file, "rb") as handle:
                    head = handle.read(64).lstrip()
                    handle.seek(-64, 2)
                    tail = handle.read().rstrip()
                if not (head.startswith(b"{") and tail.endswith(b"}")):
                    raise json.JSONDecodeError("the file does not end its top-level object",
                                               tail.decode("utf-8", "replace"), len(tail))
            else:
                json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise BackboneError(f"{file} is unreadable (truncated or corrupt?): {exc}") from exc
    if not weights:
        return
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise BackboneError(f"{file} is truncated or corrupt: {exc}") from exc


def _processor_chat_template(path: Path) -> str | None:
    """The chat template a checkpoint's processor uses (chat_template.json), if it has one.

    Qwen-VL checkpoints keep their image-aware template there; `chat_template.jinja` and
    `tokenizer_config.json` are read by the tokenizer itself.
    """
    file = path / "chat_template.json"
    if not file.is_file():
        return None
    template = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
    return template if isinstance(template, str) and template else None


def _model_class(model_type: str):
    from transformers import Qwen2_5_VLModel, Qwen3VLModel

    return Qwen2_5_VLModel if model_type == "qwen2_5_vl" else Qwen3VLModel


def load_vlm(path: str | Path, dtype: torch.dtype = torch.float32,
             attn_implementation: str = "sdpa") -> nn.Module:
    """Load the base VLM (vision tower + language model, no LM head) from a local directory."""
    model_type = read_backbone_config(path)["model_type"]
    if not any(Path(path).glob("*.safetensors")):
        raise BackboneError(f"backbone checkpoint {path} has no *.safetensors weights")
    check_backbone_files(path)
    try:
        return _model_class(model_type).from_pretrained(
            str(path), dtype=dtype, attn_implementation=attn_implementation,
            local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BackboneError(f"cannot load the backbone weights in {path}: {exc}") from exc


def build_vlm(config, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Build a random-weight base VLM from an HF config (benchmarks at real sizes)."""
    config._attn_implementation = attn_implementation
    return _model_class(config.model_type)._from_config(config, dtype=dtype)


class QwenVLBackbone(nn.Module):
    """One brain: a Qwen-VL base model with the few entry points AsyMoT needs.

    The stock vision tower, embedding, M-RoPE index and decoder layers are used unchanged, so
    the attention kernels are transformers' own (SDPA or flash-attention).
    """

    def __init__(self, vlm: nn.Module):
        """Wrap a `Qwen2_5_VLModel` or `Qwen3VLModel`."""
        super().__init__()
        self.vlm = vlm
        self.model_type = vlm.config.model_type
        self.text_config = vlm.config.get_text_config()
        self.hidden_size = self.text_config.hidden_size
        self.image_token_id = vlm.config.image_token_id

    @property
    def has_deepstack(self) -> bool:
        """Whether vision features are also injected into early decoder layers (Qwen3-VL)."""
        return self.model_type == "qwen3_vl"

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        """Run the vision tower: merged image tokens (N, hidden) and deepstack features or None."""
        out = self.vlm.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        embeds = torch.cat(out.pooler_output, dim=0)
        deepstack = None
        if self.has_deepstack:
            deepstack = [torch.cat(feat, dim=0) for feat in out.deepstack_features]
        return embeds, deepstack

    def vision_metadata(self, image_grid_thw: torch.Tensor) -> dict:
        """The vision tower's grid-dependent tensors, computed ahead for a fixed image grid.

        transformers' Qwen vision towers accept these precomputed (the same helper functions
        compute them inside otherwise); with them the traced tower reads no grid values.
        """
        from transformers import vision_utils
        from transformers.utils.generic import get_max_seqlen

        visual, grid = self.vlm.visual, image_grid_thw
        meta = {"position_ids": vision_utils.get_vision_position_ids(
            grid, visual.spatial_merge_size)}
        cu_seqlens, max_seqlen = vision_utils.get_vision_attention_seqlens(grid, visual.config)
        meta["cu_seqlens"] = cu_seqlens
        if max_seqlen is not None:
            meta["max_seqlen"] = max_seqlen
        if self.model_type == "qwen2_5_vl":
            window_index, cu_window = vision_utils.get_vision_window_index(
                grid, spatial_merge_size=visual.spatial_merge_size,
                window_size=visual.window_size, patch_size=visual.patch_size)
            meta.update(window_index=window_index, cu_window_seqlens=cu_window)
            max_window = get_max_seqlen(cu_window, visual.config)
            if max_window is not None:
                meta["max_window_seqlen"] = max_window
        else:
            indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
                grid, num_grid_per_side=visual.num_grid_per_side,
                mode=visual.interpolation_mode, align_corners=visual.interpolation_align_corners,
                spatial_merge_size=visual.config.spatial_merge_size)
            meta.update(interp_indices=indices, interp_weights=weights)
        return meta

    def encode_images_traceable(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                                metadata: dict):
        """`encode_images` for a fixed grid and its `vision_metadata`, traceable.

        The tower's own forward, without transformers' decorators (torch.compile cannot
        trace those).
        """
        visual = self.vlm.visual
        forward = inspect.unwrap(type(visual).forward)
        out = forward(visual, pixel_values.type(visual.dtype), grid_thw=grid_thw, **dict(metadata))
        deepstack = list(out.deepstack_features) if self.has_deepstack else None
        return out.pooler_output, deepstack

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image tokens written into the `<|image_pad|>` slots."""
        embeds = self.vlm.get_input_embeddings()(input_ids)
        image_mask = (input_ids == self.image_token_id).unsqueeze(-1)
        # The count check reads the device; on accelerators the processor's check stands.
        if input_ids.device.type == "cpu" and int(image_mask.sum()) != image_embeds.shape[0]:
            raise ValueError(
                f"{int(image_mask.sum())} image placeholder tokens but {image_embeds.shape[0]} "
                "image features: the processor and the vision tower disagree")
        return embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))

    def embed_unchecked(self, input_ids: torch.Tensor, image_embeds: torch.Tensor
                        ) -> torch.Tensor:
        """`embed` without the count check (no host read: the engine's shapes are fixed)."""
        embeds = self.vlm.get_input_embeddings()(input_ids)
        image_mask = (input_ids == self.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))

    def rope_index(self, inputs: VisionLanguageInputs) -> torch.Tensor:
        """3-row M-RoPE positions (3, B, S) of a left-padded batch (precomputed ones if set)."""
        if inputs.position_ids is not None:
            return inputs.position_ids
        positions, _ = self.vlm.get_rope_index(
            inputs.input_ids, mm_token_type_ids=inputs.mm_token_type_ids,
            image_grid_thw=inputs.image_grid_thw, attention_mask=inputs.attention_mask)
        return positions

    def with_positions(self, inputs: VisionLanguageInputs) -> VisionLanguageInputs:
        """`inputs` with their M-RoPE positions computed here (call it while on the CPU).

        `get_rope_index` walks the tokens in Python; on CPU tensors that costs no device
        synchronisation, so inference computes positions before moving inputs to the GPU.
        """
        return dataclasses.replace(inputs, position_ids=self.rope_index(inputs))

    def decode(self, inputs_embeds, attention_mask, position_ids, past_key_values=None,
               visual_pos_masks=None, deepstack_embeds=None, traceable: bool = False
               ) -> torch.Tensor:
        """Run the language model's decoder layers; returns the final-norm hidden states.

        `traceable=True` calls the model's own forward without transformers' decorators (output
        capturing, config defaults), which torch.compile cannot trace through: the same
        layers, every argument passed explicitly.
        """
        kwargs = {}
        if self.has_deepstack:
            kwargs = dict(visual_pos_masks=visual_pos_masks,
                          deepstack_visual_embeds=deepstack_embeds)
        model = self.vlm.language_model
        forward = inspect.unwrap(type(model).forward) if traceable else model.forward.__func__
        out = forward(model, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      position_ids=position_ids, past_key_values=past_key_values,
                      use_cache=past_key_values is not None, **kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@dataclass
class VisionLanguageInputs:
    """A left-padded batch of prompts with their images, ready for a Qwen-VL backbone."""

    input_ids: torch.Tensor        # (B, S) long
    attention_mask: torch.Tensor   # (B, S) long, 0 on left padding
    mm_token_type_ids: torch.Tensor  # (B, S) int, 1 on image tokens
    pixel_values: torch.Tensor     # (num_patches, patch_dim)
    image_grid_thw: torch.Tensor   # (num_images, 3) long
    # (3, B, S) M-RoPE positions, when computed ahead (on the CPU, see `with_positions`).
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None):
        """Move to a device; `dtype` applies to the pixel values only."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: v if v is None else v.to(device) for k, v in moved.items()}
        if dtype is not None:
            moved["pixel_values"] = moved["pixel_values"].to(dtype)
        return VisionLanguageInputs(**moved)

    @property
    def visual_mask(self) -> torch.Tensor:
        """(B, S) bool: True where a token is an image token."""
        return self.mm_token_type_ids.bool()


class QwenVLProcessor:
    """Turns camera images and an instruction into backbone inputs.

    Uses the checkpoint's own tokenizer and image processor (AutoProcessor needs torchvision for
    its video half, so the two are loaded on their own). The prompt follows the Qwen chat format
    with one `<|vision_start|><|image_pad|>...<|vision_end|>` block per camera; each image pad is
    expanded to `grid_thw.prod() // merge_size**2` tokens, which is all the stock processor adds.
    """

    def __init__(self, tokenizer, image_processor, image_token_id: int,
                 image_size: tuple[int, int] | None = None, chat_template: str | None = None):
        """Build from a loaded tokenizer and image processor.

        Args:
            tokenizer: the checkpoint's tokenizer.
            image_processor: the checkpoint's Qwen2-VL image processor.
            image_token_id: id of `<|image_pad|>`.
            image_size: (height, width) every camera frame is resized to before the image
                processor (None keeps the frame size), so that token counts stay fixed.
            chat_template: the checkpoint's chat template (Jinja) for free-form questions
                (`chat_prompt`); None: the tokenizer's own, if it has one.
        """
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        self.merge_size = image_processor.merge_size
        self.image_size = tuple(image_size) if image_size else None
        self.pad_token_id = tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)

    @classmethod
    def from_pretrained(cls, path: str | Path, image_size=None) -> QwenVLProcessor:
        """Load the tokenizer and image processor of a local checkpoint directory."""
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        config = read_backbone_config(path)
        for required in ("preprocessor_config.json",):
            if not (path / required).is_file():
                raise BackboneError(f"backbone checkpoint {path} has no {required}")
        check_backbone_files(path, weights=False)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(
                str(path), backend="pil", local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception types
            check_backbone_files(path, weights=False, full=True)  # names a corrupt file
            raise BackboneError(f"cannot load the tokenizer or image processor in {path}: "
                                f"{exc}") from exc
        return cls(tokenizer, image_processor, config["image_token_id"], image_size=image_size,
                   chat_template=_processor_chat_template(path))

    def check_instruction(self, instruction: str, max_tokens: int) -> int:
        """The instruction's token count; `InstructionError` if it cannot be used as given.

        Causes: `instruction_too_long` (more than `max_tokens` tokens; a byte-level BPE token
        covers at least one character, so longer texts are refused before tokenizing them) and
        `instruction_special_tokens` (the chat format's or the vision markers' own tokens,
        which would change the prompt's structure).
        """
        return self.check_text(instruction, max_tokens)

    def check_text(self, text: str, max_tokens: int, kind: str = "instruction",
                   limit_name: str = "max_instruction_tokens") -> int:
        """`check_instruction` for any user text (a question to the Left Brain, too).

        Causes `{kind}_too_long` and `{kind}_special_tokens`; messages name `limit_name`.
        """
        refuse_long_text(text, max_tokens, kind, limit_name, InstructionError)
        specials = [t for t in self._special_tokens() if t in text]
        if specials:
            raise InstructionError(f"{kind}_special_tokens",
                                   f"{kind} contains the special tokens "
                                   f"{shorten(repr(specials[:3]), 80)}: "
                                   f"{shorten(repr(text))}")
        count = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if count > max_tokens:
            raise InstructionError(f"{kind}_too_long",
                                   f"{kind} has {count} tokens, more than {max_tokens} "
                                   f"({limit_name})")
        return count

    def _special_tokens(self) -> list[str]:
        if not hasattr(self, "_specials"):
            decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
            found = {str(t) for t in self.tokenizer.all_special_tokens}
            found |= {str(t) for t in decoder.values() if getattr(t, "special", False)}
            found.add("<|placeholder|>")  # the marker __call__ expands image pads with
            self._specials = sorted(t for t in found if t)
        return self._specials

    def prompt(self, instruction: str, num_images: int) -> str:
        """The chat-format prompt text with one vision block per image (pads not expanded)."""
        vision = f"<|vision_start|>{self.image_token}<|vision_end|>" * num_images
        return (f"<|im_start|>user\n{vision}{instruction}<|im_end|>\n"
                "<|im_start|>assistant\n")

    def chat_prompt(self, question: str, num_images: int) -> str:
        """A question about `num_images` images in the checkpoint's own chat template.

        The images come first, then the question, in one user turn, followed by the
        template's generation prompt (as transformers' `apply_chat_template` renders it).

        Raises:
            BackboneError: the checkpoint has no chat template, or its template does not place
                one image block per image.
        """
        if not self.chat_template:
            raise BackboneError("the backbone checkpoint has no chat template (chat_template."
                                "json, chat_template.jinja or tokenizer_config.json)")
        content = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": question})
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], chat_template=self.chat_template,
            add_generation_prompt=True, tokenize=False)
        if text.count(self.image_token) != num_images:
            raise BackboneError(f"the chat template placed {text.count(self.image_token)} "
                                f"image blocks for {num_images} image(s)")
        return text

    def _resize(self, image: np.ndarray) -> np.ndarray:
        if self.image_size is None or tuple(image.shape[:2]) == self.image_size:
            return image
        from PIL import Image

        height, width = self.image_size
        return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))

    def __call__(self, images: list[list[np.ndarray]], instructions: list[str]
                 ) -> VisionLanguageInputs:
        """Process a batch.

        Args:
            images: per sample, a list of HxWx3 uint8 RGB frames (one per camera).
            instructions: per sample, the language instruction.
        """
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} image lists for {len(instructions)} instructions")
        return self.encode(images, [self.prompt(instruction, len(sample))
                                    for sample, instruction in zip(images, instructions,
                                                                   strict=True)])

    def encode(self, images: list[list[np.ndarray]], prompts: list[str]
               ) -> VisionLanguageInputs:
        """Process a batch of prompt texts holding one `<|image_pad|>` per image of the sample.

        Each image pad is expanded to the image's token count.
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        flat = []
        for sample in images:
            if len(sample) == 0:
                raise ValueError("every sample needs at least one camera image")
            for image in sample:
                if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                    raise ValueError(
                        f"camera images must be HxWx3 uint8 RGB, got {image.dtype} "
                        f"{tuple(image.shape)}")
                flat.append(self._resize(image))
        vision = self.image_processor(images=flat, return_tensors="pt")
        grid = vision["image_grid_thw"]
        tokens_per_image = (grid.prod(-1) // self.merge_size**2).tolist()
        texts, k = [], 0
        for sample, text in zip(images, prompts, strict=True):
            # Expand each image pad to its token count (a marker avoids re-expanding).
            for _ in sample:
                text = text.replace(self.image_token, "<|placeholder|>" * tokens_per_image[k], 1)
                k += 1
            texts.append(text.replace("<|placeholder|>", self.image_token))
        tokens = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        input_ids = tokens["input_ids"]
        found = int((input_ids == self.image_token_id).sum())
        if found != sum(tokens_per_image):
            raise ValueError(f"the prompts hold {found} image tokens for {sum(tokens_per_image)} "
                             f"image features: an instruction must not contain "
                             f"{self.image_token!r} or other vision special tokens")
        return VisionLanguageInputs(
            input_ids=input_ids,
            attention_mask=tokens["attention_mask"],
            mm_token_type_ids=(input_ids == self.image_token_id).to(torch.int32),
            pixel_values=vision["pixel_values"],
            image_grid_thw=grid,
        )
