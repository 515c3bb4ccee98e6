"""CC as RepDistiller runs it (``--distill correlation``): the penultimate vectors (``feat[-1]``) of student and
teacher through their own trainable linear embeddings to ``feat_dim`` (RepDistiller ``--feat_dim 128``), both
optimised with the student; its weight (RepDistiller ``-b 0.02``) comes from the spec."""
from __future__ import annotations

from torch import Tensor

from repro.core.domains import POSITIVE_INT
from repro.losses.cc import LinearEmbed, correlation_congruence_loss
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext
from repro.methods.crd import last_feature_dims


@LOSS_TERMS.register("cc")
class CC(LossTerm):
    features = "feat"
    reads_teacher_features = "last"  # teacher_feats[-1] only
    domains = {"feat_dim": POSITIVE_INT}

    def __init__(self, ctx: TermContext, feat_dim: int = 128) -> None:
        super().__init__(ctx)
        student_dim, teacher_dim = last_feature_dims(ctx, "cc")
        self.embed_student = LinearEmbed(student_dim, int(feat_dim), device=ctx.device)
        self.embed_teacher = LinearEmbed(teacher_dim, int(feat_dim), device=ctx.device)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None
        return correlation_congruence_loss(self.embed_student(out.feats[-1]),
                                           self.embed_teacher(out.teacher_feats[-1].detach()))
