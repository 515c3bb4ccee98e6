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

from repro.losses.fitnet import ConvRegressor

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


def connector(student_shape: Sequence[int], teacher_shape: Sequence[int],
              device: Optional[torch.device] = None) -> nn.Module:
    """AB's connector for one stage: identity when channels and height already match, else a ConvRegressor."""
    if student_shape[0] == teacher_shape[0] and student_shape[1] == teacher_shape[1]:
        return nn.Identity()
    return ConvRegressor(student_shape, teacher_shape, relu=False, device=device)
