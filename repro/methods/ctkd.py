"""CTKD (zhengli97/CTKD): a learnable global temperature with a gradient-reversal curriculum, plugged into KD or
DKD. The temperature's parameter is trained with the student (the official optimizer holds both, with the same
SGD settings and weight decay)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from repro.core.domains import FINITE, NONNEGATIVE, POSITIVE, POSITIVE_INT, one_of, optional
from repro.core.errors import ReproError
from repro.losses import dkd_loss, kd_loss
from repro.losses.ctkd import curriculum_temperature, reversal_strength
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext

BASES = ("kd", "dkd")


@LOSS_TERMS.register("ctkd")
class CTKD(LossTerm):
    domains = {"base": one_of(*BASES), "alpha": optional(NONNEGATIVE), "beta": optional(NONNEGATIVE),
               "t_start": NONNEGATIVE, "t_end": POSITIVE, "loops": POSITIVE_INT, "init": FINITE}

    # Defaults: train_student.py (--t_start 1, --t_end 20, --dkd_alpha 1, --dkd_beta 2), models/temp_global.py
    # (theta = ones(1)), scripts/run_imagenet_distill.sh (cosine decay 0 -> -1 over --decay_loops 5 epochs;
    # CIFAR's script uses 10). ``alpha``/``beta`` are DKD's and only mean something with base dkd.
    def __init__(self, ctx: TermContext, base: str = "kd", alpha: Optional[float] = None,
                 beta: Optional[float] = None, t_start: float = 1.0, t_end: float = 20.0, loops: int = 5,
                 init: float = 1.0) -> None:
        super().__init__(ctx)
        if base not in BASES:
            raise ReproError(f"ctkd: unknown base {base!r}; known: {', '.join(BASES)}")
        if base == "kd" and (alpha is not None or beta is not None):
            raise ReproError("ctkd: alpha and beta are DKD's weights; give them only with base: dkd")
        if int(loops) < 1:
            raise ReproError(f"ctkd: loops must be at least 1 epoch, got {loops}")
        self.base = base
        self.alpha = 1.0 if alpha is None else float(alpha)
        self.beta = 2.0 if beta is None else float(beta)
        self.t_start, self.t_end, self.loops = float(t_start), float(t_end), int(loops)
        self.theta = nn.Parameter(torch.tensor(float(init), device=ctx.device))

    def temperature(self, epoch: int) -> Tensor:
        return curriculum_temperature(self.theta, reversal_strength(epoch, self.loops), self.t_start, self.t_end)

    def report(self) -> dict[str, Any]:
        """The learned temperature as it stands when the result is written (the end of training)."""
        with torch.no_grad():
            tau = self.t_start + self.t_end * torch.sigmoid(self.theta)
        return {"base": self.base, "temperature": float(tau)}

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        t = self.temperature(batch.epoch)
        if self.base == "dkd":
            return dkd_loss(out.logits, out.teacher_logits, batch.labels, self.alpha, self.beta, t)
        return kd_loss(out.logits, out.teacher_logits, t)
