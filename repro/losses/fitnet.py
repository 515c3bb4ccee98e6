"""FitNets (Romero et al., ICLR 2015) as RepDistiller runs it (``--distill hint``, ``distiller_zoo/FitNet.py``,
``models/util.py: ConvReg``): the student's hint-layer map, through a convolutional regressor trained with the
student, regresses the teacher's map of the same layer under a mean squared error."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.core.errors import ReproError


def hint_loss(regressed: Tensor, teacher: Tensor) -> Tensor:
    """Mean over every element of ``(regressed - teacher)^2`` (``nn.MSELoss()``)."""
    return F.mse_loss(regressed, teacher)


def regressor_conv(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...],
                   device: Optional[torch.device] = None) -> nn.Module:
    """The convolution that maps a student map [C_s, H_s, W_s] onto the teacher's [C_t, H_t, W_t]:
    a 3x3 stride-2 convolution when the student map is twice as high, a 4x4 stride-2 transposed convolution when
    it is half as high, otherwise (student at least as high) a valid convolution of kernel
    (1 + H_s - H_t, 1 + W_s - W_t)."""
    if len(student_shape) != 3 or len(teacher_shape) != 3:
        raise ReproError(f"a convolutional regressor needs feature maps [C, H, W] in student and teacher, got "
                         f"{tuple(student_shape)} and {tuple(teacher_shape)}")
    (s_c, s_h, s_w), (t_c, t_h, t_w) = student_shape, teacher_shape
    if s_h == 2 * t_h:
        return nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1, device=device)
    if 2 * s_h == t_h:
        return nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1, device=device)
    if s_h >= t_h and s_w >= t_w:
        return nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w), device=device)
    raise ReproError(f"no convolutional regressor maps a student map of {s_h}x{s_w} onto a teacher map of "
                     f"{t_h}x{t_w} (the student map must be at least as large, or half as large)")


class ConvRegressor(nn.Module):
    """RepDistiller's ``ConvReg``: convolution, BatchNorm and, when ``relu`` (FitNet's regressor), a ReLU; AB's
    connector is the same module without the ReLU."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], relu: bool = True,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.conv = regressor_conv(tuple(student_shape), tuple(teacher_shape), device=device)
        self.bn = nn.BatchNorm2d(teacher_shape[0], device=device)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        return F.relu(out) if self.relu else out
