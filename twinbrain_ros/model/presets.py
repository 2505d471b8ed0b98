"""HF configs for the Qwen VLM backbones: tiny ones for tests and demos, real sizes for benchmarks.

The real-size configs reproduce the published dimensions of Qwen2.5-VL-3B-Instruct and
Qwen3-VL-4B-Instruct so that benchmarks with random weights do exactly the arithmetic of the real
checkpoints. Real weights are always loaded from a local checkpoint directory, never from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is imported when a config is built: names stay cheap
    from transformers import PretrainedConfig, Qwen2_5_VLConfig, Qwen3VLConfig

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
SIZES = ("tiny", "mid", "full")

# Special token ids shared by Qwen2.5-VL and Qwen3-VL (their tokenizers agree on these).
QWEN_TOKEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
QWEN_VOCAB_SIZE = 151936


def backbone_config(family: str, size: str = "tiny") -> PretrainedConfig:
    """Return the HF config of a backbone family at a size.

    Args:
        family: "qwen2_5_vl" or "qwen3_vl".
        size: "tiny" (a few layers, for tests and CPU demos), "mid" (8 decoder layers of width
            512: a CPU benchmark with real compute per layer) or "full" (Qwen2.5-VL-3B or
            Qwen3-VL-4B dimensions).

    Raises:
        ValueError: for an unknown family or size.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; expected one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"unknown backbone size {size!r}; expected one of {SIZES}")
    if family == "qwen2_5_vl":
        return _qwen2_5_vl(size)
    return _qwen3_vl(size)


def _qwen2_5_vl(size: str) -> Qwen2_5_VLConfig:
    if size == "mid":
        text = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": [8, 12, 12]})
        vision = dict(depth=8, hidden_size=256, intermediate_size=512, num_heads=4,
                      out_hidden_size=512, fullatt_block_indexes=[3, 7], window_size=112)
    elif size == "tiny":
        # head_dim 16 -> sum(mrope_section) must be head_dim // 2 = 8.
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                     "mrope_section": [2, 3, 3]})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=64, fullatt_block_indexes=[1], window_size=112)
    else:
        text = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31],
                      window_size=112)
    text.update(vocab_size=QWEN_VOCAB_SIZE, max_position_embeddings=128000, rms_norm_eps=1e-6,
                hidden_act="silu", tie_word_embeddings=True)
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  tokens_per_second=2, hidden_act="silu", in_channels=3)
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                            **QWEN_TOKEN_IDS)


def _qwen3_vl(size: str) -> Qwen3VLConfig:
    if size == "mid":
        text = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                     "mrope_section": [12, 10, 10], "mrope_interleaved": True})
        vision = dict(depth=6, hidden_size=256, intermediate_size=1024, num_heads=4,
                      out_hidden_size=512, deepstack_visual_indexes=[1, 3, 5],
                      num_position_embeddings=2304)
    elif size == "tiny":
        # head_dim 16 -> mrope_section sums to 8; deepstack indexes must be < vision depth.
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                     "mrope_section": [4, 2, 2], "mrope_interleaved": True})
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=64, deepstack_visual_indexes=[0, 1],
                      num_position_embeddings=64)
    else:
        text = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                     "mrope_section": [24, 20, 20], "mrope_interleaved": True})
        vision = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                      out_hidden_size=2560, deepstack_visual_indexes=[5, 11, 17],
                      num_position_embeddings=2304)
    text.update(vocab_size=QWEN_VOCAB_SIZE, max_position_embeddings=262144, rms_norm_eps=1e-6,
                hidden_act="silu", tie_word_embeddings=True)
    vision.update(patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  hidden_act="gelu_pytorch_tanh", in_channels=3)
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                         **QWEN_TOKEN_IDS)
