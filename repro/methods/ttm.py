"""Transformed Teacher Matching (Zheng & Yang, ICLR 2024): power-transformed teacher, untempered student."""
from __future__ import annotations

from torch import Tensor

from repro.losses import ttm_loss
from repro.core.domains import POSITIVE
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext


@LOSS_TERMS.register("ttm")
class TTM(LossTerm):
    domains = {"gamma": POSITIVE}  # gamma = 1/T of the power transform

    def __init__(self, ctx: TermContext, gamma: float) -> None:
        super().__init__(ctx)
        self.gamma = float(gamma)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        return ttm_loss(out.logits, out.teacher_logits, self.gamma)
