"""What every data pipeline hands the trainer, and the one rule for splitting a global batch across processes.

``Batch`` is one batch on the device; ``DataBundle`` is what a pipeline returns. ``GlobalBatches`` is the shared
mechanism every training loader uses to stay invariant to the process count: an epoch is a sequence of positions
whose order and per-position randomness are a function of (seed, epoch) only (``epoch_generator``), cut into
global batches of ``batch_size`` positions; rank r of W takes the r-th contiguous share of each global batch
(``rank_bounds``). The shares of all ranks put together are exactly the single-process batch.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Protocol

import torch
from torch import Tensor

from repro.core.errors import ReproError


@dataclass
class Batch:
    """One training batch, already augmented, normalised and on the device."""

    images: Tensor
    targets: Tensor  # int64 labels [B], or soft targets [B, K] under mixup/cutmix
    labels: Tensor  # always the hard int64 labels [B]
    indices: Tensor  # dataset indices [B] (CRD's memory bank, the teacher-output cache)
    epoch: int  # 1-based
    views: Optional[Tensor] = None  # [B, 3] (dy, dx, flip) of the discrete CIFAR augmentation, else None
    # CPU copies of indices / views where the loader has them: host-side lookups (the teacher-output cache) then
    # need no device-to-host read.
    host_indices: Optional[Tensor] = None
    host_views: Optional[Tensor] = None


class EpochLoader(Protocol):
    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterable[Batch]: ...
    def __len__(self) -> int: ...


@dataclass
class DataBundle:
    train: EpochLoader
    test: EpochLoader
    train_labels: Tensor
    num_classes: int
    fingerprint: str  # hash of the source files: keys caches, recorded in results
    image_size: int
    train_size: int
    test_size: int
    dataset: Any = None  # the in-memory training set when there is one (teacher-output cache fill)
    views: bool = False  # whether batches carry discrete augmentation views (teacher-output cache lookups)


def epoch_generator(seed: int, epoch: int, stream: str = "repro.data.loader") -> torch.Generator:
    """A CPU generator whose state depends only on (stream, seed, epoch); hashing keeps nearby seeds' streams
    apart. Never on the rank: that is what makes an epoch the same on any number of processes."""
    digest = hashlib.sha256(f"{stream}:{int(seed)}:{int(epoch)}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def rank_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of ``count`` items; shares differ by at most one item."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ReproError(f"rank {rank} is outside a world of {world_size} processes")


class GlobalBatches:
    """Mixin: ``batch_size`` is the GLOBAL batch over an epoch of ``epoch_size()`` positions; this loader (rank
    ``rank`` of ``world_size``) yields its contiguous share of each. Subclasses set ``batch_size``, ``drop_last``,
    ``rank`` and ``world_size``, implement ``epoch_size`` and may extend ``_resharded`` (called on a new view)."""

    batch_size: int
    drop_last: bool
    rank: int = 0
    world_size: int = 1

    def epoch_size(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def shard(self, rank: int, world_size: int) -> Any:
        """The same loader seen from rank ``rank`` of ``world_size`` (shares the data, not the iteration state)."""
        check_rank(rank, world_size)
        view = copy.copy(self)
        view.rank, view.world_size = int(rank), int(world_size)
        view._resharded()
        return view

    def _resharded(self) -> None:
        """Hook for views that hold per-rank state (a DataLoader over this rank's batches)."""

    def global_batch_size(self, number: int) -> int:
        """Positions in global batch ``number`` (0-based) over all ranks: the loss scale of a rank's slice."""
        return min(self.batch_size, self.epoch_size() - number * self.batch_size)

    def __len__(self) -> int:
        count = self.epoch_size()
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def global_bounds(self, number: int) -> tuple[int, int]:
        """Global batch ``number``'s positions [lo, hi) in the epoch."""
        return number * self.batch_size, number * self.batch_size + self.global_batch_size(number)

    def rank_slices(self, start: int = 0) -> Iterator[tuple[int, int, int]]:
        """``(number, lo, hi)``: this rank's epoch positions [lo, hi) of each global batch from ``start`` on."""
        for number in range(start, len(self)):
            first, _ = self.global_bounds(number)
            lo, hi = rank_bounds(self.global_batch_size(number), self.rank, self.world_size)
            yield number, first + lo, first + hi
