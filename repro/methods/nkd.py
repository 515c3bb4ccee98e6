"""NKD (yzd-v/cls_KD ``NKDLoss``), added to the student's CE with weight 1 as cls_KD's distiller does."""
from __future__ import annotations

from torch import Tensor

from repro.core.domains import NONNEGATIVE, POSITIVE
from repro.losses.nkd import nkd_loss
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext


def hard_labels(batch: Batch) -> Tensor:
    """cls_KD's label: the argmax of the (mixup/cutmix, label-smoothed) target scores where the batch has soft
    targets, else the labels themselves."""
    return batch.targets.argmax(dim=1) if batch.targets.dim() == 2 else batch.targets


@LOSS_TERMS.register("nkd")
class NKD(LossTerm):
    domains = {"temperature": POSITIVE, "gamma": NONNEGATIVE}

    # Defaults: NKDLoss(temp=1.0, gamma=1.5), the ResNet configs (configs/distillers/imagenet/
    # res34_distill_res18_img.py, res50_distill_mv1_img.py); the DeiT config sets gamma 1.0 (the spec does).
    def __init__(self, ctx: TermContext, temperature: float = 1.0, gamma: float = 1.5) -> None:
        super().__init__(ctx)
        self.temperature = float(temperature)
        self.gamma = float(gamma)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        return nkd_loss(out.logits, out.teacher_logits, hard_labels(batch), self.temperature, self.gamma)
