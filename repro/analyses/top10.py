"""The "top-10 categories" analysis of SSTA: where a supervised teacher and a self-supervised TA differ per class.

Only the existence of the figure is confirmed (its caption: "The abscissa is the top 10 cat[egories] ..." on ImageNet
val), so the ranking is a registered rule, chosen by name:

* ``largest-difference`` (default): the k classes where model A has the most more correct images than model B, and
  the k classes where B beats A the most (the two panels of a mirrored figure);
* ``top-correct``: each model's own k classes with the most correct images.

Ties are broken by class index, so a table never depends on sort stability.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch import Tensor

from repro.analyses import suite
from repro.core.errors import ReproError
from repro.analyses.predict import (
    ValOptions,
    build_folder_loader,
    options_from_cfg,
    predict_folder,
    require_root,
    to_model_labels,
)
from repro.core.registry import Registry

# A rule maps (correct counts per model, in order A then B; k) to [(group label, ranked class indices)].
RankRule = Callable[[dict[str, np.ndarray], int], list[tuple[str, list[int]]]]
RANK_RULES: Registry[RankRule] = Registry("top-10 ranking rule")

TABLE_COLUMNS = ["group", "rank", "class_index", "class_name", "model", "correct", "total", "accuracy", "difference"]


def per_class_correct(predictions: Tensor, labels: Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct count, image count) per class from predicted and true class indices."""
    return class_counts(predictions.long().cpu().eq(labels.long().cpu()), labels, num_classes)


def class_counts(hits: Tensor, labels: Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct count, image count) per class from a per-image hit mask and the true class indices."""
    labels = labels.long().cpu()
    correct = torch.bincount(labels, weights=hits.cpu().double(), minlength=num_classes)
    total = torch.bincount(labels, minlength=num_classes)
    return correct.round().long().numpy(), total.numpy()


def _ranked(score: np.ndarray, k: int) -> list[int]:
    # lexsort sorts by its last key first: descending score, then ascending class index
    order = np.lexsort((np.arange(len(score)), -score))
    return [int(i) for i in order[:k]]


@RANK_RULES.register("largest-difference")
def largest_difference(correct: dict[str, np.ndarray], k: int) -> list[tuple[str, list[int]]]:
    (a, correct_a), (b, correct_b) = correct.items()
    difference = correct_a.astype(np.int64) - correct_b.astype(np.int64)
    return [(f"{a} > {b}", _ranked(difference, k)), (f"{b} > {a}", _ranked(-difference, k))]


@RANK_RULES.register("top-correct")
def top_correct(correct: dict[str, np.ndarray], k: int) -> list[tuple[str, list[int]]]:
    return [(f"top of {name}", _ranked(counts.astype(np.int64), k)) for name, counts in correct.items()]


def top10_table(
    correct: Mapping[str, np.ndarray],
    total: np.ndarray,
    class_names: Sequence[str],
    rule: str = "largest-difference",
    k: int = 10,
) -> pd.DataFrame:
    """A tidy table, one row per (group, rank, model); ``difference`` is first model minus second, in images."""
    if len(correct) != 2:
        raise ReproError(f"the top-10 analysis compares exactly two models, got {list(correct)}")
    counts = {name: np.asarray(values) for name, values in correct.items()}
    first, second = counts.values()
    rows = [
        {
            "group": group,
            "rank": rank,
            "class_index": index,
            "class_name": class_names[index],
            "model": name,
            "correct": int(values[index]),
            "total": int(total[index]),
            "accuracy": 100.0 * values[index] / total[index] if total[index] else float("nan"),
            "difference": int(first[index]) - int(second[index]),
        }
        for group, indices in RANK_RULES.get(rule)(counts, k)
        for rank, index in enumerate(indices, start=1)
        for name, values in counts.items()
    ]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


# --------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Top10Options(ValOptions):
    other_model: Optional[nn.Module] = None  # model B, already built (e.g. the SSL TA with its linear probe)
    names: tuple[str, str] = ("teacher", "ta")
    rule: str = "largest-difference"
    k: int = 10


def evaluate_top10(
    model_a: nn.Module,
    model_b: nn.Module,
    root: str | Path,
    device: torch.device | str,
    options: Optional[Top10Options] = None,
) -> dict[str, Any]:
    """Per-class correct counts of both models on one labelled folder, ranked by ``options.rule``."""
    options = options or Top10Options()
    device = torch.device(device)
    if len(set(options.names)) != 2:
        raise ReproError(f"top10 needs two distinct model names, got {options.names}")
    loader = build_folder_loader(
        root, options.transform(), options.batch_size, options.num_workers, device.type == "cuda"
    )
    classes = loader.dataset.classes
    correct, accuracy = {}, {}
    for name, model in zip(options.names, (model_a, model_b)):
        predictions = predict_folder(model, loader, device, amp=options.amp, progress=options.progress, desc=name)
        labels = to_model_labels(predictions, classes, options.label_space)
        hits = predictions.logits.argmax(dim=1).eq(labels)
        # Rows are the folder's classes; a prediction outside them (e.g. on a val subset) is simply wrong.
        correct[name], total = class_counts(hits, predictions.labels, len(classes))
        accuracy[name] = 100.0 * hits.float().mean().item()
    table = top10_table(correct, total, classes, options.rule, options.k)
    return {
        "models": list(options.names),
        "rule": options.rule,
        "k": options.k,
        "accuracy": accuracy,
        "table": table.to_dict(orient="records"),
        "protocol": {"root": str(root), "eval_transform": options.protocol(), "n_images": int(total.sum())},
    }


@suite("top10", data="data_root",
       headline=lambda r: "top-10 accuracy " + ", ".join(f"{k} {v:.1f}" for k, v in r["accuracy"].items()))
def top10_suite(model: nn.Module, cfg: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    options = options_from_cfg(Top10Options, cfg, "top10")
    root = require_root(options, "top10")
    if options.other_model is None:
        raise ReproError("suite 'top10' compares two models: set cfg['top10']['other_model'] to the second model")
    return evaluate_top10(model, options.other_model, root, device, options)
