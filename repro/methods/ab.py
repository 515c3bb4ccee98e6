"""AB as RepDistiller runs it (``--distill abound``): an initialisation stage only.

For ``init_epochs`` epochs (RepDistiller ``--init_epochs 30``) the student's feature layers and one connector per
stage (``feat[1:-1]``, pre-activation: ``preact=True``) are trained on the AB loss alone, at the run's base lr
(``helper/pretrain.py``: ``opt.learning_rate``); then the student trains on its other terms, with the connectors
frozen and unused: RepDistiller's ``train_distill`` sets ``loss_kd = 0`` for abound, so ``-b`` multiplies
nothing and this term contributes no loss after the stage.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from torch import Tensor

from repro.core.domains import EPOCHS, POSITIVE, optional
from repro.losses.ab import ab_loss, connector
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, InitStage, LossTerm, Outputs, TermContext
from repro.methods.shapes import probed_shapes


@LOSS_TERMS.register("ab")
class AB(LossTerm):
    features = "preact"
    domains = {"margin": POSITIVE, "init_epochs": EPOCHS, "init_lr": optional(POSITIVE)}

    def __init__(self, ctx: TermContext, margin: float = 1.0, init_epochs: int = 30,
                 init_lr: Optional[float] = None) -> None:
        super().__init__(ctx)
        student, teacher = probed_shapes(ctx, "ab")
        self.margin = float(margin)
        self.init_epochs = int(init_epochs)
        self.init_lr = init_lr
        self.connectors = nn.ModuleList(connector(s, t, device=ctx.device) for s, t in zip(student[1:-1], teacher[1:-1]))

    def active(self, epoch: int) -> bool:
        return False  # no loss after the initialisation stage (RepDistiller: loss_kd = 0)

    def trainable_modules(self) -> list[nn.Module]:
        return []  # the connectors train in the initialisation stage only

    def train(self, mode: bool = True) -> "AB":
        super().train(mode)
        self.connectors.eval()  # RepDistiller's train_distill: module_list[1].eval()
        return self

    def init_stage(self) -> InitStage:
        return InitStage(epochs=self.init_epochs, modules=[self.connectors], trains_student=True, lr=self.init_lr)

    def init_loss(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None
        connected = [c(f) for c, f in zip(self.connectors, out.feats[1:-1])]
        return ab_loss(connected, [t.detach() for t in out.teacher_feats[1:-1]], self.margin)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:  # pragma: no cover - never active
        raise AssertionError("ab contributes no loss after its initialisation stage")
