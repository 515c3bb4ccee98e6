"""Data pipelines over an ImageNet-style folder that yield ``repro.methods.base.Batch`` objects.

Two recipes, registered in ``FOLDER_RECIPES``:

* ``imagenet_standard`` (torchdistill's / torchvision's ImageNet recipe): RandomResizedCrop + horizontal flip
  for training; resize to ``size / 0.875`` (256 for 224) + center crop for evaluation; ImageNet mean/std.
* ``deit`` (facebookresearch/deit ``datasets.build_transform`` + ``main.py`` defaults, ssta.md 3.1): timm
  ``create_transform`` with RandAugment ``rand-m9-mstd0.5-inc1``, color jitter 0.3, bicubic, random erasing 0.25
  (pixel mode); timm ``Mixup`` (mixup 0.8, cutmix 1.0, prob 1, switch 0.5, per batch, label smoothing 0.1) whose
  soft targets go to ``Batch.targets`` (hard labels stay in ``Batch.labels``); repeated augmentation with 3
  repeats through timm's ``RepeatAugSampler`` (DeiT's RASampler). DeiT samples with RASampler only when
  distributed (``main.py``: ``if args.distributed: ... if args.repeated_aug``; one GPU uses a plain random
  sampler); we use it on any process count, which matches DeiT's multi-GPU runs (its README trains on 4+ GPUs):
  each epoch then holds about a third of the distinct images, three augmented copies each; eval = resize ``size / 0.875``
  bicubic + center crop. At 32 pixels and below DeiT swaps the crop for ``RandomCrop(size, padding=4)`` and evaluates
  without resizing; we do the same (after resizing the shorter side to ``size``, the identity on 32-px
  images), so the smoke tier runs DeiT's recipe at 32 px.

With mixup and cutmix off, a positive ``smoothing`` is applied here as smoothed one-hot soft targets
(identical to DeiT's ``LabelSmoothingCrossEntropy``), so the ``ce`` term needs no smoothing of its own.

Randomness: the sampler order depends on (seed, epoch) only, and so does every training image's augmentation:
the sampler hands each position of the epoch its own seed (drawn from (seed, epoch, rank)), and the image is
transformed under that seed (python, numpy and torch RNGs; the main process's own RNG states are restored
after each image). An epoch's batches are therefore the same with any number of workers, with workers that
persist across epochs (``persistent_workers``: no re-fork per epoch) or fresh ones, and after a resume at that
epoch. Mixup/CutMix (timm) draws from numpy's global RNG in the main process (seeded by the runner, saved in
checkpoints).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

import torch
import torch.distributed as dist
from timm.data import Mixup, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from repro.errors import ReproError
from repro.data.imagefolder import IndexedImageFolder, load_imagefolder_splits
from repro.methods.base import Batch
from repro.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class FolderRecipe:
    """What a pipeline name resolves to: transforms, the optional batch mixer and the sampler policy."""

    train_transform: Callable
    eval_transform: Callable
    mixup: Optional[dict[str, Any]]  # timm Mixup kwargs (without num_classes), or None
    smoothing: float
    repeated_aug: int  # number of repeats, 0 or 1 = off
    options: dict[str, Any]  # the resolved options (defaults + overrides), for the fingerprint
    drop_last: bool = True  # drop the epoch's last, partial training batch


RecipeBuilder = Callable[..., FolderRecipe]
FOLDER_RECIPES: Registry[RecipeBuilder] = Registry("image-folder pipeline")


def _checked_options(name: str, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ReproError(f"pipeline {name!r} got unknown options {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def _eval_transform(image_size: int, crop_ratio: float, interpolation: InterpolationMode) -> Callable:
    return T.Compose([
        T.Resize(int(math.floor(image_size / crop_ratio)), interpolation=interpolation),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# drop_last False: torchdistill's ImageNet configs (train_data_loader drop_last: False): the last, partial batch trains.
_STANDARD_DEFAULTS = {"eval_crop_ratio": 0.875, "scale": (0.08, 1.0), "smoothing": 0.0, "drop_last": False}


@FOLDER_RECIPES.register("imagenet_standard")
def imagenet_standard(image_size: int, **options: Any) -> FolderRecipe:
    opts = _checked_options("imagenet_standard", _STANDARD_DEFAULTS, options)
    train = T.Compose([
        T.RandomResizedCrop(image_size, scale=tuple(opts["scale"])),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    evaluation = _eval_transform(image_size, opts["eval_crop_ratio"], InterpolationMode.BILINEAR)
    return FolderRecipe(train, evaluation, mixup=None, smoothing=float(opts["smoothing"]), repeated_aug=0,
                        options=opts, drop_last=bool(opts["drop_last"]))


_DEIT_DEFAULTS = {
    "color_jitter": 0.3, "auto_augment": "rand-m9-mstd0.5-inc1", "interpolation": "bicubic",
    "re_prob": 0.25, "re_mode": "pixel", "re_count": 1,
    "mixup": 0.8, "cutmix": 1.0, "cutmix_minmax": None, "mixup_prob": 1.0, "mixup_switch_prob": 0.5,
    "mixup_mode": "batch", "smoothing": 0.1, "repeated_aug": 3, "eval_crop_ratio": 0.875,
    "drop_last": True,  # deit main.py: data_loader_train drop_last=True
}


def _posterize_keeping_zero_bits(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, but 0 bits gives a black image as Pillow < 13 did (Pillow 13 raises for bits < 1,
    and RandAugment's PosterizeIncreasing reaches 0 bits at magnitude 10, i.e. within DeiT's m9 / mstd 0.5)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize() -> None:
    import timm.data.auto_augment as auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize_keeping_zero_bits


@FOLDER_RECIPES.register("deit")
def deit(image_size: int, **options: Any) -> FolderRecipe:
    _patch_posterize()
    opts = _checked_options("deit", _DEIT_DEFAULTS, options)
    train = create_transform(
        input_size=image_size, is_training=True, color_jitter=opts["color_jitter"],
        auto_augment=opts["auto_augment"], interpolation=opts["interpolation"],
        re_prob=opts["re_prob"], re_mode=opts["re_mode"], re_count=opts["re_count"],
        mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if image_size <= 32:
        # DeiT's build_transform for CIFAR-sized inputs: pad-and-crop instead of RandomResizedCrop, and no eval
        # resize. The leading Resize is ours: it is the identity on images of the target size and keeps larger
        # folder images (synthetic or real) whole instead of cropping a tiny corner.
        train.transforms[0] = T.Compose([T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
                                         T.RandomCrop(image_size, padding=4)])
        evaluation = T.Compose([T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
                                T.CenterCrop(image_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    else:
        evaluation = _eval_transform(image_size, opts["eval_crop_ratio"], InterpolationMode.BICUBIC)
    mixing = opts["mixup"] > 0 or opts["cutmix"] > 0 or opts["cutmix_minmax"] is not None
    mixup = dict(mixup_alpha=opts["mixup"], cutmix_alpha=opts["cutmix"], cutmix_minmax=opts["cutmix_minmax"],
                 prob=opts["mixup_prob"], switch_prob=opts["mixup_switch_prob"], mode=opts["mixup_mode"],
                 label_smoothing=opts["smoothing"]) if mixing else None
    return FolderRecipe(train, evaluation, mixup, float(opts["smoothing"]), int(opts["repeated_aug"]), opts,
                        drop_last=bool(opts["drop_last"]))


# Each recipe's options (what ``pipeline_args`` may override), for the load-time check of spec names.
FOLDER_RECIPE_OPTIONS: dict[str, dict[str, Any]] = {"imagenet_standard": _STANDARD_DEFAULTS, "deit": _DEIT_DEFAULTS}


# ----------------------------------------------------------------------------------------------------------
# samplers and loaders

def _replicas() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(seed) * 1_000_003 + int(epoch)


class ShuffleSampler(Sampler[int]):
    """A fresh permutation per (seed, epoch), split across distributed ranks (padded to equal length)."""

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.size, self.seed, self.num_replicas, self.rank = size, seed, num_replicas, rank
        self.num_samples = math.ceil(size / num_replicas)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[: self.num_samples * self.num_replicas - self.size]
        return iter(order[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class _SeededRepeatAugSampler(RepeatAugSampler):
    """timm's RepeatAugSampler (DeiT's RASampler), whose per-epoch shuffle also depends on the run's seed."""

    def __init__(self, dataset: Any, seed: int, num_repeats: int, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, num_repeats=num_repeats)
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(_epoch_seed(self.seed, epoch))


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, seed)``: the wrapped sampler's order, and one seed per position of the epoch drawn from
    (run seed, epoch, rank), so that each image's augmentation is a pure function of the epoch, whichever worker
    (fresh or persistent) transforms it."""

    def __init__(self, sampler: Sampler[int], seed: int, rank: int = 0) -> None:
        self.sampler, self.seed, self.rank = sampler, int(seed), int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(iter(self.sampler))
        digest = hashlib.sha256(f"repro.folder:{self.seed}:{self.epoch}:{self.rank}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        seeds = torch.randint(0, 2**62, (len(order),), generator=generator).tolist()
        return iter(zip(order, seeds))

    def __len__(self) -> int:
        return len(self.sampler)


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
    """``dataset[index]`` transformed under the seed a ``SeededSampler`` paired with it."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with _seeded(seed):
            return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


class FolderLoader:
    """Iterates ``Batch`` objects on ``device``; ``set_epoch(epoch)`` (1-based) reshuffles and stamps batches.

    Training loaders transform each image under its own seed (``SeededSampler``), so their workers can persist
    across epochs; with ``workers > 0`` they do (no re-fork, no re-import of the dataset each epoch).
    """

    def __init__(self, dataset: IndexedImageFolder, batch_size: int, sampler: Sampler, workers: int,
                 device: torch.device, seed: int, train: bool, num_classes: int,
                 mixup: Optional[dict[str, Any]] = None, smoothing: float = 0.0, drop_last: bool = False) -> None:
        self.dataset = dataset
        loaded: Any = dataset
        if train:
            sampler = SeededSampler(sampler, seed, rank=getattr(sampler, "rank", 0))
            loaded = SeededDataset(dataset)
        self.sampler = sampler
        self.device = torch.device(device)
        self.seed = seed
        self.train = train
        self.num_classes = num_classes
        self.smoothing = smoothing
        self.epoch = 1
        self.mixup = Mixup(num_classes=num_classes, **mixup) if mixup else None
        self._generator = torch.Generator()
        self.loader = DataLoader(loaded, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                 pin_memory=self.device.type == "cuda", drop_last=drop_last,
                                 persistent_workers=workers > 0, generator=self._generator)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        self._generator.manual_seed(_epoch_seed(self.seed, self.epoch) + (0 if self.train else 7))

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        """Images in the underlying split (not per epoch: repeated augmentation and drop_last change that)."""
        return len(self.dataset)

    def _targets(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.mixup is not None:
            return self.mixup(images, labels)
        if self.train and self.smoothing > 0:
            off = self.smoothing / self.num_classes
            soft = torch.full((labels.shape[0], self.num_classes), off, device=labels.device)
            return images, soft.scatter_(1, labels[:, None], 1.0 - self.smoothing + off)
        return images, labels

    def __iter__(self) -> Iterator[Batch]:
        non_blocking = self.device.type == "cuda"
        for images, labels, indices in self.loader:
            images = images.to(self.device, non_blocking=non_blocking)
            labels = labels.to(self.device, non_blocking=non_blocking)
            hard = labels.clone()
            images, targets = self._targets(images, labels)
            yield Batch(images=images, targets=targets, labels=hard,
                        indices=indices.to(self.device, non_blocking=non_blocking), epoch=self.epoch,
                        host_indices=indices)


# ----------------------------------------------------------------------------------------------------------
# the builder

def folder_fingerprint(name: str, image_size: int, options: dict[str, Any], root: Path,
                       datasets: tuple[IndexedImageFolder, ...]) -> str:
    """sha256 of the pipeline recipe and both split listings (paths relative to the root, and labels)."""
    digest = hashlib.sha256(json.dumps({"pipeline": name, "image_size": image_size, "options": options},
                                       sort_keys=True, default=str).encode())
    for dataset in datasets:
        for path, label in dataset.samples:
            digest.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    return digest.hexdigest()


def build_folder_pipeline(name: str, root: str | os.PathLike, image_size: int, batch_size: int, seed: int,
                          device: torch.device | str, workers: int = 0, eval_batch_size: Optional[int] = None,
                          **aug: Any) -> tuple[FolderLoader, FolderLoader, Tensor, int, str]:
    """``(train_iterable, test_iterable, train_labels, num_classes, fingerprint)`` for an ImageNet-style folder.

    ``name`` is a ``FOLDER_RECIPES`` entry; ``aug`` overrides that recipe's options (unknown ones are an error).
    The test iterable reads ``val`` in order, without mixing, in batches of ``eval_batch_size`` (default: the
    training batch size). ``train_labels`` are the hard labels in dataset
    index order; ``fingerprint`` identifies the split listings and the recipe.
    """
    recipe = FOLDER_RECIPES.get(name)(image_size, **aug)
    root_path = Path(root).expanduser()
    train_set, val_set = load_imagefolder_splits(root_path, recipe.train_transform, recipe.eval_transform)
    num_classes = len(train_set.classes)
    if recipe.mixup is not None and batch_size % 2:
        raise ReproError(f"pipeline {name!r} mixes pairs of images and needs an even batch size, got {batch_size}")
    if recipe.mixup is not None and not recipe.drop_last:
        raise ReproError(f"pipeline {name!r} mixes pairs of images per batch: drop_last must stay true (an odd "
                         f"last batch cannot be mixed; DeiT drops it)")
    if batch_size > len(train_set):
        raise ReproError(f"batch size {batch_size} exceeds the {len(train_set)} training images in {root_path}")
    replicas, rank = _replicas()
    if recipe.repeated_aug > 1:
        sampler: Sampler = _SeededRepeatAugSampler(train_set, seed, recipe.repeated_aug, replicas, rank)
    else:
        sampler = ShuffleSampler(len(train_set), seed, replicas, rank)
    device = torch.device(device)
    train = FolderLoader(train_set, batch_size, sampler, workers, device, seed, True, num_classes,
                         recipe.mixup, recipe.smoothing, drop_last=recipe.drop_last)
    test = FolderLoader(val_set, eval_batch_size or batch_size, torch.utils.data.SequentialSampler(val_set), workers,
                        device, seed, False, num_classes)
    train.set_epoch(1)
    test.set_epoch(1)
    labels = torch.tensor(train_set.targets, dtype=torch.long)
    fingerprint = folder_fingerprint(name, image_size, recipe.options, root_path, (train_set, val_set))
    return train, test, labels, num_classes, fingerprint
