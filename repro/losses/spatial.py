"""Spatial matching of a student and a teacher feature map before a map-to-map loss (AT, VID, NST).

RepDistiller's ``at_loss`` and ``VIDLoss`` average-pool whichever map is larger down to the other's height
(``F.adaptive_avg_pool2d(f, (H, H))``: CIFAR maps are square); maps of equal height pass unchanged.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def pool_to_common_size(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """(student, teacher) [B, C, H, W] maps, the spatially larger one average-pooled to the smaller one's size."""
    s_h, t_h = student.shape[2], teacher.shape[2]
    if s_h > t_h:
        student = F.adaptive_avg_pool2d(student, (t_h, t_h))
    elif s_h < t_h:
        teacher = F.adaptive_avg_pool2d(teacher, (s_h, s_h))
    return student, teacher
