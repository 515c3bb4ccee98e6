"""Where a frozen teacher's logits are cached (``repro teachers cache`` fills it for a plan: ``repro.harness.execute``).

The cache is exact for the discrete CIFAR augmentation: a view is (image index, dy, dx, flip), and the key covers
the teacher's weights, the numerics it runs with, the training data's fingerprint and the normalisation. Under
``teacher_cache_features`` it holds the teacher's last feature too, and its width is one of the keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from repro.train.config import TrainRecipe


@dataclass(frozen=True)
class LastFeature:
    """What a teacher's last feature is, for the cache: its width (0 when it is not a vector, and the cache then
    holds logits only) and whether the pre-activation forward gives the same one, in which case the cached
    post-activation feature serves pre-activation terms (ITRD) too."""

    width: int
    same_in_preact: bool


def probe_last_feature(teacher: nn.Module, image_size: int, device: torch.device) -> LastFeature:
    """The teacher's last feature on a fixed random probe, in both kinds (a no-grad eval forward of 2 images)."""
    probe = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        feats, _ = teacher(probe, is_feat=True, preact=False)
        preact_feats, _ = teacher(probe, is_feat=True, preact=True)
    teacher.train(was_training)
    last = feats[-1]
    if last.dim() != 2:
        return LastFeature(0, False)
    return LastFeature(int(last.shape[1]), bool(torch.equal(last, preact_feats[-1])))


def cache_last_feature(recipe: TrainRecipe, teacher: nn.Module, image_size: int, device: torch.device) -> LastFeature:
    """The last feature the recipe's cache file holds for this teacher (width 0: logits only, when the recipe does
    not ask for ``teacher_cache_features``): what training and ``repro teachers cache`` both open."""
    if not recipe.teacher_cache_features:
        return LastFeature(0, False)
    return probe_last_feature(teacher, image_size, device)


def cache_dir(store_root: Path) -> Path:
    return store_root / ".cache" / "teacher_outputs"


def teacher_cache_key(weights_key: str, recipe: TrainRecipe) -> str:
    return f"{weights_key}|{recipe.precision}|cl={recipe.channels_last}"


def open_teacher_cache(store_root: Path, weights_key: str, recipe: TrainRecipe, dataset: Any, num_classes: int,
                       feature_width: int = 0) -> Any:
    """The cache file of one teacher for one training set: opened by training and by ``repro teachers cache``
    alike (one key, one dtype: the recipe's ``teacher_cache_dtype``), so a pre-fill is the file training reads.
    ``num_classes`` is the logits' width (the models' class count, which may exceed the labels in use);
    ``feature_width`` that of the last feature it also holds (``cache_last_feature``; 0: none)."""
    from repro.data.teacher_cache import TeacherCache

    norm = recipe.normalization
    return TeacherCache.open(cache_dir(store_root), teacher_key=teacher_cache_key(weights_key, recipe),
                             data_fingerprint=dataset.fingerprint, normalization=(tuple(norm.mean), tuple(norm.std)),
                             num_images=len(dataset), num_classes=num_classes, dtype=recipe.teacher_cache_dtype,
                             feature_width=feature_width)
