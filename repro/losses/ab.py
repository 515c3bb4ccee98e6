"""Activation Boundaries (Heo et al., AAAI 2019), as RepDistiller runs it (``distiller_zoo/AB.py``,
``models/util.py Connector``, ``train_student.py --distill abound``).

On pre-activation features (before each stage's last ReLU), the student's map, passed through a connector to the
teacher's shape, is pushed to the teacher's side of the activation boundary with a margin m (the paper's
alternative squared-hinge loss, Eq. 6):
``sum (s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0]``.
Stage i of n is weighted ``2^(i - n + 1)`` (the last stage 1, each earlier one half the next), and each stage's
sum is divided by the batch size and scaled by 3/1000, as the official loss does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from repro.errors import ReproError

AB_SCALE = 3 / 1000  # RepDistiller ABLoss: `l / 1000 * 3`


def alternative_l2(source: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """The summed squared-hinge of one stage (not divided by the batch)."""
    source, target = source.float(), target.float()
    below = (source > -margin) & (target <= 0)
    above = (source <= margin) & (target > 0)
    return ((source + margin).pow(2) * below + (source - margin).pow(2) * above).sum()


def stage_weights(count: int) -> list[float]:
    """``2^(i - n + 1)`` for stage i of n: [..., 0.25, 0.5, 1]."""
    return [2.0 ** (i - count + 1) for i in range(count)]


def ab_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], margin: float = 1.0) -> Tensor:
    """Weighted sum over stages of ``alternative_l2 / batch * 3/1000``; ``student`` already connected."""
    batch = student[0].shape[0]
    weights = stage_weights(len(student))
    return sum(w * alternative_l2(s, t, margin) / batch * AB_SCALE for w, s, t in zip(weights, student, teacher))


class ConvRegressor(nn.Module):
    """A convolution from a student map (c_s, h_s, w_s) to a teacher map's (c_t, h_t, w_t), then BatchNorm
    (RepDistiller ``ConvReg``): stride-2 3x3 conv when the student is twice as large, a stride-2 4x4 transposed
    conv when it is half as large, else a (1 + h_s - h_t) x (1 + w_s - w_t) conv; ``relu`` appends a ReLU
    (FitNet's regressor; AB's connector has none)."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], relu: bool = False,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        s_c, s_h, s_w = student_shape
        t_c, t_h, t_w = teacher_shape
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1, device=device)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1, device=device)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w), device=device)
        else:
            raise ReproError(f"no convolutional regressor from a {s_h}x{s_w} student map to a {t_h}x{t_w} "
                             f"teacher map")
        self.bn = nn.BatchNorm2d(t_c, device=device)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        return torch.relu(out) if self.relu else out


def connector(student_shape: Sequence[int], teacher_shape: Sequence[int],
              device: Optional[torch.device] = None) -> nn.Module:
    """AB's connector for one stage: identity when channels and height already match, else a ConvRegressor."""
    if student_shape[0] == teacher_shape[0] and student_shape[1] == teacher_shape[1]:
        return nn.Identity()
    return ConvRegressor(student_shape, teacher_shape, relu=False, device=device)
