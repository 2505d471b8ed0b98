"""Checkpoints: round trip, the Left Brain not stored, and clear errors for bad directories."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import build_model, camera_frame
from safetensors import safe_open

from twinbrain_ros.model.backbone import load_vlm
from twinbrain_ros.model.checkpoint import (
    CONFIG_FILE,
    NORM_STATS_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from twinbrain_ros.transforms.normalization import EmbodimentNormStats, NormStats


@pytest.fixture(scope="module")
def saved(tiny_backbones, tmp_path_factory):
    """A trained-looking twin checkpoint (perturbed weights, real statistics)."""
    model = build_model(tiny_backbones["qwen2_5_vl"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    model.norm_stats["arm"] = EmbodimentNormStats(
        state=NormStats.from_data(rng.normal(size=(100, 5)), "min_max"),
        action=NormStats.from_data(rng.uniform(0, 1, size=(100, 7)), "q01_q99", binary=[6]))
    directory = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "step_10")
    return model, directory


def _chunk(model):
    return model.predict_action([camera_frame(5)], "stack the cups", np.full(5, 0.1), "arm",
                                seed=3)


def test_round_trip_reproduces_the_model(saved):
    model, directory = saved
    loaded = load_checkpoint(directory)
    np.testing.assert_allclose(_chunk(loaded), _chunk(model), atol=1e-6)
    assert loaded.norm_stats["arm"].action.binary == [6]
    assert set(np.unique(_chunk(loaded)[:, 6])) <= {0.0, 1.0}


def test_left_brain_is_not_written_and_comes_from_the_backbone(saved, tiny_backbones):
    model, directory = saved
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
        names = list(f.keys())
    assert names and not any(n.startswith("left.") for n in names)
    assert any(n.startswith("right.") for n in names)
    loaded = load_checkpoint(directory)
    base = load_vlm(tiny_backbones["qwen2_5_vl"])
    for name, tensor in base.state_dict().items():
        assert torch.equal(loaded.left.vlm.state_dict()[name], tensor), name


def test_save_replaces_an_existing_checkpoint_atomically(saved, tmp_path):
    model, _ = saved
    target = tmp_path / "latest"
    save_checkpoint(model, target)
    save_checkpoint(model, target, metadata={"step": 2})
    assert json.loads((target / CONFIG_FILE).read_text())["metadata"] == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def _copy(directory, tmp_path):
    return shutil.copytree(directory, tmp_path / "copy")


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE, NORM_STATS_FILE])
def test_missing_file_is_named(saved, tmp_path, missing):
    copy = _copy(saved[1], tmp_path)
    (copy / missing).unlink()
    with pytest.raises(CheckpointError, match=f"missing {missing}"):
        load_checkpoint(copy)


def test_truncated_weights_are_reported(saved, tmp_path):
    copy = _copy(saved[1], tmp_path)
    data = (copy / WEIGHTS_FILE).read_bytes()
    (copy / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt: its SHA-256"):
        load_checkpoint(copy)


def test_wrong_shapes_are_named(saved, tmp_path):
    copy = _copy(saved[1], tmp_path)
    raw = json.loads((copy / CONFIG_FILE).read_text())
    raw["config"]["action_expert"]["hidden_size"] = 64
    (copy / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"tensor 'action_expert\..*' has shape"):
        load_checkpoint(copy)


def test_missing_tensors_are_named(saved, tmp_path):
    copy = _copy(saved[1], tmp_path)
    raw = json.loads((copy / CONFIG_FILE).read_text())
    raw["config"]["action_expert"]["num_layers"] = 3
    (copy / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="missing tensors .*action_expert.blocks.2"):
        load_checkpoint(copy)


def test_other_backbone_is_refused(saved, tmp_path, tiny_backbones):
    with pytest.raises(CheckpointError, match="another backbone"):
        load_checkpoint(saved[1], backbone_path=tiny_backbones["qwen3_vl"])
    with pytest.raises(CheckpointError, match="backbone is unusable.*does not exist"):
        load_checkpoint(saved[1], backbone_path=tmp_path / "nowhere")


def test_invalid_config_json_is_named(saved, tmp_path):
    copy = _copy(saved[1], tmp_path)
    (copy / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="twinbrain_config.json is invalid"):
        load_checkpoint(copy)


def test_single_mode_round_trip(tiny_backbones, tmp_path):
    model = build_model(tiny_backbones["qwen3_vl"], brain_mode="single")
    with torch.no_grad():
        for p in model.action_expert.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = save_checkpoint(model, tmp_path / "single")
    loaded = load_checkpoint(directory)
    assert loaded.left is None
    np.testing.assert_allclose(_chunk(loaded), _chunk(model), atol=1e-6)


def test_a_flipped_bit_in_the_tensor_data_is_caught_by_the_checksum(saved, tmp_path):
    copy = _copy(saved[1], tmp_path)
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[len(data) - 100] ^= 0x10  # inside the last tensor's values, not the header
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with safe_open(str(copy / WEIGHTS_FILE), framework="pt"):
        pass  # the file still parses: only the checksum can tell
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt: its SHA-256"):
        load_checkpoint(copy)


def test_statistics_with_nan_are_refused(saved, tmp_path):
    copy = _copy(saved[1], tmp_path)
    stats = json.loads((copy / NORM_STATS_FILE).read_text())
    stats["arm"]["action"]["q99"][2] = float("nan")
    (copy / NORM_STATS_FILE).write_text(json.dumps(stats))
    with pytest.raises(CheckpointError, match=r"norm_stats.json is invalid: .*'q99' has "
                                              r"non-finite"):
        load_checkpoint(copy)


@pytest.mark.parametrize(("damaged", "how"), [
    ("model.safetensors", "truncated"), ("tokenizer.json", "truncated"),
    ("config.json", "truncated"), ("tokenizer.json", "garbled in the middle")])
def test_a_damaged_backbone_file_is_named(saved, tmp_path, tiny_backbones, damaged, how):
    from twinbrain_ros.model.backbone import BackboneError

    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_backbones["qwen2_5_vl"], backbone)
    data = (backbone / damaged).read_bytes()
    if how == "truncated":
        (backbone / damaged).write_bytes(data[: len(data) // 2])
    else:  # both ends intact: only parsing the whole file finds it
        middle = len(data) // 2
        (backbone / damaged).write_bytes(data[:middle] + b'"}}]{{' + data[middle + 6:])
    with pytest.raises((CheckpointError, BackboneError), match=f"{backbone / damaged}"):
        load_checkpoint(saved[1], backbone_path=backbone)
