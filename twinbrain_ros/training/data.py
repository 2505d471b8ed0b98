"""The training data: datasets and their mixture, batches as a function of the step, collation."""

from __future__ import annotations

import numpy as np
import torch

from ..model.twinbrain import TwinBrainVLA
from ..robot.embodiment import Embodiment
from .config import TrainConfig
from .distributed import Dist


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
    from ..data.lerobot import LeRobotDataset
    from ..data.stats import DatasetMixture, compute_norm_stats

    if not config.datasets:
        raise ValueError("no datasets: set datasets=[{path: ..., embodiment: widowx}]")
    datasets = [LeRobotDataset(entry.path, horizon=config.horizon,
                               embodiment=Embodiment.resolve(entry.embodiment),
                               cache_images=config.cache_images)
                for entry in config.datasets]
    mixture = DatasetMixture(datasets, weights=[e.weight for e in config.datasets],
                             seed=config.seed)
    return datasets, mixture, compute_norm_stats(datasets)
