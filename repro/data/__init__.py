"""Datasets as whole tensors, read from their real on-disk layouts.

A reader is registered in ``DATASETS`` (``@DATASETS.register("cifar100")``) as
``fn(root: Path, split: str, download: bool) -> ImageTensorDataset``. The registry imports every module of this
package before its first lookup (``repro.core.registry``), so a new dataset is one new file here: no list to edit.

The ``fingerprint`` of a dataset is a sha256 over its source files; it keys every cache derived from the data
(the teacher-output cache), so replacing a file can never serve stale results.
"""
from __future__ import annotations

import hashlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from repro.core.io import sha256_file
from repro.core.errors import ReproError
from repro.core.registry import Registry


@dataclass
class ImageTensorDataset:
    """A whole split in memory: ``images`` uint8 [N, 3, H, W], ``labels`` int64 [N]."""

    images: Tensor
    labels: Tensor
    num_classes: int
    name: str
    fingerprint: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def first(self, count: Optional[int]) -> "ImageTensorDataset":
        """The first ``count`` images (all of them when ``count`` is None or covers the split): a spec's subset."""
        if count is None or count >= len(self):
            return self
        return dataclasses.replace(self, images=self.images[:count], labels=self.labels[:count],
                                   fingerprint=f"{self.fingerprint}[:{count}]")

    def downsampled(self, size: Optional[int]) -> "ImageTensorDataset":
        """Every image averaged down to ``size`` x ``size`` by whole blocks of pixels (2x2 for 32 -> 16), rounded
        back to uint8; ``None`` or the current size returns the split as it is. Only whole-block factors are
        taken, so no pixel is interpolated."""
        height, width = (int(v) for v in self.images.shape[-2:])
        if size is None or (size == height and size == width):
            return self
        if size < 1 or height % size or width % size:
            raise ReproError(f"{self.name}: cannot downsample {height}x{width} images to {size}x{size}; "
                             f"the size must divide {height} and {width}")
        blocks = torch.nn.functional.avg_pool2d(self.images.float(), (height // size, width // size))
        images = blocks.round().clamp_(0, 255).to(torch.uint8)
        return dataclasses.replace(self, images=images, fingerprint=f"{self.fingerprint}@{size}px")


DatasetReader = Callable[[Path, str, bool], ImageTensorDataset]
DATASETS: Registry[DatasetReader] = Registry("dataset", package=__name__)


def load_dataset(name: str, root: str | Path, split: str, download: bool = True) -> ImageTensorDataset:
    """Read split ``split`` of the registered dataset ``name`` from ``root`` (downloading it if allowed)."""
    if split not in ("train", "test"):
        raise ReproError(f"unknown split {split!r} for dataset {name!r}; expected 'train' or 'test'")
    return DATASETS.get(name)(Path(root), split, download)


def dataset_names() -> list[str]:
    return DATASETS.names()


def combine_fingerprint(salt: str, named_sha256: Iterable[tuple[str, str]]) -> str:
    """The dataset fingerprint: sha256 over ``salt`` and each (file name, file sha256) in order."""
    digest = hashlib.sha256(salt.encode() + b"\0")
    for name, sha in named_sha256:
        digest.update(f"{name}\0{sha}\0".encode())
    return digest.hexdigest()


def fingerprint_files(paths: Iterable[Path], salt: str = "") -> str:
    """sha256 fingerprint over the given source files (``salt`` tells apart e.g. the splits of one folder)."""
    return combine_fingerprint(salt, [(path.name, sha256_file(path)) for path in paths])


__all__ = ["DATASETS", "DatasetReader", "ImageTensorDataset", "dataset_names", "fingerprint_files",
           "combine_fingerprint", "load_dataset"]
