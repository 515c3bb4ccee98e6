"""The ND loss of KD++ (Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and
Direction", 2023): it pulls the student's embedding (the pooled feature before the classifier) towards the
direction of the teacher's class mean and enlarges its norm,

    L_nd = mean_i [ 1 - <s_i, c_{y_i} / ||c_{y_i}||> / max(||s_i||, ||t_i||) ],

with c_k the mean teacher embedding of class k over the training set and t_i the teacher's embedding of sample i.
A student whose width differs from the teacher's is projected first (BN1d, dropout 0.5, linear).

Written from the paper and WangYZ1608/Knowledge-Distillation-via-ND ImageNet/utils.py (``DirectNormLoss``),
ImageNet/Models/embtrans.py (``EmbTrans``) and ImageNet/emb_fea_distribution.py (the class means).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.core.errors import ReproError


def nd_loss(student_emb: Tensor, teacher_emb: Tensor, class_centers: Tensor, labels: Tensor) -> Tensor:
    """The ND loss above, averaged over the batch. ``class_centers`` is [K, D] (need not be normalised)."""
    s = student_emb.float()
    t = teacher_emb.float().detach()
    directions = F.normalize(class_centers.float()[labels.long()], dim=1)
    largest_norm = torch.maximum(s.norm(dim=1), t.norm(dim=1))
    return (1.0 - (s * directions).sum(dim=1) / largest_norm).mean()


class EmbeddingProjector(nn.Module):
    """BN1d + dropout 0.5 + linear, from the student's to the teacher's embedding width (official init: BN 1/0,
    linear weight and bias ~ N(0, 0.01^2))."""

    def __init__(self, in_dim: int, out_dim: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm1d(in_dim, device=device), nn.Dropout(0.5),
                                 nn.Linear(in_dim, out_dim, device=device))
        nn.init.ones_(self.net[0].weight)
        nn.init.zeros_(self.net[0].bias)
        nn.init.normal_(self.net[2].weight, 0.0, 0.01)
        nn.init.normal_(self.net[2].bias, 0.0, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def class_means(pairs: Iterable[tuple[Tensor, Tensor]], num_classes: int) -> tuple[Tensor, Tensor]:
    """(means [K, D] in float64, counts [K]) of embeddings per label over ``(embeddings, labels)`` pairs,
    accumulated on the embeddings' device; classes never seen keep a zero mean."""
    sums: Optional[Tensor] = None
    counts: Optional[Tensor] = None
    for emb, labels in pairs:
        emb = emb.detach().to(torch.float64)
        labels = labels.to(emb.device, torch.long)
        if sums is None or counts is None:
            sums = torch.zeros(num_classes, emb.shape[1], dtype=torch.float64, device=emb.device)
            counts = torch.zeros(num_classes, dtype=torch.float64, device=emb.device)
        sums.index_add_(0, labels, emb)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    if sums is None or counts is None:
        raise ReproError("ND loss: no training batch to compute the teacher's class means from")
    return sums / counts.clamp(min=1)[:, None], counts
