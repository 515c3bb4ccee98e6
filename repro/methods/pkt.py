"""PKT as RepDistiller runs it (``--distill pkt``): ``pkt_loss`` on the penultimate feature ``feat[-1]``; its
weight (RepDistiller ``-b 30000``) comes from the spec."""
from __future__ import annotations

import torch
from torch import Tensor

from repro.losses.pkt import pkt_loss
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext


@LOSS_TERMS.register("pkt")
class PKT(LossTerm):
    features = "feat"
    reads_teacher_features = "last"  # teacher_feats[-1] only

    def __init__(self, ctx: TermContext) -> None:
        super().__init__(ctx)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None
        with torch.autocast(out.logits.device.type, enabled=False):  # eps 1e-7 inside the log needs fp32
            return pkt_loss(out.feats[-1].float(), out.teacher_feats[-1].detach().float())
