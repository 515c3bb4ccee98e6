"""Weighted TTM: TTM with each sample's KL weighted by U = sum_j softmax(v)_j^gamma (wttm.md 1.3).

``weight_by_mean_u: true`` divides the loss by U_bar, the teacher's average U over the training set, measured
once before training. This is the normalisation of the paper's Figure 1 only (beta = 36 / U_bar, so that WTTM's
distillation term has TTM's average strength); the training code of the tables never does it (wttm.md 1.3).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from repro.errors import ReproError
from repro.losses import wttm_loss, wttm_weight
from repro.domains import BOOLEAN, POSITIVE, POSITIVE_INT, optional
from repro.methods.base import LOSS_TERMS, Batch, LossTerm, Outputs, TermContext


def mean_teacher_weight(ctx: TermContext, gamma: float, max_batches: Optional[int] = None) -> float:
    """U_bar: the mean of U over the (augmented) training batches the run will see, teacher in eval mode."""
    if ctx.teacher is None:
        raise ReproError("wttm with weight_by_mean_u needs the run's teacher to measure U_bar")
    if ctx.sample_batches is None:
        raise ReproError("wttm with weight_by_mean_u needs training batches (TermContext.sample_batches)")
    teacher = ctx.teacher
    was_training = teacher.training
    teacher.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        # A whole epoch by default: the dataset average the paper names (an epoch's augmented views of it).
        for batch in ctx.sample_batches(max_batches if max_batches is not None else 1 << 62):
            u = wttm_weight(teacher(batch.images), gamma)
            total += float(u.double().sum())
            count += int(u.numel())
    teacher.train(was_training)
    if count == 0:
        raise ReproError("wttm with weight_by_mean_u: the training set yielded no batch to measure U_bar on")
    return total / count


@LOSS_TERMS.register("wttm")
class WTTM(LossTerm):
    domains = {"gamma": POSITIVE, "weight_by_mean_u": BOOLEAN, "mean_u_batches": optional(POSITIVE_INT)}

    def __init__(self, ctx: TermContext, gamma: float, weight_by_mean_u: bool = False,
                 mean_u_batches: Optional[int] = None) -> None:
        super().__init__(ctx)
        self.gamma = float(gamma)
        if mean_u_batches is not None and int(mean_u_batches) < 1:
            raise ReproError(f"wttm: mean_u_batches must be at least 1, got {mean_u_batches}")
        mean_u = None
        if weight_by_mean_u:
            value = mean_teacher_weight(ctx, self.gamma, mean_u_batches)
            mean_u = torch.tensor(value, dtype=torch.float32, device=ctx.device)
        # A buffer, so U_bar travels with the run's checkpoint; None (plain WTTM) leaves the state dict empty.
        self.register_buffer("mean_u", mean_u)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        loss = wttm_loss(out.logits, out.teacher_logits, self.gamma)
        return loss if self.mean_u is None else loss / self.mean_u.to(loss.dtype)
