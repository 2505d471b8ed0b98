"""TwinBrainVLA checkpoints: one directory, written atomically, checked when loaded.

Layout:
- `twinbrain_config.json`: the `TwinBrainConfig` (including the backbone path) and a fingerprint
  of the backbone it was trained from;
- `model.safetensors`: the Right Brain, the state encoders and the action expert. The Left Brain
  is never written: it is the base backbone checkpoint, loaded from `backbone_path`. Its SHA-256
  is recorded in the config file and checked at every load (about 1 GB/s), so a flipped bit is
  an error that names the file, never a silently different model;
- `norm_stats.json`: state/action normalization statistics per embodiment;
- `ema.safetensors` (training with `ema_decay`): an exponential moving average of the trainable
  weights, checksummed like the weights. Inference loads it over `model.safetensors` when it is
  there; resuming a run reads both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..transforms.normalization import EmbodimentNormStats
from .backbone import BackboneError, QwenVLProcessor, load_vlm, read_backbone_config
from .twinbrain import TwinBrainConfig, TwinBrainVLA

CONFIG_FILE = "twinbrain_config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
NORM_STATS_FILE = "norm_stats.json"
FORMAT_VERSION = 1
_FINGERPRINT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size")


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file, corrupt, or does not fit its backbone."""


def backbone_fingerprint(backbone_config: dict) -> dict:
    """The backbone properties a checkpoint depends on (compared when loading)."""
    text = backbone_config.get("text_config", backbone_config)
    return {"model_type": backbone_config["model_type"],
            **{key: text.get(key) for key in _FINGERPRINT_KEYS}}


def trainable_state_dict(model: TwinBrainVLA) -> dict[str, torch.Tensor]:
    """Everything of the model that a checkpoint stores: all but the Left Brain."""
    return {name: tensor for name, tensor in model.state_dict().items()
            if not name.startswith("left.")}


def save_checkpoint(model: TwinBrainVLA, directory: str | Path, metadata: dict | None = None,
                    extra: Callable[[Path], None] | None = None,
                    tensors: dict[str, torch.Tensor] | None = None,
                    ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint directory atomically.

    Files go to a temporary sibling directory first, which then replaces `directory` with a
    rename, so a crash leaves either the old complete checkpoint or the new one, never half.
    `extra(tmp_dir)` may add files (e.g. the optimizer state) before the rename. `tensors`
    replaces the model's own state dict (e.g. full tensors gathered from a sharded model).
    `ema`: moving averages of (some of) those tensors, written to `ema.safetensors`.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        tensors = {k: v.detach().contiguous().cpu()
                   for k, v in (tensors or trainable_state_dict(model)).items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        backbone = read_backbone_config(model.config.backbone_path)
        config = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(),
                  "backbone_fingerprint": backbone_fingerprint(backbone),
                  "weights_sha256": file_sha256(tmp / WEIGHTS_FILE),
                  "metadata": metadata or {}}
        if ema is not None:
            unknown = sorted(set(ema) - set(tensors))
            if unknown:
                raise ValueError(f"EMA tensors {unknown[:5]} are not weights of the model")
            save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()},
                      str(tmp / EMA_FILE), metadata={"format": "pt"})
            config["ema_sha256"] = file_sha256(tmp / EMA_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        stats = {name: s.to_dict() for name, s in model.norm_stats.items()}
        (tmp / NORM_STATS_FILE).write_text(json.dumps(stats, indent=2))
        if extra is not None:
            extra(tmp)
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(directory: str | Path, raw_config: dict | None = None,
                   name: str = WEIGHTS_FILE) -> None:
    """Check `model.safetensors` (or `name`) against the checksum its checkpoint recorded.

    Raises:
        CheckpointError: the file differs from what was written.
    """
    directory = Path(directory)
    if raw_config is None:
        raw_config = read_checkpoint_config(directory)[1]
    expected = raw_config.get("weights_sha256" if name == WEIGHTS_FILE else "ema_sha256")
    path = directory / name
    if expected is None:
        warnings.warn(f"checkpoint {directory} records no checksum of {WEIGHTS_FILE} (written "
                      "by an older version): its integrity is not checked", stacklevel=2)
        return
    try:
        found = file_sha256(path)
    except OSError as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from exc
    if found != expected:
        raise CheckpointError(f"{path} is corrupt: its SHA-256 {found[:16]}... differs from the "
                              f"{expected[:16]}... recorded when it was written")


def read_checkpoint_config(directory: str | Path) -> tuple[TwinBrainConfig, dict]:
    """Read and check `twinbrain_config.json`; returns the config and the raw file content."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE, NORM_STATS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {name}")
    try:
        raw = json.loads((directory / CONFIG_FILE).read_text())
        config = TwinBrainConfig.from_dict(raw["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE} is invalid: {exc}") from exc
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory / CONFIG_FILE}: format_version "
                              f"{raw.get('format_version')!r}, expected {FORMAT_VERSION}")
    return config, raw


def read_norm_stats(directory: str | Path) -> dict[str, EmbodimentNormStats]:
    """Read `norm_stats.json` of a checkpoint directory."""
    path = Path(directory) / NORM_STATS_FILE
    try:
        data = json.loads(path.read_text())
        return {name: EmbodimentNormStats.from_dict(s) for name, s in data.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is invalid: {exc}") from exc


def _read_weights(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load safetensors after checking names and shapes against the model, naming problems."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - set(expected))
            if missing or unexpected:
                raise CheckpointError(
                    f"{path} does not fit the model: {len(missing)} missing tensors "
                    f"{missing[:5]}, {len(unexpected)} unexpected tensors {unexpected[:5]}")
            for name in sorted(names):
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[name].shape):
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has shape {shape}, the model expects "
                        f"{tuple(expected[name].shape)}")
            return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt: {exc}") from exc


def read_ema(directory: str | Path, model: TwinBrainVLA, raw_config: dict | None = None
             ) -> dict[str, torch.Tensor] | None:
    """The checkpoint's EMA weights (checked against the model's names and shapes), or None.

    Raises:
        CheckpointError: the config records an EMA file that is missing, corrupt or does not
            fit the model.
    """
    directory = Path(directory)
    if raw_config is None:
        raw_config = read_checkpoint_config(directory)[1]
    if "ema_sha256" not in raw_config:
        return None
    if not (directory / EMA_FILE).is_file():
        raise CheckpointError(f"checkpoint {directory} records {EMA_FILE} but it is missing")
    verify_weights(directory, raw_config, EMA_FILE)
    expected = trainable_state_dict(model)
    try:
        with safe_open(str(directory / EMA_FILE), framework="pt") as f:
            names = set(f.keys())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{directory / EMA_FILE} is truncated or corrupt: {exc}") from exc
    unknown = sorted(names - set(expected))
    if unknown:
        raise CheckpointError(f"{directory / EMA_FILE} has tensors the model does not: "
                              f"{unknown[:5]}")
    return _read_weights(directory / EMA_FILE, {n: expected[n] for n in names})


def load_trainable_weights(model: TwinBrainVLA, directory: str | Path) -> None:
    """Load a checkpoint's weights into an already-built model of the same configuration."""
    directory = Path(directory)
    verify_weights(directory)
    norm_stats = read_norm_stats(directory)  # every file checked before the model changes
    weights = _read_weights(directory / WEIGHTS_FILE, trainable_state_dict(model))
    model.load_state_dict(weights, strict=False)
    model.norm_stats = norm_stats


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, backbone_path: str | Path | None = None,
                    use_ema: bool = True) -> TwinBrainVLA:
    """Load a TwinBrainVLA checkpoint.

    Args:
        directory: the checkpoint directory.
        device: where to put the model.
        dtype: weight dtype (float32 on CPU, bfloat16 on GPU).
        backbone_path: override of the backbone directory stored in the config (for a
            checkpoint moved to another machine).
        use_ema: load the moving-average weights over the raw ones when the checkpoint has
            them (`ema.safetensors`).

    Raises:
        CheckpointError: naming the missing file, the corrupt file, or the mismatching tensor
            or backbone property.
    """
    directory = Path(directory)
    config, raw = read_checkpoint_config(directory)
    if backbone_path is not None:
        config.backbone_path = str(backbone_path)
    try:
        backbone = read_backbone_config(config.backbone_path)
    except BackboneError as exc:
        raise CheckpointError(f"checkpoint {directory}: its backbone is unusable: {exc} "
                              "(pass backbone_path to point at the base checkpoint)") from exc
    found = backbone_fingerprint(backbone)
    wanted = raw.get("backbone_fingerprint", {})
    if found != wanted:
        diff = {k: (wanted.get(k), found.get(k)) for k in found if wanted.get(k) != found.get(k)}
        raise CheckpointError(f"checkpoint {directory} was trained on another backbone than "
                              f"{config.backbone_path}: (checkpoint, backbone) differ in {diff}")
    norm_stats = read_norm_stats(directory)
    verify_weights(directory, raw)
    vlm = load_vlm(config.backbone_path, dtype=dtype)
    processor = QwenVLProcessor.from_pretrained(config.backbone_path, config.image_size)
    model = TwinBrainVLA.from_vlm(config, vlm, processor)
    model.norm_stats = norm_stats
    missing = set(config.embodiments) - set(norm_stats)
    if missing:
        raise CheckpointError(f"{directory / NORM_STATS_FILE} has no statistics for "
                              f"embodiments {sorted(missing)}")
    weights = _read_weights(directory / WEIGHTS_FILE, trainable_state_dict(model))
    if use_ema:
        weights.update(read_ema(directory, model, raw) or {})
    model.load_state_dict(weights, strict=False)
    return model.to(device=device, dtype=dtype)
