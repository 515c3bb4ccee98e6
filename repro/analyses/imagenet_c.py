"""ImageNet-C (Hendrycks & Dietterich, 2019): corruption error normalised by AlexNet, on the released JPEGs.

Layout read: ``<root>/<corruption>/<severity 1-5>/<wnid>/*.JPEG`` (the Zenodo tarballs unpacked in one folder).

Metric, per corruption c over severities s: ``E_c = mean_s err_{c,s}``, ``CE_c = 100 * E_c / E_c^AlexNet`` and
``mCE = mean_c CE_c`` over the 15 benchmark corruptions. The 4 extra ("validation") corruptions are reported apart
and never enter mCE; hendrycks' own test.py prints an unnormalised average over all 19, a frequent source of wrong
numbers, so this module reports both the normalised mCE and the unnormalised mean error of the same corruptions.
AlexNet's errors are data keyed by corruption name (``repro/data/alexnet_imagenet_c.json``), never a positional list.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from repro.analyses import suite
from repro.core.errors import ReproError
from repro.analyses.predict import (
    EvalOptions,
    build_folder_loader,
    options_from_cfg,
    predict_folder,
    require_root,
    resolve_label_space,
    to_model_labels,
)

ALEXNET_FILE = Path(__file__).resolve().parent.parent / "data" / "alexnet_imagenet_c.json"
SEVERITIES = (1, 2, 3, 4, 5)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@functools.lru_cache(maxsize=1)
def _alexnet_table() -> dict[str, Any]:
    with open(ALEXNET_FILE) as f:
        return json.load(f)


def alexnet_errors() -> dict[str, float]:
    """AlexNet's top-1 error per benchmark corruption (fraction, mean over severities), keyed by name."""
    return dict(_alexnet_table()["alexnet_error"])


BENCHMARK_CORRUPTIONS: tuple[str, ...] = tuple(_alexnet_table()["benchmark"])
EXTRA_CORRUPTIONS: tuple[str, ...] = tuple(_alexnet_table()["extra"])
ALL_CORRUPTIONS = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS


# --------------------------------------------------------------------------------------------- the metric


def _check_names(names: Iterable[str], allowed: Sequence[str], what: str) -> None:
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ReproError(f"unknown {what} corruption(s) {unknown}; known: {list(allowed)}")


def _mean_errors(
    errors: Mapping[tuple[str, int], float], corruptions: Sequence[str], severities: Sequence[int]
) -> dict[str, float]:
    """E_c (fraction) for each corruption; every (corruption, severity) must be present."""
    missing = [(c, s) for c in corruptions for s in severities if (c, s) not in errors]
    if missing:
        absent = sorted({c for c in corruptions if all((c, s) not in errors for s in severities)})
        partial = [(c, s) for c, s in missing if c not in absent]
        parts = [f"missing corruption(s) {absent}"] if absent else []
        parts += [f"missing (corruption, severity) {partial}"] if partial else []
        raise ReproError("ImageNet-C errors incomplete: " + "; ".join(parts))
    bad = {(c, s): errors[(c, s)] for c in corruptions for s in severities if not 0.0 <= errors[(c, s)] <= 1.0}
    if bad:
        raise ReproError(f"ImageNet-C errors must be fractions in [0, 1], got {bad}")
    return {c: sum(errors[(c, s)] for s in severities) / len(severities) for c in corruptions}


def mce_from_errors(
    errors: Mapping[tuple[str, int], float],
    corruptions: Sequence[str] = BENCHMARK_CORRUPTIONS,
    extra_corruptions: Sequence[str] = (),
    severities: Sequence[int] = SEVERITIES,
) -> dict[str, Any]:
    """mCE and friends from top-1 errors (fractions) keyed by ``(corruption, severity)``.

    Returns values in percent: ``error`` (E_c for every corruption asked, benchmark and extra), ``ce`` (AlexNet-
    normalised, benchmark corruptions only), ``mce``, ``mean_error`` and ``mean_accuracy`` over ``corruptions``,
    ``extra_mean_error`` over ``extra_corruptions`` (None when none), and ``complete_benchmark`` (False when
    ``corruptions`` is a subset of the 15, e.g. a smoke run: such an mCE is not comparable to published ones).
    """
    _check_names(corruptions, BENCHMARK_CORRUPTIONS, "benchmark")
    _check_names(extra_corruptions, EXTRA_CORRUPTIONS, "extra")
    if not corruptions:
        raise ReproError("mCE needs at least one benchmark corruption")
    alexnet = alexnet_errors()
    mean_error = _mean_errors(errors, corruptions, severities)
    extra_error = _mean_errors(errors, extra_corruptions, severities)
    ce = {c: 100.0 * mean_error[c] / alexnet[c] for c in corruptions}
    benchmark_error = 100.0 * sum(mean_error.values()) / len(corruptions)
    return {
        "mce": sum(ce.values()) / len(ce),
        "mean_error": benchmark_error,
        "mean_accuracy": 100.0 - benchmark_error,
        "extra_mean_error": 100.0 * sum(extra_error.values()) / len(extra_error) if extra_error else None,
        "ce": ce,
        "error": {c: 100.0 * e for c, e in {**mean_error, **extra_error}.items()},
        "error_by_severity": {
            c: {s: 100.0 * errors[(c, s)] for s in severities} for c in (*corruptions, *extra_corruptions)
        },
        "corruptions": list(corruptions),
        "extra_corruptions": list(extra_corruptions),
        "severities": list(severities),
        "complete_benchmark": set(corruptions) == set(BENCHMARK_CORRUPTIONS) and set(severities) == set(SEVERITIES),
        "alexnet_error": {c: alexnet[c] for c in corruptions},
    }


# --------------------------------------------------------------------------------------------- the layout


def _class_folders(folder: Path) -> set[str]:
    return {entry.name for entry in folder.iterdir() if entry.is_dir()}


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*"))


def check_imagenet_c_layout(
    root: str | Path, corruptions: Sequence[str], severities: Sequence[int] = SEVERITIES
) -> dict[tuple[str, int], Path]:
    """The folder of each (corruption, severity); one ReproError naming everything missing or partial."""
    root = Path(root)
    if not root.is_dir():
        raise ReproError(f"ImageNet-C folder {root} does not exist")
    problems: list[str] = []
    cells: dict[tuple[str, int], Path] = {}
    classes: dict[tuple[str, int], set[str]] = {}
    for corruption in corruptions:
        if not (root / corruption).is_dir():
            problems.append(f"corruption folder {corruption}/ is missing")
            continue
        for severity in severities:
            folder = root / corruption / str(severity)
            if not folder.is_dir():
                problems.append(f"{corruption}/{severity}/ is missing")
                continue
            names = _class_folders(folder)
            if not names or not _has_images(folder):
                problems.append(f"{corruption}/{severity}/ has no <wnid>/ image folders")
            else:
                cells[(corruption, severity)] = folder
                classes[(corruption, severity)] = names
    # A partial download or extraction shows up as cells with fewer class folders than the others.
    union = set().union(*classes.values()) if classes else set()
    for key, names in classes.items():
        if names != union:
            lacking = sorted(union - names)
            problems.append(f"{key[0]}/{key[1]}/ lacks {len(lacking)} class folder(s), e.g. {lacking[:3]}")
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ReproError(f"ImageNet-C folder {root} is incomplete (expected <corruption>/<1-5>/<wnid>/*.JPEG): {shown}")
    return cells


# --------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class ImageNetCOptions(EvalOptions):
    corruptions: tuple[str, ...] = BENCHMARK_CORRUPTIONS
    # The 4 extra corruptions ship in a separate archive; opt in with extra_corruptions: [speckle_noise, ...].
    extra_corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = SEVERITIES
    # resize_size stays None: hendrycks' test.py only centre-crops the released 224-px JPEGs.


def top1_error(
    model: nn.Module, folder: Path, options: EvalOptions, device: torch.device, desc: str
) -> tuple[float, int, str]:
    """(top-1 error as a fraction, number of images, resolved label space) of ``model`` on one image folder."""
    loader = build_folder_loader(
        folder, options.transform(), options.batch_size, options.num_workers, device.type == "cuda"
    )
    predictions = predict_folder(model, loader, device, amp=options.amp, progress=options.progress, desc=desc)
    labels = to_model_labels(predictions, loader.dataset.classes, options.label_space)
    wrong = predictions.logits.argmax(dim=1).ne(labels).float().mean().item()
    space = resolve_label_space(loader.dataset.classes, predictions.logits.shape[1], options.label_space)
    return wrong, len(labels), space


def evaluate_imagenet_c(
    model: nn.Module, root: str | Path, device: torch.device | str, options: Optional[ImageNetCOptions] = None
) -> dict[str, Any]:
    """Top-1 error on every (corruption, severity) of the JPEG folder, then ``mce_from_errors``."""
    options = options or ImageNetCOptions()
    device = torch.device(device)
    wanted = (*options.corruptions, *options.extra_corruptions)
    _check_names(options.corruptions, BENCHMARK_CORRUPTIONS, "benchmark")
    _check_names(options.extra_corruptions, EXTRA_CORRUPTIONS, "extra")
    cells = check_imagenet_c_layout(root, wanted, options.severities)
    errors: dict[tuple[str, int], float] = {}
    counts: dict[str, int] = {}
    spaces: set[str] = set()
    for (corruption, severity), folder in cells.items():
        errors[(corruption, severity)], counts[f"{corruption}/{severity}"], space = top1_error(
            model, folder, options, device, desc=f"{corruption}/{severity}"
        )
        spaces.add(space)
    result = mce_from_errors(errors, options.corruptions, options.extra_corruptions, options.severities)
    result["n_images"] = counts
    result["protocol"] = {
        "root": str(root),
        "source": "JPEG on disk (released ImageNet-C layout), not in-memory corruption",
        "benchmark_corruptions": list(options.corruptions),
        "extra_corruptions_reported_apart": list(options.extra_corruptions),
        "severities": list(options.severities),
        "metric": "top-1 error; CE normalised by AlexNet errors keyed by corruption name",
        "eval_transform": options.protocol(),
        "label_space": sorted(spaces),
    }
    return result


@suite("imagenet-c", data="imagenet_c_root",
       headline=lambda r: f"mCE {r['mce']:.1f}{'' if r['complete_benchmark'] else ' (subset)'}")
def imagenet_c_suite(model: nn.Module, cfg: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    options = options_from_cfg(ImageNetCOptions, cfg, "imagenet-c")
    root = require_root(options, "imagenet-c")
    return evaluate_imagenet_c(model, root, device, options)
