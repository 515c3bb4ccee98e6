"""The folder pipelines' samplers and loader: ``FolderLoader`` iterates ``Batch`` objects over a dataset whose items
are ``(image, label, index)`` (an ImageFolder, or CIFAR seen as PIL images), with per-position seeded
augmentation, optional timm Mixup/CutMix, and the global-batch sharding of ``repro.data.batch.GlobalBatches``.
The recipes that configure it live in ``repro.data.pipelines_folder``.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from repro.data.batch import Batch, GlobalBatches, epoch_generator
from repro.core.errors import ReproError


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(seed) * 1_000_003 + int(epoch)


class ShuffleSampler(Sampler[int]):
    """A fresh permutation of the whole split per (seed, epoch) (the global order; ranks take batch slices)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class _SeededRepeatAugSampler(RepeatAugSampler):
    """timm's RepeatAugSampler (DeiT's RASampler) on one replica, whose per-epoch shuffle also depends on the
    run's seed. One replica: it gives the epoch's global order, which ``GlobalBatches`` cuts across ranks, so the
    epoch holds what DeiT's W samplers hold together (about len/W each, the repeats of an image side by side)."""

    def __init__(self, dataset: Any, seed: int, num_repeats: int) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, num_repeats=num_repeats)
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(_epoch_seed(self.seed, epoch))


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with python/numpy/torch RNGs seeded by ``seed``; the caller's states are put back afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's stream stays the run's
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class SeededDataset(Dataset):
    """``dataset[index]`` transformed under the seed its epoch position was given (keys are ``(index, seed)``)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with _seeded(seed):
            return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


class _EpochBatches(Sampler[list[Any]]):
    """The DataLoader's batch sampler: this rank's batches of dataset keys, set by ``FolderLoader`` each epoch."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass(frozen=True)
class _Planned:
    """One of this rank's batches: its global number, its own images (the first ``own`` rows) and mix seed."""

    number: int
    own: int
    mix_seed: int


class FolderLoader(GlobalBatches):
    """Iterates ``Batch`` objects on ``device``; ``set_epoch(epoch)`` (1-based) reshuffles and stamps batches.

    ``batch_size`` is the GLOBAL batch (``GlobalBatches``): the sampler gives the epoch's global order, and each
    position gets a seed from ``epoch_generator(seed, epoch)``; the image at that position is transformed under
    its seed, so an augmented image is a function of (seed, epoch, position), never of the rank or the worker
    (workers persist across epochs with ``workers > 0``). Mixup/CutMix draws its parameters once per GLOBAL batch,
    under a seed of that batch; timm pairs position p of a batch with its mirror (the batch flipped), which lies on
    another rank, so a rank whose slice is not the whole batch also loads its slice's mirror images (the same
    images, augmented the same way, as on their own rank) and mixes its slice exactly as one process mixes the
    whole batch. That costs a sharded mixup run twice the image loading per rank, and nothing else.
    """

    def __init__(self, dataset: Any, batch_size: int, sampler: Sampler, workers: int, device: torch.device,
                 seed: int, train: bool, num_classes: int, mixup: Optional[dict[str, Any]] = None,
                 smoothing: float = 0.0, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ReproError(f"batch size must be positive, got {batch_size}")
        self.dataset, self.sampler, self.workers = dataset, sampler, int(workers)
        self.batch_size, self.drop_last = int(batch_size), bool(drop_last)
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.seed, self.train, self.num_classes, self.smoothing = int(seed), train, num_classes, smoothing
        self.epoch = 1
        self.mixup = Mixup(num_classes=num_classes, **mixup) if mixup else None
        self._build_loader()

    def _build_loader(self) -> None:
        self._batches = _EpochBatches()
        self._generator = torch.Generator()  # the workers' base seeds; the images do not depend on them
        self.loader = DataLoader(SeededDataset(self.dataset) if self.train else self.dataset,
                                 batch_sampler=self._batches, num_workers=self.workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
                                 generator=self._generator)
        self._generator.manual_seed(_epoch_seed(self.seed, self.epoch) + (0 if self.train else 7))

    def _resharded(self) -> None:
        if self.mixup is not None and self.world_size > 1 and self.mixup.mode != "batch":
            raise ReproError(f"mixup_mode {self.mixup.mode!r} draws per image of a rank's batch; only 'batch' "
                             f"(DeiT's) is split across processes exactly")
        self._build_loader()  # this rank's own DataLoader (and workers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._generator.manual_seed(_epoch_seed(self.seed, self.epoch) + (0 if self.train else 7))

    def epoch_size(self) -> int:
        return len(self.sampler)

    @property
    def num_samples(self) -> int:
        """Images in the underlying split (not per epoch: repeated augmentation and drop_last change that)."""
        return len(self.dataset)

    def _plan(self) -> list[_Planned]:
        """Set this epoch's batches of keys on the batch sampler; return what each batch holds."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)  # rank views share the sampler: each reads its own epoch's order
        order: list[Any] = list(iter(self.sampler))
        generator = epoch_generator(self.seed, self.epoch, "repro.folder")
        if self.train:
            seeds = torch.randint(0, 2**62, (len(order),), generator=generator).tolist()
            order = list(zip(order, seeds))
        mix_seeds = torch.randint(0, 2**62, (max(len(self), 1),), generator=generator).tolist()
        planned, batches = [], []
        for number, lo, hi in self.rank_slices():
            if hi == lo:
                continue  # a global batch smaller than the world (evaluation only; training refuses it)
            positions = list(range(lo, hi))
            first, last = self.global_bounds(number)
            if self.mixup is not None and (lo, hi) != (first, last):
                # timm mixes row i with row n-1-i: [slice, mirror reversed] flipped puts each mirror on its image.
                positions += [first + last - 1 - p for p in reversed(positions)]
            batches.append([order[p] for p in positions])
            planned.append(_Planned(number, hi - lo, mix_seeds[number]))
        self._batches.batches = batches
        return planned

    def _targets(self, images: Tensor, labels: Tensor, mix_seed: int) -> tuple[Tensor, Tensor]:
        if self.mixup is not None:
            with _seeded(mix_seed):  # timm draws from numpy's global RNG: the same draws on every rank
                return self.mixup(images, labels)
        if self.train and self.smoothing > 0:
            off = self.smoothing / self.num_classes
            soft = torch.full((labels.shape[0], self.num_classes), off, device=labels.device)
            return images, soft.scatter_(1, labels[:, None], 1.0 - self.smoothing + off)
        return images, labels

    def __iter__(self) -> Iterator[Batch]:
        non_blocking = self.device.type == "cuda"
        planned = self._plan()
        for plan, (images, labels, indices) in zip(planned, self.loader):
            images = images.to(self.device, non_blocking=non_blocking)
            labels = labels.to(self.device, non_blocking=non_blocking)
            hard = labels[:plan.own].clone()
            images, targets = self._targets(images, labels, plan.mix_seed)
            indices = indices[:plan.own]
            yield Batch(images=images[:plan.own], targets=targets[:plan.own], labels=hard,
                        indices=indices.to(self.device, non_blocking=non_blocking), epoch=self.epoch,
                        host_indices=indices)
