"""Write a small cue-conflict set in the texture-vs-shape layout for smoke runs.

Layout (as ``stimuli/style-transfer-preprocessed-512`` of rgeirhos/texture-vs-shape): ``<root>/<shape>/
<shape><i>-<texture><j>.png`` over the 16 categories. Each image is a class-specific silhouette (the "shape") filled
with a class-specific pattern (the "texture") on a grey background, so shape and texture are really separable cues.
Like the real set, it may contain images whose shape and texture classes agree (the evaluation drops them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

# The 16 categories, from the same data file the shape-bias evaluation maps with.
with open(Path(__file__).resolve().parent / "shape_bias_16class.json") as _f:
    CATEGORIES: tuple[str, ...] = tuple(json.load(_f)["categories"])


def _silhouette(category_index: int, size: int) -> np.ndarray:
    """A boolean mask: a regular polygon whose vertex count and rotation depend on the category."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    sides = 3 + category_index % 6
    rotation = np.pi * category_index / 16
    angle = np.arctan2(yy, xx) - rotation
    sector = 2 * np.pi / sides
    # distance to the polygon edge along each ray, for a polygon inscribed in a radius-0.8 circle
    edge = 0.8 * np.cos(np.pi / sides) / np.cos((angle % sector) - sector / 2)
    return np.hypot(xx, yy) <= edge


def _texture(category_index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 pattern: stripes with a category frequency/orientation in a category colour, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    colour = np.random.default_rng(1000 + category_index).uniform(30, 225, size=3)
    angle = np.pi * category_index / 16
    period = 3 + category_index % 5
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    return colour + 40 * stripes[..., None] + rng.normal(0, 8, size=(size, size, 3))


def cue_conflict_image(shape_index: int, texture_index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    image = np.full((size, size, 3), 128.0)
    mask = _silhouette(shape_index, size)
    image[mask] = _texture(texture_index, size, rng)[mask]
    return np.clip(image, 0, 255).astype(np.uint8)


def write_synthetic_cue_conflict(
    root: str | Path,
    images_per_class: int = 3,
    image_size: int = 32,
    seed: int = 0,
    categories: Optional[Sequence[str]] = None,
    include_same_class: bool = True,
) -> list[Path]:
    """Write ``images_per_class`` stimuli per shape category; returns the written files in sorted order.

    Textures cycle through the other categories; with ``include_same_class`` the last image of each class is a
    no-conflict one (texture == shape), as a few real stimuli are (e.g. ``airplane10-airplane1.png``).
    """
    root = Path(root)
    names = list(categories or CATEGORIES)
    rng = np.random.default_rng(seed)
    written: list[Path] = []
    for shape_index, shape in enumerate(names):
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            same = include_same_class and i == images_per_class - 1
            texture_index = shape_index if same else (shape_index + 1 + i) % len(names)
            if texture_index == shape_index and not same:
                texture_index = (texture_index + 1) % len(names)
            texture = names[texture_index]
            path = folder / f"{shape}{i + 1}-{texture}{i % 3 + 1}.png"
            Image.fromarray(cue_conflict_image(shape_index, texture_index, image_size, rng)).save(path)
            written.append(path)
    return sorted(written)
