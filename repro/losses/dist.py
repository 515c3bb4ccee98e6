"""DIST (Huang et al., NeurIPS 2022): match the *relations* of teacher and student predictions.

Inter-class relation: per sample, the Pearson correlation across classes of softmax(z/tau) and softmax(v/tau).
Intra-class relation: per class, the Pearson correlation across the batch. The loss is
``tau^2 * (beta * (1 - mean inter) + gamma * (1 - mean intra))``, as the TTM repo's ``distiller_zoo/dist.py``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from repro.losses.logit import at_least_float32

_COSINE_EPS = 1e-8  # added to the norm product, as the reference code does, so constant rows give 0, not NaN


def pearson_rows(a: Tensor, b: Tensor, eps: float = _COSINE_EPS) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` ([B, K] -> [B])."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 1.0,
              tau: float = 4.0) -> Tensor:
    """DIST: ``tau^2 * (beta * inter + gamma * intra)`` with relations on softmax(logits / tau)."""
    y_s = torch.softmax(at_least_float32(student_logits) / tau, dim=1)
    y_t = torch.softmax(at_least_float32(teacher_logits).detach() / tau, dim=1)
    inter = 1.0 - pearson_rows(y_s, y_t).mean()
    intra = 1.0 - pearson_rows(y_s.t(), y_t.t()).mean()
    return (tau * tau) * (beta * inter + gamma * intra)
