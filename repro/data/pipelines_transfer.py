"""CIFAR-10/100 fine-tuning at ImageNet resolution: DeiT's transfer pipeline (ssta.md 4).

DeiT fine-tunes ImageNet models on CIFAR at 224 px with its ImageNet augmentation: ``datasets.build_transform``
runs timm's ``create_transform`` on the 32-px PIL images, so RandomResizedCrop upsamples them to 224 (bicubic),
and evaluation resizes to 224 / 0.875 = 256 and centre-crops 224. This pipeline reads CIFAR with the suite's own
reader (real pickles, or the synthetic smoke data in the same layout), turns each uint8 image into a PIL image and
applies a registered image-folder recipe (``repro.data.pipelines_folder.FOLDER_RECIPES``, ``deit`` by default)
at ``image_size``: RandAugment, mixup/cutmix, label smoothing and repeated augmentation come with it, and the
recipe's options are overridable from ``pipeline_args`` (DeiT's transfer runs set ``re_prob: 0``, no random
erasing). At ``image_size`` 32 the ``deit`` recipe switches to its CIFAR-sized variant (pad-and-crop), which is
what the smoke tier runs.

``pipeline_args``: ``image_size`` (224), ``workers`` (0), ``augmentation`` (``deit``), and any option of that recipe.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Callable

import torch
from PIL import Image
from torch.utils.data import Dataset, SequentialSampler

from repro.data import ImageTensorDataset, load_dataset
from repro.data.pipelines_folder import (
    FOLDER_RECIPE_OPTIONS,
    FOLDER_RECIPES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FolderLoader,
    ShuffleSampler,
    _replicas,
    _SeededRepeatAugSampler,
)
from repro.errors import ReproError
from repro.pipelines import PIPELINE_ARGS, PIPELINES, DataBundle, data_root

if TYPE_CHECKING:  # the trainer's run config, as a type only (the data layer imports nothing above it)
    from repro.train_config import TrainRecipe as Recipe

DEFAULT_IMAGE_SIZE = 224


class PILImageDataset(Dataset):
    """An in-memory uint8 split seen as PIL images: items are ``(transform(image), label, index)``."""

    def __init__(self, data: ImageTensorDataset, transform: Callable) -> None:
        self.images = data.images.permute(0, 2, 3, 1).contiguous().numpy()  # [N, H, W, C] for PIL
        self.labels = data.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        return self.transform(Image.fromarray(self.images[index])), self.labels[index], index


def read_cifar_splits(recipe: Recipe) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Train and test splits of ``recipe.data`` (synthetic smoke data is generated first, in the real layout)."""
    from repro.data.synthetic import SMOKE_ARGS, ensure_synthetic_cifar, read_synthetic_cifar

    name, root = recipe.data.name, data_root(recipe)
    if recipe.data.synthetic is not None:
        if name not in SMOKE_ARGS:
            raise ReproError(f"synthetic data exists for {sorted(SMOKE_ARGS)}, not for {name!r}")
        # The class count follows the dataset (10 or 100) unless the spec says otherwise.
        args = {"num_classes": SMOKE_ARGS[name]["num_classes"], **recipe.data.synthetic, "variant": name}
        ensure_synthetic_cifar(root, **args)
        train, test = (read_synthetic_cifar(root, split, name) for split in ("train", "test"))
    else:
        train, test = (load_dataset(name, root, split, download=recipe.data.download) for split in ("train", "test"))
    return _first(train, recipe.data.train_subset), _first(test, recipe.data.test_subset)


def _first(data: ImageTensorDataset, count: int | None) -> ImageTensorDataset:
    if count is None or count >= len(data):
        return data
    return ImageTensorDataset(images=data.images[:count], labels=data.labels[:count], num_classes=data.num_classes,
                              name=data.name, fingerprint=f"{data.fingerprint}[:{count}]")


def _check_normalization(recipe: Recipe) -> None:
    # The folder recipes normalise with ImageNet statistics (the models were pretrained with them); a spec that
    # asks for other statistics would silently get these, so it is refused instead.
    norm = recipe.normalization
    if any(abs(a - b) > 1e-4 for a, b in zip([*norm.mean, *norm.std], [*IMAGENET_MEAN, *IMAGENET_STD])):
        raise ReproError(f"the transfer pipeline normalises with ImageNet mean/std {IMAGENET_MEAN}/{IMAGENET_STD}; "
                         f"the recipe asks for {norm.mean}/{norm.std}")


def build_transfer_pipeline(recipe: Recipe, seed: int, device: torch.device) -> DataBundle:
    """CIFAR (real or synthetic) upsampled to ``image_size`` through a folder recipe's transforms and mixing."""
    _check_normalization(recipe)
    options = dict(recipe.pipeline_args)
    image_size = int(options.pop("image_size", DEFAULT_IMAGE_SIZE))
    workers = int(options.pop("workers", 0))
    augmentation = str(options.pop("augmentation", "deit"))
    folder_recipe = FOLDER_RECIPES.get(augmentation)(image_size, **options)
    train_data, test_data = read_cifar_splits(recipe)
    if folder_recipe.mixup is not None and recipe.batch_size % 2:
        raise ReproError(f"mixup/cutmix mix pairs of images and need an even batch size, got {recipe.batch_size}")
    if recipe.batch_size > len(train_data):
        raise ReproError(f"batch size {recipe.batch_size} exceeds the {len(train_data)} training images of "
                         f"{recipe.data.name}")
    train_set = PILImageDataset(train_data, folder_recipe.train_transform)
    test_set = PILImageDataset(test_data, folder_recipe.eval_transform)
    replicas, rank = _replicas()
    sampler = (_SeededRepeatAugSampler(train_set, seed, folder_recipe.repeated_aug, replicas, rank)
               if folder_recipe.repeated_aug > 1 else ShuffleSampler(len(train_set), seed, replicas, rank))
    num_classes = train_data.num_classes
    train = FolderLoader(train_set, recipe.batch_size, sampler, workers, device, seed, True, num_classes,
                         folder_recipe.mixup, folder_recipe.smoothing)
    test = FolderLoader(test_set, recipe.eval_batch_size, SequentialSampler(test_set), workers, device, seed, False,
                        num_classes)
    train.set_epoch(1)
    test.set_epoch(1)
    recipe_text = json.dumps({"augmentation": augmentation, "image_size": image_size,
                              "options": folder_recipe.options}, sort_keys=True, default=str)
    fingerprint = hashlib.sha256(f"{train_data.fingerprint}+{test_data.fingerprint}+{recipe_text}".encode())
    return DataBundle(train=train, test=test, train_labels=train_data.labels.clone(), num_classes=num_classes,
                      fingerprint=fingerprint.hexdigest(), image_size=image_size, train_size=len(train_set),
                      test_size=len(test_set))


PIPELINE_NAME = "cifar_transfer"
# Registered on import (idempotent: the registry accepts the same object twice); importing this module from
# repro.pipelines makes the name available to every recipe.
PIPELINES.register(PIPELINE_NAME)(build_transfer_pipeline)
PIPELINE_ARGS[PIPELINE_NAME] = lambda args: ["image_size", "workers", "augmentation",
                                             *FOLDER_RECIPE_OPTIONS.get(str(args.get("augmentation", "deit")), {})]
