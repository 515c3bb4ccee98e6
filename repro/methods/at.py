"""Attention Transfer as RepDistiller runs it (``--distill attention``): ``at_loss`` with p = 2 summed over the
middle features ``feat[1:-1]`` of student and teacher, paired in order."""
from __future__ import annotations

import torch
from torch import Tensor

from repro.core.domains import POSITIVE
from repro.losses.at import at_loss
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext


@LOSS_TERMS.register("at")
class AT(LossTerm):
    features = "feat"
    domains = {"p": POSITIVE}

    # Default: RepDistiller distiller_zoo/AT.py Attention(p=2), as train_student.py builds it.
    def __init__(self, ctx: TermContext, p: float = 2.0) -> None:
        super().__init__(ctx)
        self.p = float(p)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None
        student = [f.float() for f in out.feats[1:-1]]
        teacher = [f.detach().float() for f in out.teacher_feats[1:-1]]
        with torch.autocast(out.logits.device.type, enabled=False):  # normalised maps and squares in fp32
            return at_loss(student, teacher, self.p)
