"""TensorBoard event files in the run's folder, next to its ``metrics.jsonl`` (``tensorboard --logdir runs``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from repro.train.loggers import LOGGERS, RunLogger


@LOGGERS.register("tensorboard")
class TensorBoardLogger(RunLogger):
    package = "tensorboard"

    def __init__(self, run_dir: Path, run_id: str, config: dict[str, Any], start_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run's events after its checkpoint (logged before it was killed) are dropped.
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_epoch + 1 if start_epoch else None)
        if not start_epoch:
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            self.writer.add_text("config", f"{run_id}\n\n```json\n{text}\n```")  # the resolved config

    def log_epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=epoch)
        self.writer.flush()  # a run watched while it trains shows every finished epoch

    def close(self) -> None:
        self.writer.close()
