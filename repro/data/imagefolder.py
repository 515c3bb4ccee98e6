"""The ImageNet folder layout (``<root>/train/<wnid>/*.JPEG``, ``<root>/val/<wnid>/*.JPEG``) and a synthetic
writer of that same layout for the smoke tier and tests.

Reading goes through torchvision's ``ImageFolder``; any missing or empty folder is one ReproError naming it.
The synthetic images are learnable by construction: each class has its own colour, stripe orientation and
stripe frequency; each image has a random phase, brightness and pixel noise. They are real JPEG files.
"""
from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder

from repro.core.errors import ReproError

SPLITS = ("train", "val")


class IndexedImageFolder(ImageFolder):
    """``ImageFolder`` whose items are ``(image, label, dataset index)``."""

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image, label = super().__getitem__(index)
        return image, label, index


def split_dir(root: str | os.PathLike, split: str) -> Path:
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ReproError(f"ImageNet-style folder not found: {base} (expected {base}/train/<class>/*.JPEG "
                         f"and {base}/val/<class>/*.JPEG)")
    path = base / split
    if not path.is_dir():
        present = sorted(p.name for p in base.iterdir() if p.is_dir())
        raise ReproError(f"split folder {path} is missing (folders in {base}: {present or 'none'})")
    return path


def load_imagefolder(root: str | os.PathLike, split: str, transform: Optional[Callable] = None) -> IndexedImageFolder:
    """One split of an ImageNet-style folder, with a clear error when it is missing or holds no images."""
    path = split_dir(root, split)
    try:
        return IndexedImageFolder(str(path), transform=transform)
    except FileNotFoundError as err:  # torchvision: no class folder, or no image in any class folder
        raise ReproError(f"split folder {path} holds no usable images ({err})") from None


def load_imagefolder_splits(root: str | os.PathLike, train_transform: Optional[Callable] = None,
                            eval_transform: Optional[Callable] = None,
                            ) -> tuple[IndexedImageFolder, IndexedImageFolder]:
    """The train and val splits; their class folders must be the same (labels are folder indices)."""
    for split in SPLITS:  # both folders exist before the (long, on ImageNet) scan of either
        split_dir(root, split)
    train = load_imagefolder(root, "train", train_transform)
    val = load_imagefolder(root, "val", eval_transform)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise ReproError(f"train and val of {root} have different class folders "
                         f"(only in train: {only_train}, only in val: {only_val})")
    return train, val


# ----------------------------------------------------------------------------------------------------------
# synthetic data in the same layout

def _class_names(classes: int | Sequence[str]) -> list[str]:
    names = [f"n{k:08d}" for k in range(classes)] if isinstance(classes, int) else [str(c) for c in classes]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ReproError(f"a synthetic image folder needs at least 2 distinct classes, got {names}")
    return names


def _class_style(index: int, count: int) -> tuple[np.ndarray, int, float]:
    """Colour (RGB in [0, 1]), stripe axis (0 horizontal, 1 vertical) and stripe cycles of one class."""
    rgb = np.array(colorsys.hsv_to_rgb(index / count, 0.75, 0.85))
    return rgb, index % 2, 2.0 + (index // 2) % 3


def _synthetic_image(rng: np.random.Generator, index: int, count: int, size: int) -> np.ndarray:
    rgb, axis, cycles = _class_style(index, count)
    coords = np.arange(size, dtype=np.float64) / size
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (cycles * coords + rng.uniform()))
    stripes = np.repeat(wave[:, None], size, axis=1) if axis == 0 else np.repeat(wave[None, :], size, axis=0)
    brightness = rng.uniform(0.8, 1.2)
    image = brightness * (0.45 + 0.55 * stripes)[..., None] * rgb[None, None, :]
    image = image + rng.normal(0.0, 0.06, size=image.shape)
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_synthetic_imagefolder(root: str | os.PathLike, classes: int | Sequence[str] = 10, per_class: int = 20,
                                size: int = 40, seed: int = 0, val_per_class: Optional[int] = None,
                                splits: Sequence[str] = SPLITS, quality: int = 95) -> Path:
    """Write ``<root>/<split>/<wnid>/<wnid>_<i>.JPEG`` for every split; deterministic in ``seed``.

    ``classes`` is a count (names ``n00000000``, ``n00000001``, ... like ImageNet WNIDs) or a list of names;
    ``val_per_class`` defaults to ``per_class``. Returns ``root``.
    """
    names = _class_names(classes)
    base = Path(root).expanduser()
    for split_index, split in enumerate(splits):
        count = per_class if split == "train" or val_per_class is None else val_per_class
        for class_index, name in enumerate(names):
            folder = base / split / name
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, split_index, class_index])
            for i in range(count):
                pixels = _synthetic_image(rng, class_index, len(names), size)
                Image.fromarray(pixels).save(folder / f"{name}_{i:05d}.JPEG", format="JPEG", quality=quality)
    return base
