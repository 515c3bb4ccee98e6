"""Data pipelines by name: a recipe's ``pipeline`` picks how images are read, augmented and batched.

Every pipeline returns a ``DataBundle`` whose loaders yield ``repro.methods.Batch`` objects, so the training
loop is the same for CIFAR tensors and ImageNet folders.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Protocol

import torch
from torch import Tensor

from repro.errors import ReproError
from repro.methods.base import Batch
from repro.registry import Registry

if TYPE_CHECKING:  # the recipe is the trainer's run config (a type only: the data layer imports nothing above it)
    from repro.train_config import TrainRecipe as Recipe


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


PipelineFactory = Callable[["Recipe", int, torch.device], DataBundle]
# Pipelines register with the decorator where they are defined: here, and in the modules of repro.data (imported
# before the first lookup).
PIPELINES: Registry[PipelineFactory] = Registry("data pipeline", package="repro.data")
# The dataset names (``data.name``) a pipeline reads, for the load-time check; pipelines not listed read any
# registered in-memory dataset (``repro.data.DATASETS``).
PIPELINE_DATASETS: dict[str, Callable[[], list[str]]] = {}
# Folder pipelines read an ImageFolder at ``data.root``; ``data.name`` says which dataset that folder holds.
FOLDER_DATASETS = ("imagenet",)


# The ``pipeline_args`` keys a pipeline takes (given the args, which may pick a sub-recipe), for the load-time check.
PIPELINE_ARGS: dict[str, Callable[[dict[str, Any]], list[str]]] = {"cifar_crop_flip": lambda args: []}
FOLDER_ARGS = ("image_size", "workers")  # read by the folder pipelines themselves; the rest go to the recipe


def pipeline_arg_names(name: str, args: dict[str, Any]) -> Optional[list[str]]:
    """The ``pipeline_args`` keys pipeline ``name`` takes, or None when it does not declare them."""
    PIPELINES.discover()  # the modules that register a pipeline declare its arguments
    accepted = PIPELINE_ARGS.get(name)
    return None if accepted is None else sorted(accepted(args))


def pipeline_datasets(name: str) -> list[str]:
    """The ``data.name`` values pipeline ``name`` accepts."""
    from repro.data import dataset_names

    PIPELINES.discover()
    return list(PIPELINE_DATASETS.get(name, dataset_names)())


def data_root(recipe: Recipe) -> Path:
    """``$REPRO_DATA`` (default ``./data``), joined with the recipe's ``data.root`` when that is relative."""
    base = Path(os.environ.get("REPRO_DATA", "data"))
    return base / recipe.data.root if recipe.data.root else base


def _subset(dataset: Any, n: Optional[int]) -> Any:
    if n is None or n >= len(dataset):
        return dataset
    from dataclasses import replace

    return replace(dataset, images=dataset.images[:n], labels=dataset.labels[:n],
                   fingerprint=f"{dataset.fingerprint}[:{n}]")


@PIPELINES.register("cifar_crop_flip")
def cifar_crop_flip(recipe: Recipe, seed: int, device: torch.device) -> DataBundle:
    """RandomCrop(32, padding=4) + RandomHorizontalFlip as batched tensor ops on the device (wttm.md 2.1)."""
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
    train = _subset(read("train"), recipe.data.train_subset)
    test = _subset(read("test"), recipe.data.test_subset)
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


def _register_folder_pipelines() -> None:
    """ImageNet-style folder pipelines (torchdistill's standard recipe, DeiT's recipe) live in repro.data, imported
    when one is built or checked (timm and torchvision load slowly)."""

    def make(name: str) -> PipelineFactory:
        def build(recipe: Recipe, seed: int, device: torch.device) -> DataBundle:
            from repro.data.pipelines_folder import build_folder_pipeline

            root = data_root(recipe)
            if recipe.data.synthetic is not None:
                from repro.data.imagefolder import write_synthetic_imagefolder

                if not (root / "train").is_dir():
                    write_synthetic_imagefolder(root, **recipe.data.synthetic)
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

    for name in ("imagenet_standard", "deit"):
        PIPELINES.register(name)(make(name))
        PIPELINE_DATASETS[name] = lambda: list(FOLDER_DATASETS)
        PIPELINE_ARGS[name] = lambda args, name=name: [*FOLDER_ARGS, *_folder_options(name)]


def _folder_options(name: str) -> list[str]:
    from repro.data.pipelines_folder import FOLDER_RECIPE_OPTIONS

    return list(FOLDER_RECIPE_OPTIONS[name])


_register_folder_pipelines()  # registered with this module, like cifar_crop_flip above


def build_pipeline(recipe: Recipe, seed: int, device: torch.device) -> DataBundle:
    return PIPELINES.get(recipe.pipeline)(recipe, seed, device)
