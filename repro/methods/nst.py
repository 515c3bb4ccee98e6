"""NST as RepDistiller runs it (``--distill nst``): every stage between the stem and the pooled vector
(``feat[1:-1]``, after their ReLUs), summed; its weight (RepDistiller ``-b 50``) comes from the spec."""
from __future__ import annotations

from torch import Tensor

from repro.losses.nst import nst_loss
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs


@LOSS_TERMS.register("nst")
class NST(LossTerm):
    features = "feat"

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None
        return sum(nst_loss(s, t) for s, t in zip(out.feats[1:-1], out.teacher_feats[1:-1]))
