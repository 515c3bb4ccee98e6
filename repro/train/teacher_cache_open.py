"""Where a frozen teacher's logits are cached (``repro teachers cache`` fills it for a plan: ``repro.harness.execute``).

The cache is exact for the discrete CIFAR augmentation: a view is (image index, dy, dx, flip), and the key covers
the teacher's weights, the numerics it runs with, the training data's fingerprint and the normalisation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from repro.train.config import TrainRecipe


def cache_dir(store_root: Path) -> Path:
    return store_root / ".cache" / "teacher_outputs"


def teacher_cache_key(weights_key: str, recipe: TrainRecipe) -> str:
    return f"{weights_key}|{recipe.precision}|cl={recipe.channels_last}"


def open_teacher_cache(store_root: Path, weights_key: str, recipe: TrainRecipe, dataset: Any, num_classes: int) -> Any:
    """The cache file of one teacher for one training set: opened by training and by ``repro teachers cache``
    alike (one key, one dtype: the recipe's ``teacher_cache_dtype``), so a pre-fill is the file training reads.
    ``num_classes`` is the logits' width (the models' class count, which may exceed the labels in use)."""
    from repro.data.teacher_cache import TeacherCache

    norm = recipe.normalization
    return TeacherCache.open(cache_dir(store_root), teacher_key=teacher_cache_key(weights_key, recipe),
                             data_fingerprint=dataset.fingerprint, normalization=(tuple(norm.mean), tuple(norm.std)),
                             num_images=len(dataset), num_classes=num_classes, dtype=recipe.teacher_cache_dtype)
