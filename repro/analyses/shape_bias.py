"""Shape bias on the cue-conflict stimuli (Geirhos et al., ICLR 2019), computed as model-vs-human does.

Layout read (rgeirhos/texture-vs-shape ``stimuli/style-transfer-preprocessed-512``): ``<root>/<shape class>/
<shape><i>-<texture><j>.png``, e.g. ``airplane/airplane1-bicycle2.png`` has shape airplane and texture bicycle. The
folder gives the shape class; the texture class is the part after the last ``-`` without its digits (an optional
experiment prefix ending in ``_``, as in model-vs-human's raw data, is ignored).

Decision: softmax over the 1000 ImageNet classes, then each of the 16 classes scores the MEAN probability of its
ImageNet indices (``repro/data/shape_bias_16class.json``, from model-vs-human), top-1 of the 16.
Shape bias: images whose shape and texture classes agree are dropped (no conflict), then
``shape decisions / (shape decisions + texture decisions)``; per class, the images of that shape class.
"""
from __future__ import annotations

import functools
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from repro.analyses import suite
from repro.core.errors import ReproError
from repro.analyses.predict import EvalOptions, build_folder_loader, options_from_cfg, predict_folder, require_root

SIXTEEN_CLASS_FILE = Path(__file__).resolve().parent.parent / "data" / "shape_bias_16class.json"

AGGREGATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": lambda probs: probs.mean(dim=-1),  # model-vs-human's default, the published protocol
    "max": lambda probs: probs.amax(dim=-1),
    "sum": lambda probs: probs.sum(dim=-1),
}


@functools.lru_cache(maxsize=1)
def _sixteen_class_table() -> dict[str, Any]:
    with open(SIXTEEN_CLASS_FILE) as f:
        return json.load(f)


def sixteen_class_indices() -> dict[str, list[int]]:
    """The 16 categories (sorted) and the ImageNet-1k class indices each one aggregates."""
    return {name: list(entry["indices"]) for name, entry in _sixteen_class_table()["categories"].items()}


CATEGORIES: tuple[str, ...] = tuple(sixteen_class_indices())


def map_to_16_classes(probs: Tensor, aggregation: str = "mean") -> Tensor:
    """``[N, 1000]`` ImageNet probabilities -> ``[N, 16]`` category scores, columns in ``CATEGORIES`` order."""
    if aggregation not in AGGREGATIONS:
        raise ReproError(f"unknown 16-class aggregation {aggregation!r}; known: {sorted(AGGREGATIONS)}")
    if probs.shape[-1] != 1000:
        raise ReproError(f"shape bias needs 1000-way ImageNet outputs, got {probs.shape[-1]}")
    reduce = AGGREGATIONS[aggregation]
    columns = [reduce(probs[..., indices]) for indices in sixteen_class_indices().values()]
    return torch.stack(columns, dim=-1)


_PREFIX = re.compile(r"^.*_")  # e.g. "0001_cc_dnn_" in model-vs-human's trial file names
_DIGITS = re.compile(r"\d+")


def texture_class_from_filename(filename: str) -> str:
    """``airplane1-bicycle2.png`` -> ``bicycle``."""
    stem = _PREFIX.sub("", Path(filename).name).rsplit(".", 1)[0]
    if "-" not in stem:
        raise ReproError(f"cue-conflict file {filename!r} is not named <shape><i>-<texture><j>.<ext>")
    return _DIGITS.sub("", stem.rsplit("-", 1)[1])


def shape_bias_from_decisions(
    shapes: Sequence[str], textures: Sequence[str], decisions: Sequence[str]
) -> dict[str, Any]:
    """Shape bias overall and per shape class from one decision (a 16-class name) per image.

    ``fraction_shape``/``fraction_texture`` are over all images (as in model-vs-human), which leaves their ratio,
    the shape bias, unchanged. A bias with no shape or texture decision at all is None.
    """
    if not len(shapes) == len(textures) == len(decisions):
        raise ReproError("shapes, textures and decisions must have one entry per image")
    conflict = [(s, t, d) for s, t, d in zip(shapes, textures, decisions) if s != t]
    shape_hits = Counter(s for s, t, d in conflict if d == s)
    texture_hits = Counter(s for s, t, d in conflict if d == t)
    n_shape, n_texture = sum(shape_hits.values()), sum(texture_hits.values())

    def bias(shape: int, texture: int) -> Optional[float]:
        return shape / (shape + texture) if shape + texture else None

    classes = sorted({s for s, _, _ in conflict})
    return {
        "shape_bias": bias(n_shape, n_texture),
        "fraction_shape": n_shape / len(shapes) if shapes else None,
        "fraction_texture": n_texture / len(shapes) if shapes else None,
        "n_images": len(shapes),
        "n_cue_conflict": len(conflict),
        "n_shape_decisions": n_shape,
        "n_texture_decisions": n_texture,
        "per_class": {c: bias(shape_hits[c], texture_hits[c]) for c in classes},
        "per_class_counts": {c: {"shape": shape_hits[c], "texture": texture_hits[c]} for c in classes},
    }


# --------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class ShapeBiasOptions(EvalOptions):
    aggregation: str = "mean"
    # resize_size stays None: the stimuli are 224 px and model-vs-human feeds them unresized to 224-px models.


def _stimulus_classes(classes: Sequence[str], paths: Sequence[str]) -> tuple[list[str], list[str]]:
    unknown = sorted(set(classes) - set(CATEGORIES))
    if unknown:
        raise ReproError(f"cue-conflict folders must be the 16 categories {list(CATEGORIES)}; unexpected: {unknown}")
    shapes = [Path(p).parent.name for p in paths]
    textures = [texture_class_from_filename(p) for p in paths]
    odd = sorted({t for t in textures if t not in CATEGORIES})
    if odd:
        raise ReproError(f"cue-conflict file names carry unknown texture classes {odd}")
    return shapes, textures


def evaluate_shape_bias(
    model: nn.Module, root: str | Path, device: torch.device | str, options: Optional[ShapeBiasOptions] = None
) -> dict[str, Any]:
    options = options or ShapeBiasOptions()
    device = torch.device(device)
    loader = build_folder_loader(
        root, options.transform(), options.batch_size, options.num_workers, device.type == "cuda"
    )
    predictions = predict_folder(model, loader, device, amp=options.amp, progress=options.progress, desc="cue-conflict")
    shapes, textures = _stimulus_classes(loader.dataset.classes, predictions.paths)
    scores = map_to_16_classes(predictions.logits.softmax(dim=-1), options.aggregation)
    decisions = [CATEGORIES[i] for i in scores.argmax(dim=-1).tolist()]
    result = shape_bias_from_decisions(shapes, textures, decisions)
    # Accuracy on the shape label over all images: the "low cue-conflict accuracy" users ask about.
    result["shape_accuracy"] = 100.0 * sum(d == s for d, s in zip(decisions, shapes)) / len(shapes)
    result["protocol"] = {
        "root": str(root),
        "stimuli": "cue-conflict (texture-vs-shape style-transfer-preprocessed-512 layout)",
        "decision": f"softmax over 1000 classes, {options.aggregation} of each category's ImageNet indices, "
        "top-1 of 16",
        "excluded": "images whose shape class equals their texture class",
        "eval_transform": options.protocol(),
    }
    return result


@suite("shape-bias", data="cue_conflict_root",
       headline=lambda r: "shape bias " + ("n/a" if r["shape_bias"] is None else f"{r['shape_bias']:.3f}"))
def shape_bias_suite(model: nn.Module, cfg: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    options = options_from_cfg(ShapeBiasOptions, cfg, "shape-bias")
    root = require_root(options, "shape-bias")
    return evaluate_shape_bias(model, root, device, options)
