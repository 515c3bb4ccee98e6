"""Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018) as RepDistiller runs it (``--distill pkt``,
``distiller_zoo/PKT.py``) on the penultimate (pooled) feature: the batch's cosine similarities, mapped to
[0, 1] and normalised per row into conditional probabilities, compared under a KL divergence that is averaged
(not summed) over all B^2 entries."""
from __future__ import annotations

import torch
from torch import Tensor

PKT_EPS = 1e-7  # RepDistiller cosine_similarity_loss(eps=0.0000001): in the norms and inside the log ratio


def pkt_probabilities(embeddings: Tensor, eps: float = PKT_EPS) -> Tensor:
    """[B, B] row-stochastic ``(cos(e_i, e_j) + 1) / 2`` normalised over j; the norm carries ``+ eps``."""
    unit = embeddings / (embeddings.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    unit = torch.where(torch.isnan(unit), torch.zeros_like(unit), unit)  # as the reference: NaN rows -> 0
    similarity = (unit @ unit.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = PKT_EPS) -> Tensor:
    """``mean_{i,j} p_t[i,j] * log((p_t[i,j] + eps) / (p_s[i,j] + eps))``; the teacher carries no gradient."""
    p_s = pkt_probabilities(student.flatten(1), eps)
    p_t = pkt_probabilities(teacher.flatten(1).detach(), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()
