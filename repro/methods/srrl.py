"""SRRL (Yang et al., ICLR 2021): feature matching and softmax regression through the teacher's classifier on
the connected last feature map of the student (``repro.losses.srrl``). The connector is trainable and optimised
with the student; the teacher's classifier (``get_classifier()`` of the teacher model) is used frozen.
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from repro.core.domains import NONNEGATIVE
from repro.core.errors import ReproError
from repro.losses.srrl import SRRLConnector, feature_mean_loss, softmax_regression_loss
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext


def teacher_classifier(ctx: TermContext, term: str) -> nn.Module:
    """The teacher's classifier head, through the models' ``get_classifier()``."""
    get = getattr(ctx.teacher, "get_classifier", None)
    if get is None:
        raise ReproError(f"{term} needs the teacher's classifier, but the teacher model "
                         f"({type(ctx.teacher).__name__}) has no get_classifier()")
    return get()


@LOSS_TERMS.register("srrl")
class SRRL(LossTerm):
    features = "feat"
    domains = {"feature_weight": NONNEGATIVE, "regression_weight": NONNEGATIVE}

    # Defaults: jingyang2017/KD_SRRL train_imagenet_distillation.py, loss = CE + statm_loss + weight * MSE(pred_sc,
    # pred_t) with --weight 1 for both ImageNet pairs (README commands pass no --weight).
    def __init__(self, ctx: TermContext, feature_weight: float = 1.0, regression_weight: float = 1.0) -> None:
        super().__init__(ctx)
        if len(ctx.student_feat_dims) < 2 or len(ctx.teacher_feat_dims) < 2:
            raise ReproError("srrl needs the last feature map and the pooled vector of student and teacher "
                             "(TermContext.*_feat_dims)")
        self.feature_weight = float(feature_weight)
        self.regression_weight = float(regression_weight)
        self.connector = SRRLConnector(int(ctx.student_feat_dims[-2]), int(ctx.teacher_feat_dims[-2])).to(ctx.device)
        # Kept out of the module tree: the teacher's head is never optimised, saved or moved with the term.
        object.__setattr__(self, "teacher_head", teacher_classifier(ctx, "srrl"))

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None and out.teacher_logits is not None
        student_map, teacher_map = out.feats[-2], out.teacher_feats[-2]
        if student_map.dim() != 4 or teacher_map.dim() != 4:
            raise ReproError(f"srrl needs [B, C, H, W] last feature maps, got {tuple(student_map.shape)} and "
                             f"{tuple(teacher_map.shape)}")
        connected = self.connector(student_map)
        return (self.feature_weight * feature_mean_loss(connected, teacher_map)
                + self.regression_weight * softmax_regression_loss(connected, self.teacher_head, out.teacher_logits))
