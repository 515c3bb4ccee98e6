"""Similarity-Preserving KD (Tung & Mori, ICCV 2019), as RepDistiller runs it (``distiller_zoo/SP.py``).

For a batch of b feature maps flattened to rows of F (b x chw), the Gram matrix G = F F^T is row-normalised
(each row divided by its L2 norm), and the loss is ``||G_t - G_s||_F^2 / b^2`` (the paper's Eq. 2-4).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def similarity_matrix(features: Tensor) -> Tensor:
    """[b, b] row-L2-normalised Gram matrix of the flattened features (float32)."""
    flat = features.flatten(1).float()
    return F.normalize(flat @ flat.t(), dim=1)


def similarity_preserving_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """SP loss between one student and one teacher feature map of the same batch (any widths/shapes)."""
    batch = student.shape[0]
    diff = similarity_matrix(teacher) - similarity_matrix(student)
    return diff.pow(2).sum() / (batch * batch)
