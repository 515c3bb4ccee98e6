"""FitNet as RepDistiller runs it (``--distill hint``, ``train_student.py``): the hint loss between the regressed
student map and the teacher map at ``hint_layer`` (default 2, RepDistiller's ``--hint_layer``), in one stage: the
regressor is trained with the student from the first epoch (RepDistiller's ``train_student.py`` runs no hint
pre-training stage for ``hint``; only abound, factor and fsp have an init stage)."""
from __future__ import annotations

import torch
from torch import Tensor

from repro.core.domains import Domain
from repro.core.errors import ReproError
from repro.losses.fitnet import ConvRegressor, hint_loss
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext, feature_shapes

FEATURE_INDEX = Domain("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)


@LOSS_TERMS.register("fitnet")
class FitNet(LossTerm):
    features = "feat"
    domains = {"hint_layer": FEATURE_INDEX}

    def __init__(self, ctx: TermContext, hint_layer: int = 2) -> None:
        super().__init__(ctx)
        student_shapes, teacher_shapes = feature_shapes(ctx, "fitnet")
        self.hint_layer = int(hint_layer)
        if self.hint_layer >= min(len(student_shapes), len(teacher_shapes)):
            raise ReproError(f"fitnet: hint_layer {self.hint_layer} is out of range: the student has "
                             f"{len(student_shapes)} features, the teacher {len(teacher_shapes)}")
        self.regressor = ConvRegressor(student_shapes[self.hint_layer], teacher_shapes[self.hint_layer],
                                       device=ctx.device)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None
        student = out.feats[self.hint_layer]
        teacher = out.teacher_feats[self.hint_layer].detach()
        with torch.autocast(student.device.type, enabled=False):  # regressor and squared error in fp32
            return hint_loss(self.regressor(student.float()), teacher.float())
