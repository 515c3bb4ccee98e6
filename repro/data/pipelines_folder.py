"""Data pipelines over an ImageNet-style folder that yield ``repro.data.batch.Batch`` objects.

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

Randomness: the sampler's order of the epoch depends on (seed, epoch) only, and so does every training image's
augmentation: each position of the epoch gets its own seed from ``repro.data.batch.epoch_generator`` (seed, epoch;
never the rank), and the image is transformed under that seed (python, numpy and torch RNGs; the main process's
own RNG states are restored after each image). Mixup/CutMix (timm) draws its parameters under a seed of the global
batch. An epoch's batches are therefore the same with any number of workers, with workers that persist across
epochs (``persistent_workers``: no re-fork per epoch) or fresh ones, after a resume at that epoch, and on any
number of processes (``GlobalBatches``: rank r takes its contiguous slice of each global batch; see
``FolderLoader`` for how a slice is mixed with images of other ranks' slices).
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
from timm.data import Mixup, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from repro.data.batch import Batch, GlobalBatches, epoch_generator
from repro.data.imagefolder import IndexedImageFolder, load_imagefolder_splits
from repro.errors import ReproError
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


# ----------------------------------------------------------------------------------------------------------
# the builder: one assembly for every folder-recipe pipeline (the ImageNet folder, CIFAR upsampled for transfer)

def folder_fingerprint(name: str, image_size: int, options: dict[str, Any], root: Path,
                       datasets: tuple[IndexedImageFolder, ...]) -> str:
    """sha256 of the pipeline recipe and both split listings (paths relative to the root, and labels)."""
    digest = hashlib.sha256(json.dumps({"pipeline": name, "image_size": image_size, "options": options},
                                       sort_keys=True, default=str).encode())
    for dataset in datasets:
        for path, label in dataset.samples:
            digest.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    return digest.hexdigest()


def assemble_loaders(name: str, recipe: FolderRecipe, train_set: Dataset, test_set: Dataset, num_classes: int,
                     batch_size: int, eval_batch_size: Optional[int], seed: int, device: torch.device | str,
                     workers: int, where: str) -> tuple[FolderLoader, FolderLoader]:
    """The training and test loaders of folder recipe ``recipe`` (called ``name``) over two datasets whose items
    are ``(image, label, index)``; ``where`` names the training data in errors."""
    if recipe.mixup is not None and batch_size % 2:
        raise ReproError(f"pipeline {name!r} mixes pairs of images and needs an even batch size, got {batch_size}")
    if recipe.mixup is not None and not recipe.drop_last:
        raise ReproError(f"pipeline {name!r} mixes pairs of images per batch: drop_last must stay true (an odd "
                         f"last batch cannot be mixed; DeiT drops it)")
    if batch_size > len(train_set):
        raise ReproError(f"batch size {batch_size} exceeds the {len(train_set)} training images {where}")
    sampler: Sampler = (_SeededRepeatAugSampler(train_set, seed, recipe.repeated_aug) if recipe.repeated_aug > 1
                        else ShuffleSampler(len(train_set), seed))
    device = torch.device(device)
    train = FolderLoader(train_set, batch_size, sampler, workers, device, seed, True, num_classes,
                         recipe.mixup, recipe.smoothing, drop_last=recipe.drop_last)
    test = FolderLoader(test_set, eval_batch_size or batch_size, SequentialSampler(test_set), workers, device,
                        seed, False, num_classes)
    train.set_epoch(1)
    test.set_epoch(1)
    return train, test


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
    train, test = assemble_loaders(name, recipe, train_set, val_set, num_classes, batch_size, eval_batch_size, seed,
                                   device, workers, f"in {root_path}")
    labels = torch.tensor(train_set.targets, dtype=torch.long)
    fingerprint = folder_fingerprint(name, image_size, recipe.options, root_path, (train_set, val_set))
    return train, test, labels, num_classes, fingerprint
