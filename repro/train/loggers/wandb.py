"""Weights & Biases: off unless asked (``--log wandb``); offline unless ``WANDB_MODE`` says otherwise, with its
files in the run's folder. The W&B run id is the repro run id, so a resumed run continues the same W&B run."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from repro.train.loggers import LOGGERS, RunLogger


@LOGGERS.register("wandb")
class WandbLogger(RunLogger):
    package = "wandb"

    def __init__(self, run_dir: Path, run_id: str, config: dict[str, Any], start_epoch: int) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("REPRO_WANDB_PROJECT", "repro"), id=run_id, name=run_id,
                              config=config, dir=str(run_dir), resume="allow",
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log_epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, "epoch": epoch}, step=epoch)

    def close(self) -> None:
        self.run.finish()
