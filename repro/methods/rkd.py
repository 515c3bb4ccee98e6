"""RKD as RepDistiller runs it (``--distill rkd``): distance (weight 25) and angle (weight 50) terms on the
penultimate feature ``feat[-1]``; the spec's weight multiplies their sum (RepDistiller ``-b 1``)."""
from __future__ import annotations

import torch
from torch import Tensor

from repro.core.domains import NONNEGATIVE
from repro.losses.rkd import rkd_loss
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext


@LOSS_TERMS.register("rkd")
class RKD(LossTerm):
    features = "feat"
    reads_teacher_features = "last"  # teacher_feats[-1] only
    domains = {"distance_weight": NONNEGATIVE, "angle_weight": NONNEGATIVE}

    # Defaults: RepDistiller distiller_zoo/RKD.py RKDLoss(w_d=25, w_a=50), as train_student.py builds it.
    def __init__(self, ctx: TermContext, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__(ctx)
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None
        with torch.autocast(out.logits.device.type, enabled=False):  # distances and cosines in fp32
            return rkd_loss(out.feats[-1].float(), out.teacher_feats[-1].detach().float(),
                            self.distance_weight, self.angle_weight)
