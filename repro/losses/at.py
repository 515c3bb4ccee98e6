"""Attention Transfer (Zagoruyko & Komodakis, ICLR 2017) as RepDistiller runs it (``--distill attention``,
``distiller_zoo/AT.py``): per pair of feature maps, the squared distance of the L2-normalised spatial attention
maps ``mean_c(f^p)``, averaged over batch and positions; the term sums it over the middle features."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

from repro.losses.spatial import pool_to_common_size


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """[B, H*W]: the channel mean of ``feature^p``, flattened and L2-normalised per sample."""
    return F.normalize(feature.pow(p).mean(1).flatten(1), dim=1)


def at_pair_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """``mean_{b, j} (a_s[b, j] - a_t[b, j])^2`` of the attention maps, after pooling to a common size."""
    student, teacher = pool_to_common_size(student, teacher)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def at_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """The sum of ``at_pair_loss`` over the pairs (zip: the shorter list decides, as RepDistiller's loop)."""
    return sum(at_pair_loss(s, t, p) for s, t in zip(student_feats, teacher_feats))  # type: ignore[return-value]
