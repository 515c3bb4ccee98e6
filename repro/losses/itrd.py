"""Information-Theoretic Representation Distillation (Miles et al., BMVC 2022 / arXiv 2112.00459).

Two terms on the last-layer features (TTM repo ``distiller_zoo/itrd.py``, ``ITLoss``):
- correlation: standardise each feature dimension over the batch, take the per-dimension cross-correlation c_d
  between the embedded student and the teacher, and minimise ``log2 sum_d |1 - c_d|^(2 alpha)`` (a Renyi-alpha
  style surrogate that pushes every c_d to 1).
- mutual information: with Gram matrices of L2-normalised features, the student's G_s and the joint
  G_s * G_t (Hadamard), each divided by its trace, minimise ``||G_s||_F^2 - ||G_st||_F^2``. With the order-2
  matrix entropy H_2(A) = -log2 tr(A^2), that raises H(s) and lowers H(s, t), i.e. raises I(s; t) = H(s) + H(t)
  - H(s, t); the reference code drops the logs, and so do we.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _standardise_columns(x: Tensor) -> Tensor:
    """(x - mean) / std per column over the batch (unbiased std, as ``Tensor.std``).

    A column that is constant over the batch (a dead ReLU channel) becomes 0 instead of the reference code's
    0/0 = NaN, which would poison the whole run; otherwise identical.
    """
    centred = x - x.mean(dim=0)
    std = x.std(dim=0)
    return torch.where(std > 0, centred / std.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(centred))


def itrd_correlation_loss(student: Tensor, teacher: Tensor, alpha: float = 1.5) -> Tensor:
    """``log2 sum_d |1 - c_d|^(2 alpha)``, c_d the batch correlation of dimension d ([B, D] each, same D)."""
    s = _standardise_columns(student.float())
    t = _standardise_columns(teacher.float().detach())
    correlation = (s * t).sum(dim=0) / s.shape[0]
    return torch.log2((correlation - 1.0).abs().pow(2.0).pow(alpha).sum())


def itrd_mutual_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``||G_s / tr G_s||_F^2 - ||G_st / tr G_st||_F^2`` with G = normalised-feature Gram, G_st = G_s * G_t."""
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.float().detach(), dim=1)
    gram_s = s @ s.t()
    gram_st = gram_s * (t @ t.t())
    gram_s = gram_s / torch.trace(gram_s)
    gram_st = gram_st / torch.trace(gram_st)
    return gram_s.pow(2).sum() - gram_st.pow(2).sum()
