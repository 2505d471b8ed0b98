"""Tiny offline checkpoints load through the same code path as a real HF checkpoint."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, camera_frame

from twinbrain_ros.model.backbone import BackboneError, QwenVLProcessor, load_vlm
from twinbrain_ros.model.presets import backbone_config
from twinbrain_ros.tools.make_tiny_checkpoint import main as make_tiny_main


@pytest.mark.parametrize("family", FAMILIES)
def test_real_qwen_tokenizer_ids(tiny_backbones, family):
    processor = QwenVLProcessor.from_pretrained(tiny_backbones[family])
    tok = processor.tokenizer
    assert tok("Hello, world!").input_ids == [9707, 11, 1879, 0]
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655}
    for token, token_id in expected.items():
        assert tok.convert_tokens_to_ids(token) == token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_weights_are_the_saved_ones(tiny_backbones, family):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    # The fixture made the checkpoint from seed 0: rebuild that model and compare every tensor.
    cls = (Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl"
           else Qwen3VLForConditionalGeneration)
    torch.manual_seed(0)
    original = cls(backbone_config(family, "tiny")).model.state_dict()
    state = load_vlm(tiny_backbones[family]).state_dict()
    assert state.keys() == original.keys()
    for name, tensor in state.items():
        assert torch.equal(original[name], tensor), name


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_expands_image_pads_to_the_grid(tiny_backbones, family):
    processor = QwenVLProcessor.from_pretrained(tiny_backbones[family], image_size=(56, 56))
    inputs = processor([[camera_frame(0), camera_frame(1)], [camera_frame(2)]],
                       ["two cameras", "one camera and a longer instruction here"])
    grid = inputs.image_grid_thw
    assert grid.shape == (3, 3)
    per_image = (grid.prod(-1) // processor.merge_size**2).tolist()
    image_tokens = inputs.mm_token_type_ids.sum(dim=1).tolist()
    assert image_tokens == [per_image[0] + per_image[1], per_image[2]]
    # Left padding: the last token of every row is real.
    assert inputs.attention_mask[:, -1].all()
    assert not inputs.attention_mask.all()


def test_bad_backbone_directories_are_named(tmp_path, tiny_backbones):
    with pytest.raises(BackboneError, match="does not exist"):
        load_vlm(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="no config.json"):
        load_vlm(tmp_path / "empty")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(BackboneError, match="'llama' is not supported"):
        load_vlm(tmp_path / "llama")


def test_command_line_writes_a_loadable_checkpoint(tmp_path, capsys):
    assert make_tiny_main(["--family", "qwen3_vl", "--out", str(tmp_path / "t")]) == 0
    assert "wrote tiny qwen3_vl checkpoint" in capsys.readouterr().out
    assert load_vlm(tmp_path / "t").config.model_type == "qwen3_vl"
