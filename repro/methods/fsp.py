"""FSP as RepDistiller runs it (``--distill fsp``): an initialisation stage only.

For ``init_epochs`` epochs (RepDistiller ``--init_epochs 30``) the student's feature layers are trained on the
FSP loss alone over ``feat[:-1]`` (stem and every stage, after their ReLUs), at the run's base lr; then the
student trains on its other terms: RepDistiller's ``train_distill`` sets ``loss_kd = 0`` for fsp, so ``-b``
multiplies nothing and this term contributes no loss after the stage. Student and teacher must have equal
channel counts at every stage.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from torch import Tensor

from repro.core.domains import EPOCHS, POSITIVE, optional
from repro.core.errors import ReproError
from repro.losses.fsp import fsp_loss
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, InitStage, LossTerm, Outputs, TermContext
from repro.methods.shapes import probed_shapes


@LOSS_TERMS.register("fsp")
class FSP(LossTerm):
    features = "feat"
    domains = {"init_epochs": EPOCHS, "init_lr": optional(POSITIVE)}

    def __init__(self, ctx: TermContext, init_epochs: int = 30, init_lr: Optional[float] = None) -> None:
        super().__init__(ctx)
        student, teacher = probed_shapes(ctx, "fsp")
        s_channels = [s[0] for s in student[:-1]]
        t_channels = [t[0] for t in teacher[:-1]]
        if s_channels != t_channels:
            raise ReproError(f"fsp needs equal channel counts in student and teacher at every stage; "
                             f"got {s_channels} vs {t_channels}")
        self.init_epochs = int(init_epochs)
        self.init_lr = init_lr

    def active(self, epoch: int) -> bool:
        return False  # no loss after the initialisation stage (RepDistiller: loss_kd = 0)

    def trainable_modules(self) -> list[nn.Module]:
        return []

    def init_stage(self) -> InitStage:
        return InitStage(epochs=self.init_epochs, trains_student=True, lr=self.init_lr)

    def init_loss(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None
        return fsp_loss(out.feats[:-1], [t.detach() for t in out.teacher_feats[:-1]])

    def forward(self, out: Outputs, batch: Batch) -> Tensor:  # pragma: no cover - never active
        raise AssertionError("fsp contributes no loss after its initialisation stage")
