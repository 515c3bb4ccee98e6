"""Figures rendered from the run store and the tables: reported vs reproduced, entropy curves, transfer accuracy.

Each figure is two steps: a *gather* function turns store contents (or a table CSV) into a small tidy structure,
and a *plot* function draws it into a PNG with a title, axis labels and a stamp (tier, commit, date) in the corner.
The analysis figures (shape bias, ImageNet-C, top-10) are drawn by ``repro.harness.render.analysis_plots`` from
evaluation records; ``gather_*`` helpers for them live here too, so every figure reads the same kind of input.
"""
from __future__ import annotations

import datetime as dt
import math
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from repro.harness.compare import CellResult
from repro.harness.plan import Plan
from repro.core.env import git_commit
from repro.harness.render.analysis_plots import MARKERS, save_stamped
from repro.harness.store import RunStore

# What each figure file is called: the name says what it shows.
REPORTED_VS_REPRODUCED = "reported-vs-reproduced-{output}.png"
TRANSFER_FIGURE = "transfer.png"
SHAPE_BIAS_FIGURE = "shape-bias.png"
IMAGENET_C_FIGURE = "imagenet-c.png"
TOP10_FIGURE = "top10.png"


def figure_stamp(tier: str, extra: str = "") -> str:
    """The corner stamp of every figure: tier, commit, UTC date (and what else the caller adds)."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"tier={tier}  commit={git_commit()}  {when}" + (f"  {extra}" if extra else "")


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    """An Agg figure (no pyplot state) with a strip kept free at the bottom for the stamp (legends go right)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    figure.get_layout_engine().set(rect=(0, 0.035, 1, 0.965))
    FigureCanvasAgg(figure)
    return figure, list(figure.subplots(1, ncols, squeeze=False)[0])


def _wrapped(title: str, figure: Figure) -> str:
    """The title folded to the figure's width (about 9 characters per inch at the default title size)."""
    width = max(30, int(9 * figure.get_figwidth()))
    return "\n".join(textwrap.fill(line, width) for line in title.split("\n"))


def _number(value: Any) -> float:
    """A CSV or JSON value as a float (NaN for empty cells, None, or text such as 'n/a')."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


# --------------------------------------------------------------------------------------------- reported vs reproduced


def read_table_csv(path: str | Path) -> pd.DataFrame:
    """A ``tables/<output>.csv`` as written by ``repro.harness.render.tables`` (numeric columns as floats)."""
    frame = pd.read_csv(path)
    for column in ("reported_mean", "reported_std", "reproduced_mean", "reproduced_std"):
        frame[column] = frame[column].map(_number) if column in frame else math.nan
    return frame


def plot_reported_vs_reproduced(frame: pd.DataFrame, path: str | Path, stamp: str, title: str) -> Path:
    """One point per cell with a reported and a reproduced value: x reported, y reproduced, error bars = the stds
    (reported std over its runs, ours over our seeds), one colour per method, and the y = x line."""
    usable = frame.dropna(subset=["reported_mean", "reproduced_mean"])
    figure, (ax,) = _new_figure(7.5, 6.0)
    for i, (method, rows) in enumerate(usable.groupby("method", sort=False)):
        ax.errorbar(rows["reported_mean"], rows["reproduced_mean"], xerr=rows["reported_std"].fillna(0.0),
                    yerr=rows["reproduced_std"].fillna(0.0), fmt=MARKERS[i % len(MARKERS)], color=f"C{i % 10}",
                    capsize=2, linestyle="none", label=f"{method} ({len(rows)})")
    values = pd.concat([usable["reported_mean"], usable["reproduced_mean"]])
    low, high = (values.min(), values.max()) if len(values) else (0.0, 100.0)
    margin = max(1.0, 0.05 * (high - low))
    low, high = low - margin, high + margin
    ax.plot([low, high], [low, high], linestyle="--", color="0.5", linewidth=1, label="y = x")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal", adjustable="box")
    ax.grid(linestyle=":", alpha=0.4)
    ax.set_xlabel("Reported top-1 (%)")
    ax.set_ylabel("Reproduced top-1 (%)")
    ax.set_title(_wrapped(title, figure))
    skipped = len(frame) - len(usable)
    note = f"{len(usable)} cells plotted; {skipped} without a reported or a reproduced value"
    if not len(usable):
        ax.text(0.5, 0.5, "no cell has both a reported and a reproduced value yet", transform=ax.transAxes,
                ha="center", va="center", fontsize=9, color="0.3")
    ax.text(0.99, 0.01, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="0.3")
    figure.legend(loc="outside right upper", fontsize=7)
    return save_stamped(figure, path, stamp)


# --------------------------------------------------------------------------------------------- entropy curves

EntropyCurves = dict[str, dict[str, list[tuple[int, float, float]]]]  # pair -> method -> (epoch, mean, std)


def gather_entropy_curves(plan: Plan, store: RunStore) -> EntropyCurves:
    """The student's mean predictive entropy per epoch (``metrics.jsonl`` column ``entropy``), for every cell of
    the plan, averaged over the seeds that have it: ``curves[teacher -> student][method] = [(epoch, mean, std)]``."""
    curves: EntropyCurves = {}
    for cell_runs in plan.cells:
        cell = cell_runs.cell
        pair = f"{cell.teacher} → {cell.student}" if cell.teacher else cell.student
        curves.setdefault(pair, {})  # every pair gets a panel, with or without runs yet
        by_epoch: dict[int, list[float]] = defaultdict(list)
        for run_id in cell_runs.run_ids:
            for row in store.metrics(run_id):
                if row.get("entropy") is not None:
                    by_epoch[int(row["epoch"])].append(float(row["entropy"]))
        if by_epoch:
            curves[pair][cell.method] = [
                (epoch, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
                for epoch, values in sorted(by_epoch.items())
            ]
    return curves


def plot_entropy_curves(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float, float]]]], path: str | Path,
                        stamp: str, title: str = "Student's mean predictive entropy during training") -> Path:
    """One panel per teacher/student pair, one line per method (a band of ± one seed std when there are several);
    a method keeps its colour across panels."""
    pairs = list(curves) or ["(no runs yet)"]
    methods = list(dict.fromkeys(m for per_pair in curves.values() for m in per_pair))
    colours = {method: f"C{i % 10}" for i, method in enumerate(methods)}
    figure, axes = _new_figure(4.2 * len(pairs), 4.0, ncols=len(pairs))
    for ax, pair in zip(axes, pairs):
        for method, points in curves.get(pair, {}).items():
            epochs, means, stds = (np.array(column, dtype=float) for column in zip(*points))
            ax.plot(epochs, means, marker=MARKERS[methods.index(method) % len(MARKERS)], markersize=3,
                    color=colours[method], label=method)
            if stds.any():
                ax.fill_between(epochs, means - stds, means + stds, color=colours[method], alpha=0.2, linewidth=0)
        if not curves.get(pair):
            ax.text(0.5, 0.5, "no entropy logged yet", transform=ax.transAxes, ha="center", va="center")
        ax.set_title(pair, fontsize=10)
        ax.set_xlabel("Epoch")
        ax.set_ylabel("Mean predictive entropy H(q) (nats)")
        ax.grid(linestyle=":", alpha=0.4)
    handles = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    if handles:
        figure.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8)
    figure.suptitle(_wrapped(title, figure))
    return save_stamped(figure, path, stamp)


# --------------------------------------------------------------------------------------------- transfer


def gather_transfer(results: Sequence[CellResult], store: RunStore, model_names: Mapping[str, str]) -> pd.DataFrame:
    """One row per fine-tuned cell that has results: ``model`` (``model_names[cell.student]``, plus the spec it
    starts from for a cell initialised from another spec's run), ``dataset`` (read from the run's own config, so
    the label is what was trained on), ``mean``/``std`` top-1, reported value."""
    rows = []
    for result in results:
        if result.mean is None or not result.run_ids:
            continue
        config = store.config(result.run_ids[0]) or {}
        dataset = config.get("recipe", {}).get("data", {}).get("name", "?")
        model = model_names.get(result.cell.student, result.cell.student)
        if result.cell.init_from is not None:
            model += f" from {result.cell.init_from.spec}"
        rows.append({"model": model, "dataset": dataset,
                     "mean": result.mean, "std": result.std if result.std is not None else 0.0,
                     "reported": result.reported.mean, "metric": result.metric, "n": result.n})
    return pd.DataFrame(rows, columns=["model", "dataset", "mean", "std", "reported", "metric", "n"])


def plot_transfer(frame: pd.DataFrame, path: str | Path, stamp: str,
                  title: str = "Transfer: top-1 after fine-tuning on CIFAR") -> Path:
    """Grouped bars: models on x, one bar per dataset (error bar = seed std), reported values as black ticks."""
    models = list(dict.fromkeys(frame["model"])) or ["(no runs yet)"]
    datasets = list(dict.fromkeys(frame["dataset"]))
    figure, (ax,) = _new_figure(max(6.0, 1.3 * len(models) + 2.0), 4.8)
    width = 0.8 / max(len(datasets), 1)
    x = np.arange(len(models))
    for i, dataset in enumerate(datasets):
        rows = frame[frame["dataset"] == dataset].set_index("model").reindex(models)
        positions = x - 0.4 + width * (i + 0.5)
        ax.bar(positions, rows["mean"].to_numpy(dtype=float), width, yerr=rows["std"].to_numpy(dtype=float),
               capsize=2, color=f"C{i % 10}", label=dataset)
        reported = rows["reported"].to_numpy(dtype=float)
        if np.isfinite(reported).any():
            ax.scatter(positions, reported, marker="_", s=200, color="black", zorder=3,
                       label="reported" if i == 0 else None)
    if frame.empty:
        ax.text(0.5, 0.5, "no fine-tuning run has finished yet", transform=ax.transAxes, ha="center", va="center")
    ax.set_xticks(x, models, rotation=30, ha="right")
    ax.set_xlabel("Model (fine-tuned from its ImageNet weights)")
    metrics = sorted(set(frame["metric"])) or ["best"]
    ax.set_ylabel(f"Top-1 (%), {'/'.join(metrics)} epoch")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", linestyle=":", alpha=0.4)
    ax.set_title(_wrapped(title, figure))
    if datasets:
        figure.legend(loc="outside right upper", fontsize=8)
    return save_stamped(figure, path, stamp)


# --------------------------------------------------------------------------------------------- analyses


def gather_shape_bias(records: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, dict], dict[str, Optional[float]]]:
    """(per-class shape bias, overall shape bias) per model label, from evaluation records with a shape-bias suite."""
    per_class, overall = {}, {}
    for label, record in records.items():
        result = record.get("suites", {}).get("shape-bias")
        if result:
            per_class[label] = dict(result["per_class"])
            overall[label] = result["shape_bias"]
    return per_class, overall


def gather_imagenet_c(records: Mapping[str, Mapping[str, Any]], value: str = "ce") -> dict[str, dict[str, float]]:
    """Per-corruption ``ce`` (AlexNet-normalised, benchmark corruptions) or ``error`` per model label."""
    out = {}
    for label, record in records.items():
        result = record.get("suites", {}).get("imagenet-c")
        if result:
            out[label] = dict(result[value])
    return out


def gather_top10(records: Mapping[str, Mapping[str, Any]]) -> Optional[pd.DataFrame]:
    """The first record's top-10 table (the teacher-vs-TA comparison), as the tidy frame plot_top10 draws."""
    for record in records.values():
        result = record.get("suites", {}).get("top10")
        if result:
            return pd.DataFrame(result["table"])
    return None
