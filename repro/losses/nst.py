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

from repro.losses.spatial import pool_to_common_size


def _poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over the batch and all channel pairs of ``(a_i . b_j)^2``; a, b: [batch, channels, positions]."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


def nst_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """NST between one student and one teacher stage (channel counts may differ)."""
    student, teacher = pool_to_common_size(student.float(), teacher.float())
    s = F.normalize(student.flatten(2), dim=2)
    t = F.normalize(teacher.flatten(2), dim=2)
    return _poly_kernel_mean(t, t).detach() + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)
