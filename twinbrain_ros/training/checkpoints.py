"""Training checkpoints: written whole or not at all, the newest valid one found on resume.

The optimizer, the schedule, the losses and the moving average are restored exactly.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..model.checkpoint import (
    EMA_FILE,
    load_trainable_weights,
    read_checkpoint_config,
    save_checkpoint,
    verify_weights,
)
from .config import TrainConfig
from .distributed import Dist, barrier

if TYPE_CHECKING:
    from .loop import WeightAverage

TRAINING_STATE = "training_state.pt"
CHECKPOINT_PREFIX = "step_"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are never listed)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / TRAINING_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def remove_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Delete half-written checkpoint directories a killed run left behind; returns them.

    `save_checkpoint` writes into `.step_N.tmp-*` and renames; a replaced checkpoint is moved to
    `.step_N.old-*` before it is deleted. Either left behind means the run died in between.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(
        f".{CHECKPOINT_PREFIX}") and (".tmp-" in p.name or ".old-" in p.name)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def newest_valid_checkpoint(model, output_dir: str | Path, log=print
                            ) -> tuple[Path, dict] | None:
    """The newest checkpoint whose weights and training state load; older ones as fallback.

    Loads its weights into `model` and returns (directory, training state). A checkpoint that
    fails (a corrupt or truncated file) is skipped with a warning naming it and the reason.
    """
    for directory in reversed(checkpoint_dirs(output_dir)):
        try:
            state = _load_training_state(directory)
            load_trainable_weights(model, directory)  # checks the checksum first
            if "ema_sha256" in read_checkpoint_config(directory)[1]:
                verify_weights(directory, name=EMA_FILE)  # the average is part of the state
        except Exception as error:  # noqa: BLE001 - any unreadable file: try the previous one
            log(f"warning: checkpoint {directory} is unusable ({type(error).__name__}: "
                f"{str(error)[:300]}); falling back to the previous one")
            continue
        return directory, state
    return None


def _load_training_state(directory: Path) -> dict:
    state = torch.load(directory / TRAINING_STATE, weights_only=False, map_location="cpu")
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler",
                                           "losses"} <= set(state):
        raise ValueError(f"{directory / TRAINING_STATE} lacks the training state keys")
    return state


def resume_checkpoint(model, config: TrainConfig, dist: Dist) -> tuple[Path, dict] | None:
    """The checkpoint to resume from, chosen by the main process for all of them.

    Every process must resume from the same step: the main process picks the newest valid
    checkpoint (see `newest_valid_checkpoint`) and the others load that one.
    """
    choice = None
    if dist.main:
        choice = newest_valid_checkpoint(model, config.output_dir,
                                         log=lambda text: print(text, flush=True))
    if dist.world == 1:
        return choice
    box = [None if choice is None else str(choice[0])]
    torch.distributed.broadcast_object_list(box, src=0)
    if dist.main or box[0] is None:
        return choice
    directory = Path(box[0])
    state = _load_training_state(directory)
    load_trainable_weights(model, directory)
    return directory, state


def save_training_checkpoint(model, optimizer, scheduler, step: int, config: TrainConfig,
                             losses: list[float], dist: Dist,
                             ema: WeightAverage | None = None) -> Path | None:
    """Model files + optimizer/scheduler state in one atomically renamed directory.

    Called on every process: with FSDP the full tensors are gathered collectively; the main
    process writes. Returns the directory on the main process.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    path = None
    if dist.main:
        state = {"step": step, "optimizer": optimizer_state,
                 "scheduler": scheduler.state_dict(), "losses": losses,
                 "config": asdict(config), "ema_updates": ema.updates if ema else 0}

        def write_state(directory: Path) -> None:
            torch.save(state, directory / TRAINING_STATE)

        path = Path(config.output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
        tensors = {k: v for k, v in model_state.items() if not k.startswith("left.")}
        save_checkpoint(model, path, metadata={"step": step}, extra=write_state,
                        tensors=tensors, ema=ema.state_dict() if ema else None)
        for old in checkpoint_dirs(config.output_dir)[:-config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(dist)
    return path


def check_resumable(config: TrainConfig, state: dict) -> None:
    """Refuse to resume with another training objective than the checkpoint's run had.

    `flow_draws_per_sample` changes the loss and the noise stream (runs saved before it
    existed had 1): resuming with another value would not end like the uninterrupted run.
    """
    saved = state.get("config") or {}
    draws = int(saved.get("flow_draws_per_sample", 1))
    if draws != config.flow_draws_per_sample:
        raise ValueError(f"the checkpoint's run trained with flow_draws_per_sample={draws}; "
                         f"resume with flow_draws_per_sample={draws} (this run has "
                         f"{config.flow_draws_per_sample})")


def restore_optimizer(model, optimizer, scheduler, state: dict) -> tuple[int, list[float]]:
    """Load the optimizer (full, FQN-keyed) and scheduler state saved with a checkpoint.

    The implementation flags (`fused`, `foreach`) stay this run's: a saved group would
    otherwise bring its own (an unfused run's, or a fused one's into a sharded run).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    saved = state["optimizer"]
    for group, current in zip(saved.get("param_groups", []), optimizer.param_groups,
                              strict=False):
        for flag in ("fused", "foreach"):
            group[flag] = current.get(flag)
    set_optimizer_state_dict(model, optimizer, saved,
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], list(state["losses"])
