"""Data pipelines by name: a recipe's ``pipeline`` picks how images are read, augmented and batched.

Every pipeline returns a ``DataBundle`` whose loaders yield ``repro.data.batch.Batch`` objects, so the training
loop is the same for CIFAR tensors and ImageNet folders. This module is where a recipe meets the data layer: it
reads the recipe and calls the recipe-free builders of ``repro.data`` (which never import it back).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from repro.data import ImageTensorDataset
from repro.data.batch import DataBundle
from repro.core.errors import ReproError
from repro.core.registry import Registry

if TYPE_CHECKING:  # the recipe is the trainer's run config (a type only: the data layer imports nothing above it)
    from repro.train.config import TrainRecipe as Recipe


PipelineFactory = Callable[["Recipe", int, torch.device], DataBundle]
# Every pipeline registers in this module (the one place a recipe meets the data layer); the folder and transfer
# builders are imported when one is built or checked (timm and torchvision load slowly).
PIPELINES: Registry[PipelineFactory] = Registry("data pipeline")
# The dataset names (``data.name``) a pipeline reads, for the load-time check; pipelines not listed read any
# registered in-memory dataset (``repro.data.DATASETS``).
PIPELINE_DATASETS: dict[str, Callable[[], list[str]]] = {}
# Folder pipelines read an ImageFolder at ``data.root``; ``data.name`` says which dataset that folder holds.
FOLDER_DATASETS = ("imagenet",)


# The ``pipeline_args`` keys a pipeline takes (given the args, which may pick a sub-recipe), for the load-time check.
# cifar_crop_flip's ``image_size``: train and evaluate on images averaged down to this size (the smoke tier's 16x16).
PIPELINE_ARGS: dict[str, Callable[[dict[str, Any]], list[str]]] = {"cifar_crop_flip": lambda args: ["image_size"]}
FOLDER_ARGS = ("image_size", "workers")  # read by the folder pipelines themselves; the rest go to the recipe


def pipeline_arg_names(name: str, args: dict[str, Any]) -> Optional[list[str]]:
    """The ``pipeline_args`` keys pipeline ``name`` takes, or None when it does not declare them."""
    accepted = PIPELINE_ARGS.get(name)
    return None if accepted is None else sorted(accepted(args))


def pipeline_datasets(name: str) -> list[str]:
    """The ``data.name`` values pipeline ``name`` accepts."""
    from repro.data import dataset_names

    return list(PIPELINE_DATASETS.get(name, dataset_names)())


def data_root(recipe: Recipe) -> Path:
    """``$REPRO_DATA`` (default ``./data``), joined with the recipe's ``data.root`` when that is relative."""
    base = Path(os.environ.get("REPRO_DATA", "data"))
    return base / recipe.data.root if recipe.data.root else base


@PIPELINES.register("cifar_crop_flip")
def cifar_crop_flip(recipe: Recipe, seed: int, device: torch.device) -> DataBundle:
    """RandomCrop(32, padding=4) + RandomHorizontalFlip as batched tensor ops on the device (wttm.md 2.1).

    ``pipeline_args.image_size`` (smoke tier) first averages every image down to that size by whole pixel blocks;
    the crop then keeps that size, with the same zero padding of 4."""
    from repro.data import load_dataset
    from repro.data.loader import TensorLoader
    from repro.data.synthetic import ensure_synthetic_cifar, read_synthetic_cifar

    root = data_root(recipe)
    if recipe.data.synthetic is not None:
        # Smoke data: generated in the official file layout, then read by the same reader (pinned by sha256).
        args = {"variant": recipe.data.name, **recipe.data.synthetic}
        ensure_synthetic_cifar(root, **args)
        read = lambda split: read_synthetic_cifar(root, split, args["variant"])  # noqa: E731
    else:
        read = lambda split: load_dataset(recipe.data.name, root, split, download=recipe.data.download)  # noqa: E731
    size = recipe.pipeline_args.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
        raise ReproError(f"pipeline_args.image_size must be a whole number of pixels, got {size!r}")
    train = read("train").first(recipe.data.train_subset).downsampled(size)
    test = read("test").first(recipe.data.test_subset).downsampled(size)
    norm = recipe.normalization
    common = dict(mean=norm.mean, std=norm.std, device=device, channels_last=recipe.channels_last)
    return DataBundle(
        train=TensorLoader(train, recipe.batch_size, train=True, augment=True, seed=seed, **common),
        test=TensorLoader(test, recipe.eval_batch_size, train=False, augment=False, seed=seed, **common),
        train_labels=train.labels,
        num_classes=train.num_classes,
        fingerprint=f"{train.fingerprint}+{test.fingerprint}",
        image_size=int(train.images.shape[-1]),
        train_size=len(train),
        test_size=len(test),
        dataset=train,
        views=True,
    )


def _folder_pipeline(name: str) -> PipelineFactory:
    """ImageNet-style folder pipelines (torchdistill's standard recipe, DeiT's recipe) over ``data.root``."""
    def build(recipe: Recipe, seed: int, device: torch.device) -> DataBundle:
        from repro.data.pipelines_folder import build_folder_pipeline

        root = data_root(recipe)
        if recipe.data.synthetic is not None:
            from repro.core.io import publish_folder
            from repro.data.imagefolder import write_synthetic_imagefolder

            publish_folder(root, lambda folder: write_synthetic_imagefolder(folder, **recipe.data.synthetic))
            if not (root / "train").is_dir():
                raise ReproError(f"{root} exists but holds no train/ folder, so it is not the smoke data repro "
                                 f"writes; remove it or give data.root another folder")
        if recipe.data.name not in FOLDER_DATASETS:
            raise ReproError(f"pipeline {name!r} reads an image folder; data.name {recipe.data.name!r} is not "
                             f"one of {', '.join(FOLDER_DATASETS)}")
        args = dict(recipe.pipeline_args)
        image_size = int(args.pop("image_size", 224))
        workers = int(args.pop("workers", 0))
        train, test, labels, num_classes, fingerprint = build_folder_pipeline(
            name, root, image_size, recipe.batch_size, seed, device, workers,
            eval_batch_size=recipe.eval_batch_size, **args)
        return DataBundle(train=train, test=test, train_labels=labels, num_classes=num_classes,
                          fingerprint=fingerprint, image_size=image_size, train_size=len(labels),
                          test_size=getattr(test, "num_samples", 0))

    return build


def read_cifar_splits(recipe: Recipe) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Train and test splits of ``recipe.data`` for the transfer pipeline (synthetic smoke data is generated first,
    in the real layout, with the dataset's own class count unless the spec says otherwise)."""
    from repro.data import load_dataset
    from repro.data.synthetic import SMOKE_ARGS, ensure_synthetic_cifar, read_synthetic_cifar

    name, root = recipe.data.name, data_root(recipe)
    if recipe.data.synthetic is not None:
        if name not in SMOKE_ARGS:
            raise ReproError(f"synthetic data exists for {sorted(SMOKE_ARGS)}, not for {name!r}")
        args = {"num_classes": SMOKE_ARGS[name]["num_classes"], **recipe.data.synthetic, "variant": name}
        ensure_synthetic_cifar(root, **args)
        train, test = (read_synthetic_cifar(root, split, name) for split in ("train", "test"))
    else:
        train, test = (load_dataset(name, root, split, download=recipe.data.download) for split in ("train", "test"))
    return train.first(recipe.data.train_subset), test.first(recipe.data.test_subset)


def cifar_transfer(recipe: Recipe, seed: int, device: torch.device) -> DataBundle:
    """CIFAR upsampled for fine-tuning through a folder recipe (``repro.data.pipelines_transfer``)."""
    from repro.data.pipelines_transfer import build_transfer_pipeline, check_normalization

    check_normalization(recipe.normalization.mean, recipe.normalization.std)
    train, test = read_cifar_splits(recipe)
    return build_transfer_pipeline(train, test, recipe.batch_size, recipe.eval_batch_size, seed, device,
                                   **recipe.pipeline_args)


def _folder_options(name: str) -> list[str]:
    from repro.data.pipelines_folder import FOLDER_RECIPE_OPTIONS

    return list(FOLDER_RECIPE_OPTIONS[name])


def _transfer_args(args: dict[str, Any]) -> list[str]:
    from repro.data.pipelines_transfer import transfer_arg_names

    return transfer_arg_names(args)


for _name in ("imagenet_standard", "deit"):
    PIPELINES.register(_name)(_folder_pipeline(_name))
    PIPELINE_DATASETS[_name] = lambda: list(FOLDER_DATASETS)
    PIPELINE_ARGS[_name] = lambda args, name=_name: [*FOLDER_ARGS, *_folder_options(name)]
PIPELINES.register("cifar_transfer")(cifar_transfer)
PIPELINE_ARGS["cifar_transfer"] = _transfer_args


def build_pipeline(recipe: Recipe, seed: int, device: torch.device) -> DataBundle:
    return PIPELINES.get(recipe.pipeline)(recipe, seed, device)
