"""SP as RepDistiller runs it (``--distill similarity``): the last stage's feature map (``feat[-2]``, after its
ReLU, before pooling); its weight (RepDistiller ``-b 3000``) comes from the spec."""
from __future__ import annotations

from torch import Tensor

from repro.losses.sp import similarity_preserving_loss
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs


@LOSS_TERMS.register("sp")
class SP(LossTerm):
    features = "feat"

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None
        return similarity_preserving_loss(out.feats[-2], out.teacher_feats[-2])
