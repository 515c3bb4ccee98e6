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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from timm.data import create_transform
from torch import Tensor
from torch.utils.data import Dataset, Sampler, SequentialSampler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from repro.data.folder_loader import FolderLoader, ShuffleSampler, _SeededRepeatAugSampler
from repro.data.imagefolder import IndexedImageFolder, load_imagefolder_splits
from repro.core.errors import ReproError
from repro.core.registry import Registry

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
