"""Reproducible data order and augmentation, so that a resumed run sees exactly the same batches.

Every random augmentation of sample ``i`` in epoch ``e`` is seeded from ``(seed, e, i)`` and the
sample order of epoch ``e`` from ``(seed, e)``; neither depends on worker processes or on how many
batches came before. A run resumed mid-epoch skips the batches it has already trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.data.utils import set_rnd
from torch.utils.data import Dataset, Sampler

__all__ = ["ReproducibleDataHandler", "ResumableSampler", "SeededDataset", "sample_seed"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample of one epoch (a fixed mixing function, stable across runs)."""
    x = (seed * 1_000_003 + epoch) * 1_000_033 + index
    x = (x ^ (x >> 31)) * 0x9E3779B97F4A7C15 % 2**64
    return int(x % 2**32)


class SeededDataset(Dataset):
    """Wraps a dataset whose transforms are random; seeds them per (epoch, sample) before each item.

    Args:
        dataset: a MONAI dataset (its Randomizable transforms are reseeded through ``set_rnd``).
        seed: base seed of the run.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        set_rnd(self.dataset, sample_seed(self.seed, self.epoch, int(index)))
        return self.dataset[index]


class ResumableSampler(Sampler[int]):
    """Shuffled (or ordered) sampler, shardable across DDP ranks, that can start mid-epoch.

    Args:
        dataset_size: number of samples.
        shuffle: permute the samples each epoch (from ``(seed, epoch)``).
        seed: base seed of the run.
        num_replicas: DDP world size (default: from ``torch.distributed`` when initialised, else 1).
        rank: this process's rank (default: from ``torch.distributed``, else 0).
    """

    def __init__(
        self,
        dataset_size: int | Sequence,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if not isinstance(dataset_size, int):
            dataset_size = len(dataset_size)
        if dataset_size < 1:
            raise ValueError("the dataset is empty.")
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas or (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.dataset_size = dataset_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.start = 0
        self.num_samples = math.ceil(dataset_size / self.num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and the position (in samples of this rank) to start from."""
        self.epoch = int(epoch)
        self.start = int(start)

    def __len__(self) -> int:
        return self.num_samples - self.start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.dataset_size, generator=g).tolist()
        else:
            order = list(range(self.dataset_size))
        total = self.num_samples * self.num_replicas
        order = (order * math.ceil(total / len(order)))[:total]  # pad like DistributedSampler
        return iter(order[self.rank : total : self.num_replicas][self.start :])


class ReproducibleDataHandler:
    """Sets the epoch (and, after a mid-epoch resume, the start position) of the sampler and dataset.

    Attach it to the trainer; it runs at every ``EPOCH_STARTED``, before the epoch's data iterator
    is created.

    Args:
        sampler: the trainer's :class:`ResumableSampler`.
        dataset: the trainer's :class:`SeededDataset` (optional).
        batch_size: the DataLoader's batch size, to turn done iterations into samples to skip.
    """

    def __init__(
        self, sampler: ResumableSampler, dataset: SeededDataset | None = None, batch_size: int = 1
    ) -> None:
        self.sampler = sampler
        self.dataset = dataset
        self.batch_size = batch_size

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch - 1
        done = engine.state.iteration % engine.state.epoch_length if engine.state.epoch_length else 0
        self.sampler.set_epoch(epoch, start=done * self.batch_size)
        if self.dataset is not None:
            self.dataset.set_epoch(epoch)
