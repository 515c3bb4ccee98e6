"""Relational Knowledge Distillation (Park et al., CVPR 2019) as RepDistiller runs it (``--distill rkd``,
``distiller_zoo/RKD.py``) on the penultimate (pooled) feature: the distance-wise term compares the batch's
pairwise Euclidean distances, each divided by their mean over distinct pairs, and the angle-wise term the
cosines of the angles ``(e_j - e_i, e_k - e_i)`` of every triplet, both under a smooth L1 (Huber, delta 1)
averaged over all entries."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

RKD_PDIST_EPS = 1e-12  # RepDistiller pdist: squared distances clamped from below before the square root


def pairwise_distances(embeddings: Tensor, eps: float = RKD_PDIST_EPS) -> Tensor:
    """[B, B] Euclidean distances of the rows (squared distances clamped at ``eps``), zero on the diagonal."""
    squares = embeddings.pow(2).sum(dim=1)
    squared = (squares[:, None] + squares[None, :] - 2 * embeddings @ embeddings.t()).clamp(min=eps)
    off_diagonal = 1.0 - torch.eye(len(embeddings), dtype=embeddings.dtype, device=embeddings.device)
    return squared.sqrt() * off_diagonal


def normalised_distances(embeddings: Tensor) -> Tensor:
    """Pairwise distances divided by the mean of the positive ones (a masked mean: no host read)."""
    distances = pairwise_distances(embeddings)
    positive = (distances > 0).to(distances.dtype)
    return distances / ((distances * positive).sum() / positive.sum())


def triplet_angles(embeddings: Tensor) -> Tensor:
    """[B, B, B] cosines ``<n(e_j - e_i), n(e_k - e_i)>`` with ``n`` the L2 normalisation (0 for e_j = e_i)."""
    differences = F.normalize(embeddings[None, :, :] - embeddings[:, None, :], p=2, dim=2)  # [i, j] = e_j - e_i
    return torch.bmm(differences, differences.transpose(1, 2))


def rkd_loss(student: Tensor, teacher: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0) -> Tensor:
    """``distance_weight * L_distance + angle_weight * L_angle`` on flattened [B, ...] embeddings; the teacher's
    relations carry no gradient."""
    student, teacher = student.flatten(1), teacher.flatten(1).detach()
    distance = F.smooth_l1_loss(normalised_distances(student), normalised_distances(teacher))
    angle = F.smooth_l1_loss(triplet_angles(student), triplet_angles(teacher))
    return distance_weight * distance + angle_weight * angle
