"""SRRL (Yang et al., ICLR 2021, "Knowledge Distillation via Softmax Regression Representation Learning").

The student's last feature map goes through a connector (1x1 conv + BN + ReLU to the teacher's width). Two
losses on the connected map: feature matching, the squared distance of its spatial mean to the teacher's,
averaged over channels and samples; and softmax regression, the *teacher's* frozen classifier applied to its
global average, regressed (MSE) onto the teacher's logits. Gradients reach the connector and the student
through the teacher's classifier, whose weights stay fixed.

Written from the paper and jingyang2017/KD_SRRL (distiller_zoo/AIN.py ``transfer_conv`` and ``statm_loss``,
train_imagenet_distillation.py: ``loss_stat + F.mse_loss(pred_sc, pred_t) * weight``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class SRRLConnector(nn.Module):
    """1x1 conv (no bias) + BN + ReLU; conv weights ~ N(0, 2 / (k*k*out_channels)), BN weight 1, bias 0."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.normal_(self.conv.weight, 0.0, math.sqrt(2.0 / out_channels))
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def feature_mean_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """mean_b mean_c (mean_hw s[b,c] - mean_hw t[b,c])^2 (the official ``statm_loss``)."""
    s = student_map.float().flatten(2).mean(dim=2)
    t = teacher_map.float().detach().flatten(2).mean(dim=2)
    return (s - t).pow(2).mean()


def softmax_regression_loss(student_map: Tensor, teacher_classifier: nn.Module, teacher_logits: Tensor) -> Tensor:
    """MSE (mean over samples and classes) between the teacher's classifier on the global average of the
    connected student map and the teacher's own logits. The classifier's parameters are used detached, so no
    gradient is ever computed for the teacher."""
    pooled = student_map.float().mean(dim=(2, 3))
    params = {name: p.detach().float() for name, p in teacher_classifier.named_parameters()}
    logits = torch.func.functional_call(teacher_classifier, params, (pooled,))
    return F.mse_loss(logits.float(), teacher_logits.float().detach())
