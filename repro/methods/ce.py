"""Cross-entropy on the labels: the teachers, the tables' "Student" rows and the CE part of every method."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from repro.core.domains import PROBABILITY
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext


@LOSS_TERMS.register("ce")
class CrossEntropy(LossTerm):
    needs_teacher = False
    domains = {"label_smoothing": PROBABILITY}

    def __init__(self, ctx: TermContext, label_smoothing: float = 0.0) -> None:
        super().__init__(ctx)
        self.label_smoothing = float(label_smoothing)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        logits = out.logits.float()
        if batch.targets.ndim == 2:  # mixup/cutmix soft targets (smoothing is already folded in by timm's Mixup)
            return (-batch.targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        return F.cross_entropy(logits, batch.targets, label_smoothing=self.label_smoothing)
