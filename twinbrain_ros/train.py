r"""Train TwinBrainVLA's Right Brain, state encoders and action expert on LeRobot datasets.

    ros2 run twinbrain_ros train --config config/train.yaml backbone_path=/ckpt/Qwen3-VL-4B \
        datasets='[{path: /data/bridge, embodiment: widowx}]' steps=40000
    torchrun --nproc_per_node 8 -m twinbrain_ros.train --config my.yaml         # one node, 8 GPUs
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint HOST:29500 -m twinbrain_ros.train --config my.yaml      # two nodes

The Left Brain stays frozen and is never saved again (checkpoints point at the backbone). The
only loss is flow matching. Data order and flow-matching noise are functions of (seed, step):
a run resumed with `resume=true` from its newest complete checkpoint continues exactly as the
uninterrupted run would, and N processes with per-process batch B see the same samples and
noise as one process with batch N x B.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from .model.action_expert import ActionExpertConfig
from .model.checkpoint import (
    EMA_FILE,
    load_trainable_weights,
    read_checkpoint_config,
    read_ema,
    save_checkpoint,
    verify_weights,
)
from .model.twinbrain import TwinBrainConfig, TwinBrainVLA
from .robot.embodiment import Embodiment

STRATEGIES = ("ddp", "fsdp")
TRAINING_STATE = "training_state.pt"
CHECKPOINT_PREFIX = "step_"


@dataclass
class DatasetEntry:
    """One LeRobot dataset of the training mixture."""

    path: str
    embodiment: str
    weight: float = 1.0


@dataclass
class TrainConfig:
    """Everything a training run needs; YAML file + `key=value` overrides (see `load_config`)."""

    backbone_path: str = ""
    datasets: list[DatasetEntry] = field(default_factory=list)
    output_dir: str = "runs/twinbrain"
    brain_mode: str = "twin"
    horizon: int = 16
    image_size: list[int] = field(default_factory=lambda: [224, 224])
    max_state_dim: int = 32
    max_action_dim: int = 32
    action_expert: dict = field(default_factory=dict)  # ActionExpertConfig overrides
    freeze_right_vision: bool = False
    left_visibility: str = "all"    # Left tokens a Right token sees: all | causal (authors' code)
    batch_size: int = 8             # per process
    flow_draws_per_sample: int = 4  # flow-matching (noise, time) draws per brain pass
    ema_decay: float = 0.0          # moving average of the trainable weights (0: none)
    steps: int = 40000
    lr_right: float = 1e-5          # Right Brain (paper: 1e-5)
    lr_expert: float = 1e-4         # action expert and state encoders
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 500
    grad_clip: float = 1.0
    precision: str = "auto"         # auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp32
    left_dtype: str = "auto"        # frozen Left Brain weights: auto (bf16 when autocasting
                                    # to bf16, else fp32), bf16, fp32
    activation_checkpointing: bool = False
    strategy: str = "ddp"           # ddp | fsdp
    num_workers: int = 2
    cache_images: bool = False      # decode each episode's images once and keep them in memory
    seed: int = 0
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    resume: bool = False

    def __post_init__(self):
        """Convert values to the fields' types (naming a key that cannot be) and check them."""
        for f in fields(self):
            if f.name != "datasets":
                setattr(self, f.name, _convert(f.name, getattr(self, f.name), f.type))
        if not isinstance(self.datasets, list):
            raise ValueError(f"datasets must be a list of {{path, embodiment, weight}}, got "
                             f"{self.datasets!r}")
        entries = []
        for d in self.datasets:
            if isinstance(d, DatasetEntry):
                entries.append(d)
                continue
            if not isinstance(d, dict) or set(d) - {"path", "embodiment", "weight"} or \
                    not {"path", "embodiment"} <= set(d):
                raise ValueError(f"datasets: each entry needs path and embodiment (and an "
                                 f"optional weight), got {d!r}")
            entries.append(DatasetEntry(path=_convert("datasets.path", d["path"], "str"),
                                        embodiment=_convert("datasets.embodiment",
                                                            d["embodiment"], "str"),
                                        weight=_convert("datasets.weight",
                                                        d.get("weight", 1.0), "float")))
        self.datasets = entries
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision {self.precision!r} is not auto, bf16 or fp32")
        if self.left_dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"left_dtype {self.left_dtype!r} is not auto, bf16 or fp32")
        if self.batch_size < 1 or self.steps < 1 or self.flow_draws_per_sample < 1:
            raise ValueError("batch_size, steps and flow_draws_per_sample must be positive")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_decay > 0 and self.strategy == "fsdp":
            raise ValueError("ema_decay is not supported with strategy fsdp (the average "
                             "would not be sharded): use ddp, or ema_decay=0")


_SCALARS = {"str": str, "int": int, "float": float, "bool": bool}


def _convert(key: str, value, annotation: str):
    """`value` as the type named by a field annotation (`float`, `list[int]`, ...).

    YAML reads `1e-4` as a string (it wants `1.0e-4`) and `5` where a float is meant: both are
    converted. A value that does not convert is refused with the key named.
    """
    annotation = str(annotation).replace(" ", "")
    if annotation.startswith("list["):
        inner = annotation[len("list["):-1]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} must be a list of {inner}, got {value!r}")
        return [_convert(key, v, inner) for v in value]
    if annotation == "dict":
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
        return value
    kind = _SCALARS.get(annotation)
    if kind is None:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"config key {key!r} must be a string, got {value!r}")
    if isinstance(value, bool):
        raise ValueError(f"config key {key!r} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r} must be {annotation_article(annotation)}, got "
                         f"{value!r}") from None
    if kind is int:
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
        return int(number)
    if not math.isfinite(number):
        raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
    return number


def annotation_article(annotation: str) -> str:
    """'an int' / 'a float' for messages."""
    return {"int": "an integer", "float": "a number"}.get(annotation, annotation)


def load_config(path: str | None, overrides: list[str]) -> TrainConfig:
    """Read the YAML config, then apply `key=value` overrides (values parsed as YAML).

    Dotted keys reach into dicts, e.g. `action_expert.hidden_size=256`.
    """
    data: dict = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ValueError(f"cannot read the training config {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of training config keys")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        target = data
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(value)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown training config keys {unknown}")
    return TrainConfig(**data)


# -- distributed -----------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in the run (torchrun's environment, or a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Whether this process logs and writes checkpoints."""
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


# -- data ------------------------------------------------------------------------------------


class StepBatchSampler:
    """Global batches as a function of the step over the mixture's stream of epochs.

    Step s takes stream positions [s G, (s + 1) G) (G = world x batch; the mixture maps a
    position to its epoch's own permutation); this process gets its contiguous slice of B =
    batch. Starting at a later step reproduces exactly what an uninterrupted run drew.
    """

    def __init__(self, batch: int, dist: Dist, start: int, stop: int):
        """Sample for steps `start` .. `stop - 1`."""
        self.batch, self.dist, self.start, self.stop = batch, dist, start, stop

    def indices(self, step: int) -> list[int]:
        """This process's stream positions at `step`."""
        first = (step * self.dist.world + self.dist.rank) * self.batch
        return list(range(first, first + self.batch))

    def __iter__(self):
        """One batch of positions per step."""
        for step in range(self.start, self.stop):
            yield self.indices(step)

    def __len__(self) -> int:
        """Number of steps."""
        return self.stop - self.start


class Collator:
    """Samples -> processed model inputs with normalized, padded states and actions.

    The states and actions go through the model's own `EmbodimentTransforms`, as at inference.
    """

    def __init__(self, model: TwinBrainVLA):
        """Use the model's processor, sizes and normalization statistics."""
        self.processor = model.processor
        self.transforms = {name: model.transforms(name) for name in model.config.embodiments}

    def __call__(self, samples: list[dict]) -> dict:
        """Collate a list of dataset samples."""
        inputs = self.processor([s["images"] for s in samples],
                                [s["instruction"] for s in samples])
        states, state_masks, actions, action_masks = [], [], [], []
        for s in samples:
            transforms = self.transforms[s["embodiment"]]
            state, state_mask = transforms.state(s["state"])
            states.append(state)
            state_masks.append(state_mask)
            actions.append(transforms.actions(s["actions"]))
            # Real action dims at the chunk's valid steps (the episode's end pads the rest).
            dims = np.arange(transforms.max_action_dim) < transforms.spec.action_dim
            action_masks.append(np.asarray(s["action_mask"], dtype=bool)[:, None] & dims)
        return {"inputs": inputs, "state": torch.from_numpy(np.stack(states)),
                "state_mask": torch.from_numpy(np.stack(state_masks)),
                "embodiments": [s["embodiment"] for s in samples],
                "actions": torch.from_numpy(np.stack(actions)),
                "action_mask": torch.from_numpy(np.stack(action_masks))}


def build_data(config: TrainConfig):
    """The datasets (validated before any step), their mixture and statistics."""
    from .data.lerobot import LeRobotDataset
    from .data.stats import DatasetMixture, compute_norm_stats

    if not config.datasets:
        raise ValueError("no datasets: set datasets=[{path: ..., embodiment: widowx}]")
    datasets = [LeRobotDataset(entry.path, horizon=config.horizon,
                               embodiment=Embodiment.resolve(entry.embodiment),
                               cache_images=config.cache_images)
                for entry in config.datasets]
    mixture = DatasetMixture(datasets, weights=[e.weight for e in config.datasets],
                             seed=config.seed)
    return datasets, mixture, compute_norm_stats(datasets)


# -- model and optimisation ------------------------------------------------------------------


def build_model(config: TrainConfig, datasets, norm_stats) -> TwinBrainVLA:
    """A fresh TwinBrainVLA on the backbone with one state encoder per embodiment."""
    embodiments = {}
    for dataset in datasets:
        emb = dataset.embodiment
        spec = emb.spec(num_cameras=len(dataset.image_keys))
        known = embodiments.get(emb.normalization_key)
        if known is not None and known.num_cameras != spec.num_cameras:
            spec.num_cameras = 0  # datasets of this robot differ: the count is not a contract
        embodiments[emb.normalization_key] = spec
    expert = ActionExpertConfig(**{"action_dim": config.max_action_dim,
                                   "horizon": config.horizon, **config.action_expert})
    model_config = TwinBrainConfig(
        backbone_path=config.backbone_path, brain_mode=config.brain_mode,
        embodiments=embodiments, max_state_dim=config.max_state_dim,
        image_size=tuple(config.image_size), freeze_right_vision=config.freeze_right_vision,
        action_expert=expert, left_visibility=config.left_visibility)
    model = TwinBrainVLA.from_backbone(model_config, dtype=torch.float32)
    model.norm_stats = dict(norm_stats)
    return model


def build_optimizer(model: TwinBrainVLA, config: TrainConfig, fused: bool = True):
    """AdamW with the Right Brain's and the expert's learning rates; cosine with warmup.

    `fused`: torch's fused AdamW kernel (CPU and CUDA). The Right Brain's 152k-token embedding
    matrix is most of a small model's weights, and the per-tensor loop spent 96 of a 226 ms
    demo step updating it (fused: 12 ms). Sharded (FSDP) runs use the default implementation.
    """
    right = [p for p in model.right.parameters() if p.requires_grad]
    expert = [p for p in list(model.action_expert.parameters())
              + list(model.state_encoders.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": right, "lr": config.lr_right}, {"params": expert, "lr": config.lr_expert}],
        betas=tuple(config.betas), weight_decay=config.weight_decay,
        **({"fused": True} if fused else {}))

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def flow_draws(config: TrainConfig, step: int, dist: Dist, model: TwinBrainVLA):
    """This process's slice of the global batch's noise and flow times at `step`.

    `flow_draws_per_sample` draws per sample, sample-major (as `compute_loss` repeats them).
    """
    expert = model.action_expert
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    per_rank = config.batch_size * config.flow_draws_per_sample
    total = per_rank * dist.world
    t = expert.sample_timesteps(total, device="cpu", generator=generator)
    shape = (total, config.horizon, config.max_action_dim)
    noise = torch.randn(shape, generator=generator)
    part = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    return noise[part].to(dist.device), t[part].to(dist.device)


class WeightAverage:
    """An exponential moving average of the trainable weights, in float32.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so that a short run's
    average is not dominated by its random start.
    """

    def __init__(self, model: TwinBrainVLA, decay: float):
        """Start from the model's current weights."""
        self.decay = float(decay)
        self.updates = 0
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the weights after an optimizer step."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, param in zip(self.shadow, self.params, strict=True):
            average.lerp_(param.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by tensor name (the names of the checkpoint)."""
        return dict(zip(self.names, self.shadow, strict=True))

    def load(self, averages: dict[str, torch.Tensor], updates: int) -> None:
        """Continue from a checkpoint's averages (names it lacks keep the current weights)."""
        for i, name in enumerate(self.names):
            if name in averages:
                self.shadow[i] = averages[name].to(self.shadow[i].device, torch.float32)
        self.updates = int(updates)


# -- checkpoints -----------------------------------------------------------------------------


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


# -- the loop --------------------------------------------------------------------------------


def train(config: TrainConfig) -> Path | None:
    """Run training; returns the last checkpoint directory (on the main process)."""
    if not config.backbone_path:
        raise ValueError("backbone_path is required: the directory of the base Qwen2.5-VL or "
                         "Qwen3-VL checkpoint both brains start from (a local Hugging Face "
                         "checkpoint, e.g. backbone_path=/models/Qwen3-VL-4B-Instruct; "
                         "`ros2 run twinbrain_ros make_tiny_checkpoint` writes a tiny one)")
    dist = init_distributed()
    torch.manual_seed(config.seed)
    datasets, mixture, norm_stats = build_data(config)
    model = build_model(config, datasets, norm_stats)
    if config.activation_checkpointing:
        model.enable_activation_checkpointing()
    if dist.main:
        for path in remove_stale_temporaries(config.output_dir):
            print(f"removed {path}, a checkpoint left half-written by an interrupted run",
                  flush=True)
    barrier(dist)
    resumed = None
    if config.resume:
        resumed = resume_checkpoint(model, config, dist)
        if resumed is None and dist.main:
            print(f"no usable checkpoint in {config.output_dir}/checkpoints: starting at step 0",
                  flush=True)
    model.to(dist.device)
    model.cast_left(left_dtype(config, dist))
    model.train()
    wrapped = wrap_model(model, config, dist)
    optimizer, scheduler = build_optimizer(
        model, config, fused=not (config.strategy == "fsdp" and dist.world > 1))
    ema = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    start, losses = 0, []
    if resumed is not None:
        check_resumable(config, resumed[1])
        start, losses = restore_optimizer(model, optimizer, scheduler, resumed[1])
        if ema is not None:
            ema.load(read_ema(resumed[0], model) or {}, resumed[1].get("ema_updates", 0))
        if dist.main:
            print(f"resuming from {resumed[0]} at step {start}", flush=True)
    sampler = StepBatchSampler(config.batch_size, dist, start, config.steps)
    loader = torch.utils.data.DataLoader(
        mixture, batch_sampler=sampler, num_workers=config.num_workers,
        collate_fn=Collator(model),
        persistent_workers=config.num_workers > 0,
        # Fresh worker processes: forking after torch's and libav's threads started can hang.
        multiprocessing_context="spawn" if config.num_workers > 0 else None)
    autocast = use_bf16(config, dist)
    logger = RunLogger(config, dist, start)
    last = None
    step = start
    for batch in loader:
        noise, t = flow_draws(config, step, dist, model)
        inputs = batch["inputs"].to(dist.device)
        with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = wrapped(inputs, batch["state"].to(dist.device),
                           batch["state_mask"].to(dist.device), batch["embodiments"],
                           batch["actions"].to(dist.device),
                           batch["action_mask"].to(dist.device), noise=noise, t=t,
                           draws=config.flow_draws_per_sample)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(model, config)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update()
        step += 1
        value = mean_over_ranks(loss.detach(), dist)
        losses.append(value)
        logger.log(step, value, scheduler.get_last_lr(), grad_norm)
        if step % config.save_every == 0 or step == config.steps:
            last = save_training_checkpoint(model, optimizer, scheduler, step, config, losses,
                                            dist, ema)
    logger.close()
    if dist.world > 1:
        barrier(dist)
        torch.distributed.destroy_process_group()
    return last


def wrap_model(model: TwinBrainVLA, config: TrainConfig, dist: Dist):
    """DDP (or FSDP2 on the Right Brain's layers) around the model when distributed."""
    if dist.world == 1:
        return model
    if config.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.right.vlm.language_model.layers:
            fully_shard(layer)
        ignored = set()
        if model.left is not None and next(model.left.parameters()).dtype != model.dtype:
            # One dtype per FSDP group: a bf16 Left Brain's decoder layers are sharded as units
            # of their own; its other weights (embedding, vision tower, norm) stay replicated.
            for layer in model.left.vlm.language_model.layers:
                fully_shard(layer)
            sharded = {id(p) for layer in model.left.vlm.language_model.layers
                       for p in layer.parameters()}
            ignored = {p for p in model.left.parameters() if id(p) not in sharded}
        fully_shard(model, ignored_params=ignored or None)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Several embodiments: a batch may not use every state encoder.
    unused = len(model.state_encoders) > 1
    # gradient_as_bucket_view: the gradients are views into DDP's communication buckets rather
    # than a second copy (4 bytes per trained weight: 17 GiB for a Qwen3-VL-4B Right Brain).
    return DistributedDataParallel(
        model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
        find_unused_parameters=unused, gradient_as_bucket_view=True)


def use_bf16(config: TrainConfig, dist: Dist) -> bool:
    """Whether to autocast to bf16."""
    if config.precision == "auto":
        return dist.device.type == "cuda"
    return config.precision == "bf16"


def left_dtype(config: TrainConfig, dist: Dist) -> torch.dtype:
    """The frozen Left Brain's weight dtype: bf16 when asked, or by default when autocasting."""
    if config.left_dtype == "auto":
        return torch.bfloat16 if use_bf16(config, dist) else torch.float32
    return torch.bfloat16 if config.left_dtype == "bf16" else torch.float32


def clip_gradients(model: TwinBrainVLA, config: TrainConfig) -> float:
    """Clip the global gradient norm; returns the norm before clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    return float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))


def mean_over_ranks(value: torch.Tensor, dist: Dist) -> float:
    """The loss averaged over processes (for logging)."""
    if dist.world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= dist.world
    return float(value)


def barrier(dist: Dist) -> None:
    """Wait for every process (after a checkpoint)."""
    if dist.world > 1:
        torch.distributed.barrier()


class RunLogger:
    """Progress bar (loss, learning rate, samples/s) and TensorBoard, on the main process."""

    def __init__(self, config: TrainConfig, dist: Dist, start: int):
        """Open the progress bar and the TensorBoard writer."""
        self.config, self.dist = config, dist
        self.bar = self.writer = None
        self.samples_per_step = config.batch_size * dist.world
        self.last_time = time.perf_counter()
        if not dist.main:
            return
        from .progress import progress_bar

        self.bar = progress_bar(config.steps, "train", unit="step", initial=start)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(config.output_dir) / "tensorboard"))
        except ImportError:
            print("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)",
                  flush=True)

    def log(self, step: int, loss: float, lrs: list[float], grad_norm: float) -> None:
        """Record one step."""
        if not self.dist.main:
            return
        now = time.perf_counter()
        rate = self.samples_per_step / max(now - self.last_time, 1e-9)
        self.last_time = now
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}", samples_s=f"{rate:.1f}",
                             refresh=False)
        if self.writer is not None and step % self.config.log_every == 0:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr_right", lrs[0], step)
            self.writer.add_scalar("train/lr_expert", lrs[1], step)
            self.writer.add_scalar("train/grad_norm", grad_norm, step)
            self.writer.add_scalar("train/samples_per_s", rate, step)

    def close(self) -> None:
        """Flush and close."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (`ros2 run twinbrain_ros train`, `python -m ...`, torchrun)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="training YAML (see config/train.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (YAML values)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        last = train(config)
    except ValueError as error:  # includes dataset and checkpoint errors, which name the cause
        print(f"train: {error}", file=sys.stderr, flush=True)
        return 1
    if last is not None:
        print(f"last checkpoint: {last}", flush=True)
        print(json.dumps({"checkpoint": str(last)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
