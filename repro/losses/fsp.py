"""Flow of Solution Procedure (Yim et al., CVPR 2017), as RepDistiller runs it (``distiller_zoo/FSP.py``).

The FSP matrix of two consecutive feature maps F1 [b, m, h, w] and F2 [b, n, h, w] is
``G_ij = sum_{x,y} F1_i(x, y) F2_j(x, y) / (h w)`` (the paper's Eq. 1; the larger map is average-pooled to the
smaller one's size first). The loss of a pair of stages is the mean squared difference between the student's
and the teacher's matrices; a feature list of n maps gives n - 1 such terms, summed. Student and teacher must
have the same channel count at every stage (the matrices must have the same shape), which is why RepDistiller's
table has no FSP entry for wrn-40-2 -> wrn-40-1.
"""
from __future__ import annotations

from torch import Tensor

from repro.losses.spatial import pool_to_common_size


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """[b, m, n] FSP matrix of two maps [b, m, h, w], [b, n, h', w'] (pooled to the smaller spatial size)."""
    bottom, top = pool_to_common_size(bottom.float(), top.float())
    return bottom.flatten(2) @ top.flatten(2).transpose(1, 2) / bottom[0, 0].numel()


def fsp_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Sum over consecutive stage pairs of ``mean((G_s - G_t)^2)``."""
    total = student[0].new_zeros((), dtype=student[0].float().dtype)
    for i in range(len(student) - 1):
        diff = fsp_matrix(student[i], student[i + 1]) - fsp_matrix(teacher[i], teacher[i + 1])
        total = total + diff.pow(2).mean()
    return total
