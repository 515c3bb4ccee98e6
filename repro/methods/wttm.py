"""Weighted TTM: TTM with each sample's KL weighted by U = sum_j softmax(v)_j^gamma (wttm.md 1.3)."""
from __future__ import annotations

from torch import Tensor

from repro.losses import wttm_loss
from repro.methods.base import LOSS_TERMS, Batch, LossTerm, Outputs, TermContext


@LOSS_TERMS.register("wttm")
class WTTM(LossTerm):
    def __init__(self, ctx: TermContext, gamma: float) -> None:
        super().__init__(ctx)
        self.gamma = float(gamma)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        return wttm_loss(out.logits, out.teacher_logits, self.gamma)
