"""FT as RepDistiller runs it (``--distill factor``).

Initialisation stage (``init_epochs``, RepDistiller ``--init_epochs 30``): the paraphraser alone learns to
reconstruct the teacher's last feature map (``feat[-2]``) under MSE; RepDistiller's ``helper/pretrain.py`` uses
lr 0.01 for ResNet/WRN students and the run's base lr otherwise, so the spec sets ``init_lr`` per cell (null:
the base lr). Training: the translator (optimised with the student) maps the student's ``feat[-2]`` to a factor
matched to the frozen paraphraser encoder's factor of the teacher's; its weight (RepDistiller ``-b 200``) comes
from the spec.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.core.domains import EPOCHS, POSITIVE, optional
from repro.losses.ft import Paraphraser, Translator, factor_transfer_loss
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, InitStage, LossTerm, Outputs, TermContext
from repro.methods.shapes import probed_shapes


@LOSS_TERMS.register("ft")
class FT(LossTerm):
    features = "feat"
    domains = {"p1": POSITIVE, "p2": POSITIVE, "init_epochs": EPOCHS, "init_lr": optional(POSITIVE)}

    def __init__(self, ctx: TermContext, p1: float = 2, p2: float = 1, init_epochs: int = 30,
                 init_lr: Optional[float] = None) -> None:
        super().__init__(ctx)
        student, teacher = probed_shapes(ctx, "ft")
        self.p1, self.p2 = p1, p2
        self.init_epochs = int(init_epochs)
        self.init_lr = init_lr
        self.paraphraser = Paraphraser(teacher[-2][0], device=ctx.device)
        self.translator = Translator(student[-2][0], teacher[-2][0], device=ctx.device)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.translator]  # the paraphraser is frozen after the initialisation stage

    def train(self, mode: bool = True) -> "FT":
        super().train(mode)
        self.paraphraser.eval()  # RepDistiller's train_distill: module_list[2].eval()
        return self

    def init_stage(self) -> InitStage:
        return InitStage(epochs=self.init_epochs, modules=[self.paraphraser], trains_student=False, lr=self.init_lr)

    def init_loss(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.teacher_feats is not None
        target = out.teacher_feats[-2].detach().float()
        with torch.autocast(target.device.type, enabled=False):
            _, reconstruction = self.paraphraser(target)
        return F.mse_loss(reconstruction, target)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None
        with torch.no_grad():
            teacher_factor = self.paraphraser.encoder(out.teacher_feats[-2])
        return factor_transfer_loss(self.translator(out.feats[-2]), teacher_factor, self.p1, self.p2)
