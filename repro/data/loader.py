"""A device-resident CIFAR loader with batched augmentation (airbench's trick 1, with the papers' recipe).

The whole split stays on the device as one uint8 tensor; no DataLoader workers. Training batches get exactly
torchvision's ``RandomCrop(32, padding=4)`` (zero padding) + ``RandomHorizontalFlip()``: per image one of
(2*4+1)^2 = 81 offsets and one of 2 flips, uniformly, applied to the whole batch with one pad and one gather.
A view is the triple (dy, dx, flip): dy, dx index the crop's top-left corner in the padded image (0..8).

An epoch's order and views are drawn on the CPU from a ``torch.Generator`` seeded by (seed, epoch), so they are
a pure function of (seed, epoch): the same on CPU and CUDA, and re-derived exactly on resume.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from repro.data import ImageTensorDataset
from repro.data.batch import Batch, GlobalBatches, check_rank, epoch_generator
from repro.core.errors import ReproError

PADDING = 4  # RandomCrop(32, padding=4)
NUM_FLIPS = 2


def num_offsets(padding: int = PADDING) -> int:
    """Crop positions per axis: 2*padding + 1 (9 for CIFAR)."""
    return 2 * padding + 1


def num_views(padding: int = PADDING) -> int:
    """Distinct augmented views of one image: 81 offsets x 2 flips = 162 for CIFAR."""
    return num_offsets(padding) ** 2 * NUM_FLIPS


def identity_views(count: int, padding: int = PADDING, device: torch.device | str | None = None) -> Tensor:
    """The view that reproduces the unaugmented image: centre crop, no flip."""
    return torch.tensor([padding, padding, 0], dtype=torch.int64, device=device).expand(count, 3).clone()


def view_ids(views: Tensor, padding: int = PADDING) -> Tensor:
    """(dy, dx, flip) -> a single id in 0..num_views-1 (dy-major, flip fastest)."""
    views = views.long()
    return (views[:, 0] * num_offsets(padding) + views[:, 1]) * NUM_FLIPS + views[:, 2]


def views_from_ids(ids: Tensor, padding: int = PADDING) -> Tensor:
    """The inverse of ``view_ids``."""
    ids = ids.long()
    offset, flip = ids // NUM_FLIPS, ids % NUM_FLIPS
    return torch.stack([offset // num_offsets(padding), offset % num_offsets(padding), flip], dim=1)


def sample_views(count: int, generator: torch.Generator, padding: int = PADDING) -> Tensor:
    """``count`` views drawn uniformly from the 81 x 2 (dy, dx, flip) grid, int64 [count, 3] on the CPU."""
    offsets = torch.randint(0, num_offsets(padding), (count, 2), generator=generator)
    flips = torch.randint(0, NUM_FLIPS, (count, 1), generator=generator)
    return torch.cat([offsets, flips], dim=1)


def apply_views(images: Tensor, views: Tensor, padding: int = PADDING) -> Tensor:
    """Zero-pad by ``padding``, crop at (dy, dx) back to the input size, then mirror where flip is 1.

    ``images`` [B, C, H, W] (any dtype, uint8 in practice), ``views`` [B, 3]; returns the same shape and dtype.
    Equal to torchvision's pad + crop + hflip per image, done for the whole batch with one pad and two gathers
    (rows, then columns; several times faster than one 4-D advanced index on CPU).
    """
    batch, channels, height, width = images.shape
    views = views.to(device=images.device, dtype=torch.int64)
    dy, dx, flip = views[:, 0], views[:, 1], views[:, 2]
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(height, device=images.device)  # [B, H]
    cols = torch.arange(width, device=images.device)
    # A flipped crop reads its column j from padded column dx + (W - 1 - j).
    cols = torch.where(flip[:, None].bool(), width - 1 - cols, cols) + dx[:, None]  # [B, W]
    rows = rows.view(batch, 1, height, 1).expand(batch, channels, height, padded.shape[3])
    cols = cols.view(batch, 1, 1, width).expand(batch, channels, height, width)
    return padded.gather(2, rows).gather(3, cols)


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 -> float32 exactly as ToTensor (x / 255) followed by Normalize ((x - mean) / std)."""
    return images.float().div_(255).sub_(mean).div_(std)


def channel_stats(values: Sequence[float], channels: int, what: str, device: torch.device) -> Tensor:
    if len(values) != channels:
        raise ReproError(f"normalisation {what} has {len(values)} values for {channels}-channel images")
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device).view(1, channels, 1, 1)


class TensorLoader(GlobalBatches):
    """Iterates ``Batch`` objects over a whole-tensor dataset kept on ``device``.

    ``train=True`` shuffles every epoch (and augments if ``augment``); ``train=False`` keeps dataset order and
    never augments. Call ``set_epoch(epoch)`` (1-based) before iterating an epoch.

    ``batch_size`` is the GLOBAL batch. With ``world_size > 1`` (``GlobalBatches.shard``) this loader yields only
    rank ``rank``'s contiguous slice of each global batch; the slices of all ranks put together are exactly the
    single-process batch (same images, same views, same order), so every image is seen once per epoch.
    """

    def __init__(self, dataset: ImageTensorDataset, batch_size: int, mean: Sequence[float], std: Sequence[float], *,
                 train: bool, augment: bool, seed: int, device: torch.device | str, drop_last: bool = False,
                 channels_last: bool = False, padding: int = PADDING, rank: int = 0, world_size: int = 1) -> None:
        if augment and not train:
            raise ReproError("augmentation is for training loaders only; evaluation sees the images as they are")
        if batch_size < 1:
            raise ReproError(f"batch size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        channels = self.images.shape[1]
        self.mean = channel_stats(mean, channels, "mean", self.device)
        self.std = channel_stats(std, channels, "std", self.device)
        self.batch_size = int(batch_size)
        self.train, self.augment, self.seed = train, augment, int(seed)
        self.drop_last, self.channels_last, self.padding = drop_last, channels_last, padding
        self.epoch = 1
        check_rank(rank, world_size)
        self.rank, self.world_size = int(rank), int(world_size)

    def epoch_size(self) -> int:
        return int(self.images.shape[0])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_plan(self) -> tuple[Tensor, Optional[Tensor]]:
        """This epoch's dataset order [N] and views [N, 3] (or None), on the CPU; a function of (seed, epoch)."""
        count = self.images.shape[0]
        if not self.train:
            return torch.arange(count), None
        generator = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(count, generator=generator)
        views = sample_views(count, generator, self.padding) if self.augment else None
        return order, views

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """This epoch's batches from batch number ``start`` on (0-based; resuming mid-epoch skips the rest)."""
        host_order, host_views = self.epoch_plan()
        order = host_order.to(self.device)
        views = host_views.to(self.device) if host_views is not None else None
        for _, lo, hi in self.rank_slices(start):
            batch = self._make_batch(order[lo:hi], views[lo:hi] if views is not None else None)
            batch.host_indices = host_order[lo:hi]
            batch.host_views = host_views[lo:hi] if host_views is not None else None
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def _make_batch(self, indices: Tensor, views: Optional[Tensor]) -> Batch:
        images = self.images[indices]
        if views is not None:
            images = apply_views(images, views, self.padding)
        images = normalize(images, self.mean, self.std)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = self.labels[indices]
        return Batch(images=images, targets=labels, labels=labels, indices=indices, epoch=self.epoch, views=views)
