"""Hinton KD (the CRD-style baseline is ce 0.1 + kd 0.9 at T=4)."""
from __future__ import annotations

from torch import Tensor

from repro.losses import kd_loss
from repro.core.domains import POSITIVE
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext


@LOSS_TERMS.register("kd")
class KD(LossTerm):
    domains = {"temperature": POSITIVE}

    def __init__(self, ctx: TermContext, temperature: float = 4.0) -> None:
        super().__init__(ctx)
        self.temperature = float(temperature)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        return kd_loss(out.logits, out.teacher_logits, self.temperature)
