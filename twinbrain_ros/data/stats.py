"""Normalization statistics over LeRobot datasets, and a seeded weighted mixture of them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..transforms.normalization import EmbodimentNormStats, NormStats
from .lerobot import LeRobotDataset


def compute_norm_stats(datasets: Sequence[LeRobotDataset]) -> dict[str, EmbodimentNormStats]:
    """State and action statistics per normalization key, over every frame of the datasets.

    Datasets sharing an embodiment's `normalization_key` are pooled. The modes come from the
    embodiment (`state_normalization`, `action_normalization`) and its `binary_action_dims`
    (a Bridge gripper) are marked binary, so normalizing leaves them untouched.

    Raises:
        ValueError: no datasets, or datasets sharing a key disagree on dims, modes or
            binary dims.
    """
    if not datasets:
        raise ValueError("compute_norm_stats needs at least one dataset")
    groups: dict[str, list[LeRobotDataset]] = {}
    for dataset in datasets:
        groups.setdefault(dataset.embodiment.normalization_key, []).append(dataset)
    result = {}
    for key, members in groups.items():
        first = members[0].embodiment
        signature = _signature(first)
        for other in members[1:]:
            if _signature(other.embodiment) != signature:
                raise ValueError(f"normalization key {key!r}: embodiments {first.name!r} and "
                                 f"{other.embodiment.name!r} differ in dims or modes "
                                 f"({signature} vs {_signature(other.embodiment)})")
        states = np.concatenate([d.states() for d in members])
        actions = np.concatenate([d.actions() for d in members])
        result[key] = EmbodimentNormStats(
            state=NormStats.from_data(states, first.state_normalization),
            action=NormStats.from_data(actions, first.action_normalization,
                                       binary=first.binary_action_dims))
    return result


def _signature(embodiment) -> tuple:
    return (embodiment.state_dim, embodiment.action_dim, embodiment.state_normalization,
            embodiment.action_normalization, tuple(embodiment.binary_action_dims))


class DatasetMixture:
    """Map-style mixture of datasets: index -> (dataset, local index) by a seeded permutation.

    One epoch has as many samples as the datasets have frames together (N). Dataset j gets
    round(N w_j / sum w) of them (largest remainders): its frames in a seeded random order,
    repeated when it is up-weighted, cut when down-weighted. The (dataset, frame) pairs are then
    shuffled with the same seed, so a fixed seed (and epoch) gives a fixed data order: what
    exact resumption needs.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float] | None = None,
                 seed: int = 0):
        """Mix `datasets` (each with `__len__`/`__getitem__`) with sampling `weights`.

        Args:
            datasets: the datasets (non-empty each).
            weights: relative sampling weights, one per dataset (default: their sizes,
                i.e. every frame equally likely).
            seed: seed of the permutations.

        Raises:
            ValueError: no datasets, an empty dataset or invalid weights.
        """
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("DatasetMixture needs at least one dataset")
        self.sizes = np.array([len(d) for d in self.datasets], dtype=np.int64)
        if np.any(self.sizes == 0):
            empty = [i for i, n in enumerate(self.sizes) if n == 0]
            raise ValueError(f"datasets {empty} are empty")
        w = self.sizes.astype(np.float64) if weights is None else np.asarray(weights, float)
        if w.shape != (len(self.datasets),):
            raise ValueError(f"{len(w)} weights for {len(self.datasets)} datasets")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0: {w.tolist()}")
        self.weights = w / w.sum()
        self.seed = int(seed)
        total = int(self.sizes.sum())
        exact = total * self.weights
        quotas = np.floor(exact).astype(np.int64)
        remainder = total - int(quotas.sum())
        quotas[np.argsort(-(exact - quotas), kind="stable")[:remainder]] += 1
        self.quotas = quotas
        self.epoch = 0
        self._build()

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of another epoch (seeded by (seed, epoch))."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._build()

    def _build(self) -> None:
        rng = np.random.default_rng([self.seed, self.epoch])
        ids, local = [], []
        for j, (quota, size) in enumerate(zip(self.quotas, self.sizes, strict=True)):
            repeats = -(-int(quota) // int(size))
            order = [rng.permutation(int(size)) for _ in range(repeats)]
            local.append(np.concatenate(order)[:quota] if order else np.zeros(0, np.int64))
            ids.append(np.full(quota, j, dtype=np.int32))
        permutation = rng.permutation(int(self.quotas.sum()))
        self._dataset_ids = np.concatenate(ids)[permutation]
        self._local = np.concatenate(local).astype(np.int64)[permutation]

    def __len__(self) -> int:
        return len(self._local)

    def locate(self, i: int) -> tuple[int, int]:
        """(dataset position, index in that dataset) of mixture index `i`.

        Indices past one epoch continue into the next ones (`i = epoch * len + offset`), each
        with its own permutation, so a sampler can stream positions for as many epochs as
        training needs and every DataLoader worker finds the epoch from the index itself.
        """
        n = len(self._local)
        if i < -n:
            raise IndexError(f"index {i} out of range for a mixture of {n} samples")
        if i >= n:
            epoch, i = divmod(int(i), n)
            self.set_epoch(epoch)
        elif i >= 0 and self.epoch != 0:
            self.set_epoch(0)
        return int(self._dataset_ids[i]), int(self._local[i])

    def __getitem__(self, i: int):
        dataset, local = self.locate(i)
        return self.datasets[dataset][local]
