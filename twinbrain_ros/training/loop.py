"""The training run: model, optimiser and the loop over steps.

Train TwinBrainVLA's Right Brain, state encoders and action expert on LeRobot datasets.

The Left Brain stays frozen and is never saved again (checkpoints point at the backbone). The
only loss is flow matching. Data order and flow-matching noise are functions of (seed, step):
a run resumed with `resume=true` from its newest complete checkpoint continues exactly as the
uninterrupted run would, and N processes with per-process batch B see the same samples and
noise as one process with batch N x B.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..model.action_expert import ActionExpertConfig
from ..model.checkpoint import read_ema
from ..model.twinbrain import TwinBrainConfig, TwinBrainVLA
from .checkpoints import (
    check_resumable,
    remove_stale_temporaries,
    restore_optimizer,
    resume_checkpoint,
    save_training_checkpoint,
)
from .config import TrainConfig
from .data import Collator, StepBatchSampler, build_data
from .distributed import (
    Dist,
    barrier,
    init_distributed,
    left_dtype,
    mean_over_ranks,
    use_bf16,
    wrap_model,
)


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


def clip_gradients(model: TwinBrainVLA, config: TrainConfig) -> float:
    """Clip the global gradient norm; returns the norm before clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    return float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))


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
        from ..progress import progress_bar

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
