"""Weighted TTM: TTM with each sample's KL weighted by U = sum_j softmax(v)_j^gamma (wttm.md 1.3).

``weight_by_mean_u: true`` divides the loss by U_bar, the teacher's average U over the training set, measured
once before training. This is the normalisation of the paper's Figure 1 only (beta = 36 / U_bar, so that WTTM's
distillation term has TTM's average strength); the training code of the tables never does it (wttm.md 1.3).

``rescale_from_gamma: g0`` multiplies the loss by U_bar(g0) / U_bar(gamma): a spec weight (beta) chosen for the
pair's WTTM at g0 keeps the term's average scale at another gamma (our rule for the paper's WTTM w/o CE table,
which gives gamma but no beta). Both U_bar values and the factor are written into the run's ``result.json``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from repro.core.errors import ReproError
from repro.losses import wttm_loss, wttm_weight
from repro.core.domains import BOOLEAN, POSITIVE, POSITIVE_INT, optional
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext


def mean_teacher_weight(ctx: TermContext, gamma: float, max_batches: Optional[int] = None) -> float:
    """U_bar: the mean of U over the (augmented) training batches the run will see, teacher in eval mode."""
    return mean_teacher_weights(ctx, [gamma], max_batches)[0]


def mean_teacher_weights(ctx: TermContext, gammas: Sequence[float], max_batches: Optional[int] = None) -> list[float]:
    """U_bar at each gamma, from one pass of the teacher over the training batches."""
    if ctx.teacher is None:
        raise ReproError("wttm: measuring U_bar needs the run's teacher")
    if ctx.sample_batches is None:
        raise ReproError("wttm: measuring U_bar needs training batches (TermContext.sample_batches)")
    teacher = ctx.teacher
    was_training = teacher.training
    teacher.eval()
    totals, count = [0.0] * len(gammas), 0
    with torch.no_grad():
        # A whole epoch by default: the dataset average the paper names (an epoch's augmented views of it).
        for batch in ctx.sample_batches(max_batches if max_batches is not None else 1 << 62):
            logits = teacher(batch.images)
            for i, gamma in enumerate(gammas):
                totals[i] += float(wttm_weight(logits, gamma).double().sum())
            count += int(logits.shape[0])
    teacher.train(was_training)
    if count == 0:
        raise ReproError("wttm: the training set yielded no batch to measure U_bar on")
    return [total / count for total in totals]


@LOSS_TERMS.register("wttm")
class WTTM(LossTerm):
    domains = {"gamma": POSITIVE, "weight_by_mean_u": BOOLEAN, "mean_u_batches": optional(POSITIVE_INT)}

    def __init__(self, ctx: TermContext, gamma: float, weight_by_mean_u: bool = False,
                 mean_u_batches: Optional[int] = None, rescale_from_gamma: Optional[float] = None) -> None:
        super().__init__(ctx)
        self.gamma = float(gamma)
        if mean_u_batches is not None and int(mean_u_batches) < 1:
            raise ReproError(f"wttm: mean_u_batches must be at least 1, got {mean_u_batches}")
        if rescale_from_gamma is not None and not float(rescale_from_gamma) > 0:
            raise ReproError(f"wttm: rescale_from_gamma must be > 0, got {rescale_from_gamma}")
        self.rescale_from_gamma = None if rescale_from_gamma is None else float(rescale_from_gamma)
        gammas = ([self.gamma] if weight_by_mean_u else []) + \
            ([self.rescale_from_gamma, self.gamma] if self.rescale_from_gamma is not None else [])
        values = mean_teacher_weights(ctx, gammas, mean_u_batches) if gammas else []
        mean_u = torch.tensor(values[0], dtype=torch.float32, device=ctx.device) if weight_by_mean_u else None
        rescale = None
        if self.rescale_from_gamma is not None:
            # A beta chosen at gamma_0 keeps the term's average strength at gamma: beta * U_bar(gamma_0)/U_bar(gamma).
            rescale = torch.tensor(values[-2:], dtype=torch.float64, device=ctx.device)
        # Buffers, so the measured values travel with the run's checkpoint; None leaves the state dict empty.
        self.register_buffer("mean_u", mean_u)
        self.register_buffer("rescale_mean_u", rescale)  # [U_bar(gamma_0), U_bar(gamma)]

    def rescale_factor(self) -> Optional[float]:
        if self.rescale_mean_u is None:
            return None
        return float(self.rescale_mean_u[0] / self.rescale_mean_u[1])

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.mean_u is not None:
            out["mean_u"] = float(self.mean_u)
        if self.rescale_mean_u is not None:
            out["rescale"] = {"from_gamma": self.rescale_from_gamma, "gamma": self.gamma,
                              "mean_u_from_gamma": float(self.rescale_mean_u[0]),
                              "mean_u_gamma": float(self.rescale_mean_u[1]), "factor": self.rescale_factor()}
        return out

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        loss = wttm_loss(out.logits, out.teacher_logits, self.gamma)
        if self.mean_u is not None:
            loss = loss / self.mean_u.to(loss.dtype)
        if self.rescale_mean_u is not None:
            loss = loss * (self.rescale_mean_u[0] / self.rescale_mean_u[1]).to(loss.dtype)
        return loss
