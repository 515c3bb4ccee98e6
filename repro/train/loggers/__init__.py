"""Run loggers: each run's per-epoch scalars and resolved config, written where a researcher watches runs.

A logger is one file registered in ``LOGGERS`` (TensorBoard, W&B; MLflow would be one more). Which loggers run is
``$REPRO_LOGGERS`` (``repro run --log NAMES`` sets it): a comma-separated list, or ``none``; unset, TensorBoard
runs when its package is installed and nothing else does. A logger only reads what the trainer computed: it never
changes a run id (the selection is not in the config) or a result.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from repro.core.errors import ReproError
from repro.core.registry import Registry

LOGGERS: Registry[type["RunLogger"]] = Registry("run logger", package=__name__)  # one module per logger
ENV = "REPRO_LOGGERS"
DEFAULT = ("tensorboard",)  # on when installed; the others only when asked


class RunLogger:
    """One run's log. ``start_epoch``: epochs already done (a resumed run logs from the next one)."""

    package = ""  # the optional package the logger needs

    def __init__(self, run_dir: Path, run_id: str, config: dict[str, Any], start_epoch: int) -> None:
        raise NotImplementedError

    @classmethod
    def available(cls) -> bool:
        import importlib.util

        try:
            return importlib.util.find_spec(cls.package) is not None
        except (ImportError, ValueError):  # a module without a spec (e.g. blocked in sys.modules)
            return False

    def log_epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def selected_loggers(value: Optional[str] = None) -> list[str]:
    """The logger names ``$REPRO_LOGGERS`` (or ``value``) asks for; an unknown or uninstalled one is an error."""
    value = os.environ.get(ENV) if value is None else value
    if value is None or value.strip() == "":
        return [name for name in DEFAULT if LOGGERS.get(name).available()]
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names == ["none"]:
        return []
    for name in names:
        logger = LOGGERS.get(name)  # an unknown name is an error naming the known ones
        if not logger.available():
            raise ReproError(f"run logger {name!r} needs the {logger.package!r} package: pip install {logger.package}")
    return names


def epoch_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as logger tags: lr, every named loss term, train/test top-1/top-5, the student's mean
    entropy, images/s."""
    tags = {"lr": "lr", "train_top1": "train/top1", "train_top5": "train/top5", "test_top1": "test/top1",
            "test_top5": "test/top5", "entropy": "student/mean_entropy", "images_per_s": "throughput/images_per_s"}
    out = {tag: float(row[key]) for key, tag in tags.items() if row.get(key) is not None}
    out.update({f"loss/{key[5:]}": float(v) for key, v in row.items() if key.startswith("loss_") and v is not None})
    return out


class EpochLog:
    """The loggers of one run (rank 0 only), opened once and closed whatever happens."""

    def __init__(self, run_dir: Path, run_id: str, config: dict[str, Any], start_epoch: int,
                 names: Optional[list[str]] = None) -> None:
        names = selected_loggers() if names is None else names
        self.loggers = [LOGGERS.get(n)(run_dir, run_id, config, start_epoch) for n in names]

    def log(self, row: dict[str, Any]) -> None:
        scalars = epoch_scalars(row)
        for logger in self.loggers:
            logger.log_epoch(int(row["epoch"]), scalars)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
