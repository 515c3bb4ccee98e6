"""Variational Information Distillation (Ahn et al., CVPR 2019) as RepDistiller runs it (``--distill vid``,
``distiller_zoo/VIDLoss``): per pair of feature maps, a Gaussian with a mean regressed from the student map
(three 1x1 convolutions) and one learned variance per teacher channel; the loss is the teacher map's negative
log-likelihood without the constant, ``0.5 * ((mu - t)^2 / var + log var)``, averaged over every element."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.losses.spatial import pool_to_common_size

VID_INIT_PRED_VAR = 5.0  # RepDistiller VIDLoss(init_pred_var=5.0)
VID_EPS = 1e-5  # RepDistiller VIDLoss(eps=1e-5): the variance's floor


def vid_nll(pred_mean: Tensor, pred_var: Tensor, target: Tensor) -> Tensor:
    """``mean(0.5 * ((pred_mean - target)^2 / var + log var))``; ``pred_var`` is [C], one per channel."""
    var = pred_var.view(1, -1, *([1] * (target.dim() - 2)))
    return (0.5 * ((pred_mean - target).pow(2) / var + torch.log(var))).mean()


def _conv1x1(c_in: int, c_out: int, device: Optional[torch.device]) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=False, device=device)


class VIDRegressor(nn.Module):
    """One student -> teacher pair: the mean regressor ``conv1x1 - ReLU - conv1x1 - ReLU - conv1x1`` (middle
    width ``mid_channels``; RepDistiller uses the teacher's channels) and the per-channel variance
    ``softplus(log_scale) + eps``, initialised to ``init_pred_var``."""

    def __init__(self, student_channels: int, mid_channels: int, teacher_channels: int,
                 init_pred_var: float = VID_INIT_PRED_VAR, eps: float = VID_EPS,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            _conv1x1(student_channels, mid_channels, device), nn.ReLU(),
            _conv1x1(mid_channels, mid_channels, device), nn.ReLU(),
            _conv1x1(mid_channels, teacher_channels, device))
        # softplus^-1(init_pred_var - eps), so that the initial variance is exactly init_pred_var.
        start = math.log(math.expm1(init_pred_var - eps))
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), start, device=device))
        self.eps = float(eps)

    def variance(self) -> Tensor:
        return F.softplus(self.log_scale) + self.eps

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The pair's loss; the larger map is first pooled to the smaller one's size."""
        student, teacher = pool_to_common_size(student, teacher)
        return vid_nll(self.regressor(student), self.variance(), teacher)
