"""Where a frozen teacher's logits are cached, and ``repro teachers cache`` (precompute them for a spec).

The cache is exact for the discrete CIFAR augmentation: a view is (image index, dy, dx, flip), and the key covers
the teacher's weights, the numerics it runs with, the training data's fingerprint and the normalisation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from repro.errors import ReproError
from repro.plan import Plan
from repro.spec import Recipe
from repro.store import RunStore


def cache_dir(store_root: Path) -> Path:
    return store_root / ".cache" / "teacher_outputs"


def teacher_cache_key(weights_key: str, recipe: Recipe) -> str:
    return f"{weights_key}|{recipe.precision}|cl={recipe.channels_last}"


def open_teacher_cache(store_root: Path, weights_key: str, recipe: Recipe, dataset: Any, num_classes: int) -> Any:
    """The cache file of one teacher for one training set: opened by training and by ``repro teachers cache``
    alike (one key, one dtype: the recipe's ``teacher_cache_dtype``), so a pre-fill is the file training reads.
    ``num_classes`` is the logits' width (the models' class count, which may exceed the labels in use)."""
    from repro.data.teacher_cache import TeacherCache

    norm = recipe.normalization
    return TeacherCache.open(cache_dir(store_root), teacher_key=teacher_cache_key(weights_key, recipe),
                             data_fingerprint=dataset.fingerprint, normalization=(tuple(norm.mean), tuple(norm.std)),
                             num_images=len(dataset), num_classes=num_classes, dtype=recipe.teacher_cache_dtype)


def teacher_runs(plan: Plan) -> list[str]:
    """Runs that some student of the plan uses as its teacher, in plan order."""
    wanted = {r.config["teacher"]["run"] for r in plan.ordered() if r.config.get("teacher")}
    return [rid for rid in plan.runs if rid in wanted]


def cache_teachers(plan: Plan, store: RunStore, device: torch.device) -> list[tuple[str, int]]:
    """Fill the cache of every finished teacher of the plan; returns (run id, entries computed)."""
    from repro.data.teacher_cache import fill_cache
    from repro.pipelines import build_pipeline
    from repro.runner import load_run_model

    done = []
    for run_id in teacher_runs(plan):
        if not store.is_done(run_id):
            raise ReproError(f"teacher run {run_id} ({plan.runs[run_id].label}) has not finished: "
                             f"run `repro run {plan.spec.id} --tier {plan.tier}` first")
        model, weights_key = load_run_model(store, run_id, device)
        students = [r for r in plan.ordered() if (r.config.get("teacher") or {}).get("run") == run_id]
        recipe = Recipe.model_validate({**students[0].config["recipe"], "lr_by_arch": {}})
        data = build_pipeline(recipe, 0, device)
        if data.dataset is None:
            raise ReproError(f"pipeline {recipe.pipeline!r} has no discrete views: its teacher outputs cannot be cached")
        cache = open_teacher_cache(store.root, weights_key, recipe, data.dataset,
                                   students[0].config["model"]["num_classes"])
        bar = tqdm(total=len(data.dataset) * 162, desc=f"cache {run_id[:8]}", unit="view", mininterval=1.0)
        computed = fill_cache(cache, model, data.dataset, recipe.normalization.mean, recipe.normalization.std, device,
                              progress=lambda n, total: bar.update(n - bar.n))
        bar.close()
        cache.close()
        done.append((run_id, computed))
    return done
