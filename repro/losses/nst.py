"""Neuron Selectivity Transfer (Huang & Wang, 2017), as RepDistiller runs it (``distiller_zoo/NST.py``).

Each channel's spatial map is a sample (flattened over h*w and L2-normalised); the loss is the squared MMD between
the student's and the teacher's channel distributions under the polynomial kernel ``k(x, y) = (x . y)^2``
(the paper's Eq. 6 with d = 2, c = 0):
``mean_ij k(t_i, t_j) + mean_ij k(s_i, s_j) - 2 mean_ij k(s_i, t_j)``, averaged over the batch. When the
spatial sizes differ, the larger map is average-pooled to the smaller one first.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def match_spatial(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of two [b, c, h, h] maps to the other's (square) size."""
    s_h, t_h = student.shape[2], teacher.shape[2]
    if s_h > t_h:
        student = F.adaptive_avg_pool2d(student, (t_h, t_h))
    elif s_h < t_h:
        teacher = F.adaptive_avg_pool2d(teacher, (s_h, s_h))
    return student, teacher


def _poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over the batch and all channel pairs of ``(a_i . b_j)^2``; a, b: [batch, channels, positions]."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


def nst_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """NST between one student and one teacher stage (channel counts may differ)."""
    student, teacher = match_spatial(student.float(), teacher.float())
    s = F.normalize(student.flatten(2), dim=2)
    t = F.normalize(teacher.flatten(2), dim=2)
    return _poly_kernel_mean(t, t).detach() + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)
