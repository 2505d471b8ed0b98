"""Where this process stands in a run, and the engines that spread the run over processes.

torchrun's process group, DDP and FSDP2: nothing home-made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..model.twinbrain import TwinBrainVLA
from .config import TrainConfig


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
