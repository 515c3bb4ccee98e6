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
The loaders are the folder pipelines' own (``assemble_loaders``); reading the recipe is ``repro.data.pipelines``'s job.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from repro.data import ImageTensorDataset
from repro.data.batch import DataBundle
from repro.data.pipelines_folder import (
    FOLDER_RECIPE_OPTIONS,
    FOLDER_RECIPES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    assemble_loaders,
)
from repro.core.errors import ReproError

DEFAULT_IMAGE_SIZE = 224
PIPELINE_NAME = "cifar_transfer"


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


def check_normalization(mean: Sequence[float], std: Sequence[float]) -> None:
    """The folder recipes normalise with ImageNet statistics (the models were pretrained with them); a spec that
    asks for other statistics would silently get these, so it is refused instead."""
    if any(abs(a - b) > 1e-4 for a, b in zip([*mean, *std], [*IMAGENET_MEAN, *IMAGENET_STD])):
        raise ReproError(f"the transfer pipeline normalises with ImageNet mean/std {IMAGENET_MEAN}/{IMAGENET_STD}; "
                         f"the recipe asks for {list(mean)}/{list(std)}")


def transfer_arg_names(args: dict[str, Any]) -> list[str]:
    """The ``pipeline_args`` keys the transfer pipeline takes (the chosen recipe's options among them)."""
    return ["image_size", "workers", "augmentation",
            *FOLDER_RECIPE_OPTIONS.get(str(args.get("augmentation", "deit")), {})]


def build_transfer_pipeline(train_data: ImageTensorDataset, test_data: ImageTensorDataset, batch_size: int,
                            eval_batch_size: Optional[int], seed: int, device: torch.device,
                            **pipeline_args: Any) -> DataBundle:
    """CIFAR splits (real or synthetic) upsampled to ``image_size`` through a folder recipe's transforms and mixing."""
    options = dict(pipeline_args)
    image_size = int(options.pop("image_size", DEFAULT_IMAGE_SIZE))
    workers = int(options.pop("workers", 0))
    augmentation = str(options.pop("augmentation", "deit"))
    folder_recipe = FOLDER_RECIPES.get(augmentation)(image_size, **options)
    train_set = PILImageDataset(train_data, folder_recipe.train_transform)
    test_set = PILImageDataset(test_data, folder_recipe.eval_transform)
    num_classes = train_data.num_classes
    train, test = assemble_loaders(f"{PIPELINE_NAME} ({augmentation})", folder_recipe, train_set, test_set,
                                   num_classes, batch_size, eval_batch_size, seed, device, workers,
                                   f"of {train_data.name}")
    recipe_text = json.dumps({"augmentation": augmentation, "image_size": image_size,
                              "options": folder_recipe.options}, sort_keys=True, default=str)
    fingerprint = hashlib.sha256(f"{train_data.fingerprint}+{test_data.fingerprint}+{recipe_text}".encode())
    return DataBundle(train=train, test=test, train_labels=train_data.labels.clone(), num_classes=num_classes,
                      fingerprint=fingerprint.hexdigest(), image_size=image_size, train_size=len(train_set),
                      test_size=len(test_set))
