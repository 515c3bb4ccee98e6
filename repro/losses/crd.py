"""Contrastive Representation Distillation (Tian et al., ICLR 2020; RepDistiller ``crd/``).

Pieces, all on the device:
- ``sample_contrast_indices``: per sample, one positive and k negatives drawn from the dataset indices, as
  RepDistiller's ``CIFAR100InstanceSample`` does in its data loader (mode 'exact': the positive is the sample
  itself and negatives come from the other classes, without replacement unless a class has fewer than k).
- ``ContrastMemory``: momentum memory banks of student and teacher embeddings over the whole training set, the
  score ``exp(<memory_j, anchor> / nce_t) / Z`` with Z fixed on the first batch, and the momentum update.
- ``nce_contrast_loss``: the NCE loss of the CRD paper's Eq. 18 with noise distribution Pn = 1/N.
The full loss is the student-anchored plus the teacher-anchored NCE loss (``repro.methods.crd``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.core.errors import ReproError

NCE_EPS = 1e-7  # RepDistiller's eps in the NCE denominators
CONTRAST_MODES = ("exact", "relax")


def _draw(weights: Tensor, count: int, generator: Optional[torch.Generator],
          candidate_bounds: Optional[tuple[int, int]] = None) -> Tensor:
    """``count`` draws per row of ``weights``; rows with fewer candidates than ``count`` draw with replacement
    (RepDistiller: ``replace = k > len(cls_negative[target])``).

    ``candidate_bounds`` (fewest, most) candidates any row can have, known on the host (from the class sizes):
    when they decide the case for every row, nothing is read back from the device. The draws are the same
    either way.
    """
    if candidate_bounds is not None:
        fewest, most = candidate_bounds
        if fewest >= count:
            return torch.multinomial(weights, count, replacement=False, generator=generator)
        if 0 < most < count:
            return torch.multinomial(weights, count, replacement=True, generator=generator)
    candidates = (weights > 0).sum(dim=1)
    fewest = int(candidates.min())  # a host sync: only when class sizes straddle count (tiny data sets)
    if fewest == 0:
        raise ReproError("CRD: a training sample has no candidate to contrast with "
                         "(the training set needs at least two classes)")
    if fewest >= count:
        return torch.multinomial(weights, count, replacement=False, generator=generator)
    draws = torch.empty(weights.shape[0], count, dtype=torch.long, device=weights.device)
    with_replacement = candidates < count
    for rows, replacement in ((~with_replacement, False), (with_replacement, True)):
        if bool(rows.any()):
            draws[rows] = torch.multinomial(weights[rows], count, replacement=replacement, generator=generator)
    return draws


def class_size_bounds(train_labels: Tensor) -> tuple[int, int]:
    """(smallest, largest) class size among the classes present: what ``sample_contrast_indices`` needs to know
    on the host to draw without reading the device (computed once, when a term is built)."""
    sizes = torch.bincount(train_labels.long())
    sizes = sizes[sizes > 0]
    return int(sizes.min()), int(sizes.max())


def sample_contrast_indices(train_labels: Tensor, indices: Tensor, k: int, mode: str = "exact",
                            generator: Optional[torch.Generator] = None,
                            class_sizes: Optional[tuple[int, int]] = None) -> Tensor:
    """[B, k+1] dataset indices: column 0 the positive, columns 1..k the negatives (other classes only).

    mode 'exact': the positive is the sample itself; 'relax': a random sample of the same class.
    ``class_sizes``: ``class_size_bounds(train_labels)``, to skip the host read of the candidate counts.
    """
    if mode not in CONTRAST_MODES:
        raise ReproError(f"CRD: unknown contrast mode {mode!r}; known: {', '.join(CONTRAST_MODES)}")
    if k < 1:
        raise ReproError(f"CRD: the number of negatives k must be >= 1, got {k}")
    labels = train_labels[indices]
    same_class = labels[:, None] == train_labels[None, :]
    n_data = train_labels.shape[0]
    # A sample of class c has n_data - |c| negatives and |c| same-class candidates.
    negative_bounds = (n_data - class_sizes[1], n_data - class_sizes[0]) if class_sizes else None
    negatives = _draw((~same_class).float(), k, generator, negative_bounds)
    if mode == "exact":
        positives = indices.long()
    else:
        positives = _draw(same_class.float(), 1, generator, class_sizes)[:, 0]
    return torch.cat([positives[:, None], negatives], dim=1)


def gathered_scores(memory: Tensor, contrast_idx: Tensor, anchors: Tensor) -> Tensor:
    """[B, M] dot products ``<memory[contrast_idx[b, j]], anchors[b]>``.

    When the batch asks for at least as many rows as the bank holds (CIFAR: 64 x 16385 > 50000), one
    [N, B] matmul is cheaper than gathering B x (k+1) rows of the bank; the two are the same numbers.
    """
    if contrast_idx.numel() >= memory.shape[0]:
        return (memory @ anchors.t()).t().gather(1, contrast_idx)
    return torch.einsum("bmd,bd->bm", memory[contrast_idx], anchors)


def nce_contrast_loss(probs: Tensor, n_data: int) -> Tensor:
    """CRD Eq. 18: ``-(log h(pos) + sum_neg log(1 - h(neg))) / B`` with ``h(x) = x / (x + k * Pn)``, Pn = 1/N.

    ``probs`` is [B, k+1], column 0 the positive pair's score.
    """
    k = probs.shape[1] - 1
    noise = k / float(n_data)
    log_positive = torch.log(probs[:, 0] / (probs[:, 0] + noise + NCE_EPS))
    log_negative = torch.log(noise / (probs[:, 1:] + noise + NCE_EPS))
    return -(log_positive.sum() + log_negative.sum()) / probs.shape[0]


class EmbedHead(nn.Module):
    """CRD's embedding: flatten, linear to ``feat_dim``, L2-normalise; computed in float32 under autocast."""

    def __init__(self, dim_in: int, feat_dim: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, feat_dim, device=device)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.normalize(self.linear(x.flatten(1).float()), dim=1)


class ContrastMemory(nn.Module):
    """Memory banks of L2-normalised student and teacher embeddings, one row per training sample."""

    def __init__(self, feat_dim: int, n_data: int, temperature: float = 0.07, momentum: float = 0.5,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.n_data = int(n_data)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        # Uniform in [-stdv, stdv] with stdv = 1/sqrt(feat_dim/3), as RepDistiller initialises its banks.
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        for name in ("memory_student", "memory_teacher"):
            self.register_buffer(name, (torch.rand(n_data, feat_dim, device=device) * 2 - 1) * stdv)
        # Normalising constants Z, fixed from the first batch (mean score * N); -1 means "not set yet".
        self.register_buffer("z_student", torch.tensor(-1.0, device=device))
        self.register_buffer("z_teacher", torch.tensor(-1.0, device=device))

    def _normalised(self, scores: Tensor, z_name: str) -> Tensor:
        # Set Z on first use without a host sync: keep the stored value once it is positive. Out of place, so a
        # saved Z of an earlier forward is never modified before its backward.
        z: Tensor = getattr(self, z_name)
        z = torch.where(z < 0, scores.detach().mean() * self.n_data, z)
        setattr(self, z_name, z)
        return scores / z

    @torch.no_grad()
    def update(self, emb_student: Tensor, emb_teacher: Tensor, indices: Tensor) -> None:
        """Row i <- normalise(momentum * row i + (1 - momentum) * new embedding), for each index in the batch."""
        for name, emb in (("memory_student", emb_student), ("memory_teacher", emb_teacher)):
            memory: Tensor = getattr(self, name)
            mixed = memory[indices] * self.momentum + emb.detach().float() * (1 - self.momentum)
            # Out of place: this batch's scores may have saved the old bank for their backward pass.
            setattr(self, name, memory.index_copy(0, indices, F.normalize(mixed, dim=1)))

    def forward(self, emb_student: Tensor, emb_teacher: Tensor, contrast_idx: Tensor, indices: Tensor
                ) -> tuple[Tensor, Tensor]:
        """(student-anchored, teacher-anchored) probabilities [B, k+1]; then updates the banks at ``indices``.

        The student anchor is scored against the *teacher* bank and vice versa, with the banks as they were
        before this batch's update.
        """
        with torch.autocast(emb_student.device.type, enabled=False):  # exp(score / 0.07) needs float32 scores
            emb_s, emb_t = emb_student.float(), emb_teacher.float()
            scores_s = torch.exp(gathered_scores(self.memory_teacher, contrast_idx, emb_s) / self.temperature)
            scores_t = torch.exp(gathered_scores(self.memory_student, contrast_idx, emb_t) / self.temperature)
            probs_s = self._normalised(scores_s, "z_student")
            probs_t = self._normalised(scores_t, "z_teacher")
        self.update(emb_s, emb_t, indices)
        return probs_s, probs_t
