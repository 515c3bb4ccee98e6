"""Figures of the analysis experiments: shape bias, ImageNet-C, top-10 categories.

Each function draws one PNG with a title, axis labels and a ``stamp`` (e.g. "tier=smoke  commit=abc123") in the
corner, so a figure never travels without saying what produced it. Figures are built with the object-oriented
matplotlib API on an Agg canvas: no pyplot global state, no display needed, safe in worker processes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    figure = Figure(figsize=(width, height), layout="constrained")
    figure.get_layout_engine().set(rect=(0, 0, 1, 0.96))  # keep a strip at the top for the stamp
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, list(axes)


def save_stamped(figure: Figure, path: str | Path, stamp: str, corner: str = "bottom right") -> Path:
    """Write ``figure`` as a 150-dpi file with its stamp (what produced it) in small grey type in one corner."""
    vertical, horizontal = corner.split()
    figure.text(0.995 if horizontal == "right" else 0.005, 0.995 if vertical == "top" else 0.005, stamp,
                ha=horizontal, va=vertical, fontsize=7, color="0.4")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    return path


def _imagenet_c_names() -> tuple[list[str], list[str]]:
    """(benchmark, extra) corruption names, from the same data file the evaluation uses."""
    with open(Path(__file__).resolve().parent.parent.parent / "data" / "alexnet_imagenet_c.json") as f:
        table = json.load(f)
    return list(table["benchmark"]), list(table["extra"])


def _finite(value: Optional[float]) -> float:
    return np.nan if value is None else float(value)


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else np.nan


def plot_shape_bias(
    results: Mapping[str, Mapping[str, Optional[float]]],
    path: str | Path,
    stamp: str,
    overall: Optional[Mapping[str, Optional[float]]] = None,
    title: str = "Shape bias on cue-conflict stimuli",
) -> Path:
    """Geirhos-style: categories on y, fraction of shape decisions on x (texture on the top axis), one marker series
    per model and a vertical line at each model's overall shape bias (``overall[model]``; when not given, the mean
    over its categories, which is not the pooled value and is labelled as such)."""
    classes = sorted({c for per_class in results.values() for c in per_class})
    figure, (ax,) = _new_figure(6.5, 0.32 * len(classes) + 2.0)
    positions = np.arange(len(classes))
    for i, (model, per_class) in enumerate(results.items()):
        values = np.array([_finite(per_class.get(c)) for c in classes])
        pooled = overall.get(model) if overall else None
        mean = _finite(pooled) if pooled is not None else _nanmean(values)
        colour = f"C{i % 10}"
        label = f"{model} ({'' if pooled is not None else 'class mean '}{mean:.2f})"
        ax.scatter(values, positions, marker=MARKERS[i % len(MARKERS)], color=colour, label=label, zorder=3)
        if np.isfinite(mean):
            ax.axvline(mean, color=colour, linewidth=1.2, alpha=0.8)
    ax.set_yticks(positions, classes)
    ax.set_ylim(-0.5, len(classes) - 0.5)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.grid(axis="y", linestyle=":", alpha=0.4)
    ax.set_xlabel("Fraction of 'shape' decisions")
    ax.set_ylabel("Shape category")
    top = ax.secondary_xaxis("top", functions=(lambda x: 1 - x, lambda x: 1 - x))
    top.set_xlabel("Fraction of 'texture' decisions")
    ax.set_title(title)
    figure.legend(loc="outside lower center", ncols=2, fontsize=8)
    return save_stamped(figure, path, stamp, corner="top left")


def plot_imagenet_c(
    results: Mapping[str, Mapping[str, float]],
    path: str | Path,
    stamp: str,
    metric: str = "Corruption error (%)",
    corruption_order: Optional[Sequence[str]] = None,
    title: str = "ImageNet-C",
) -> Path:
    """Grouped bars: corruptions on x, one bar per model, each model's mean over the benchmark corruptions shown
    as a dashed line; the extra corruptions (never part of mCE) sit apart after a dotted separator.

    ``results[model][corruption]`` is any per-corruption value (CE, error or accuracy, named by ``metric``);
    corruptions appear in ``corruption_order`` (default: the benchmark order, then the extra ones, then others).
    """
    benchmark, extra = _imagenet_c_names()
    names = {c for values in results.values() for c in values}
    default_order = [*benchmark, *extra, *sorted(names - set(benchmark) - set(extra))]
    order = [c for c in (corruption_order or default_order) if c in names]
    averaged = [c for c in order if c in benchmark] or order
    figure, (ax,) = _new_figure(max(6.0, 0.55 * len(order) + 2.0), 4.6)
    width = 0.8 / max(len(results), 1)
    x = np.arange(len(order))
    for i, (model, values) in enumerate(results.items()):
        heights = np.array([_finite(values.get(c)) for c in order])
        mean = _nanmean(np.array([_finite(values.get(c)) for c in averaged]))
        colour = f"C{i % 10}"
        ax.bar(x - 0.4 + width * (i + 0.5), heights, width, color=colour, label=f"{model} (mean {mean:.1f})")
        if np.isfinite(mean):
            ax.axhline(mean, color=colour, linestyle="--", linewidth=1)
    first_extra = next((i for i, c in enumerate(order) if c in extra), None)
    if first_extra is not None and first_extra > 0:
        ax.axvline(first_extra - 0.5, color="0.3", linestyle=":", linewidth=1)
        ax.text(
            first_extra - 0.45, 0.98, "extra (not in mCE)", transform=ax.get_xaxis_transform(), va="top", fontsize=7
        )
    ax.set_xticks(x, [c.replace("_", " ") for c in order], rotation=45, ha="right")
    ax.set_xlabel("Corruption")
    ax.set_ylabel(metric)
    ax.set_title(title)
    figure.legend(loc="outside lower center", ncols=min(len(results), 4), fontsize=8)
    return save_stamped(figure, path, stamp, corner="top left")


def plot_top10(
    table: pd.DataFrame,
    path: str | Path,
    stamp: str,
    title: str = "Top-10 categories",
    class_labels: Optional[Mapping[str, str]] = None,
) -> Path:
    """Grouped bars of correct counts per class, one panel per group of the table (``repro.analyses.top10``).

    ``class_labels`` renames the table's class names on the axis (e.g. WNID -> "water snake").
    """
    groups = list(dict.fromkeys(table["group"]))
    models = list(dict.fromkeys(table["model"]))
    labels = class_labels or {}
    figure, axes = _new_figure(5.5 * len(groups), 4.8, ncols=len(groups))
    width = 0.8 / len(models)
    for ax, group in zip(axes, groups):
        rows = table[table["group"] == group].sort_values("rank")
        ranked = list(dict.fromkeys(rows["class_name"]))
        x = np.arange(len(ranked))
        for i, model in enumerate(models):
            counts = rows[rows["model"] == model].set_index("class_name").loc[ranked, "correct"]
            ax.bar(x - 0.4 + width * (i + 0.5), counts.to_numpy(), width, color=f"C{i % 10}", label=model)
        ax.set_xticks(x, [labels.get(name, name) for name in ranked], rotation=45, ha="right")
        ax.set_xlabel("Class")
        ax.set_ylabel("Correctly classified images")
        ax.set_title(group)
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", ncols=len(models), fontsize=8)
    figure.suptitle(title)
    return save_stamped(figure, path, stamp, corner="top left")
