"""Decoupled KD (Zhao et al., CVPR 2022; mdistiller ``distillers/DKD.py``).

KD at temperature T splits into TCKD, the KL between the binary (target, non-target) distributions, and NCKD, the
KL between the distributions over the non-target classes only. ``loss = T^2 * (alpha * TCKD + beta * NCKD)``,
batch-mean. mdistiller takes ``log`` of summed softmax masses and hides the target with a -1000 offset; here both
parts come straight from log-sum-exp over the logits, which is the same quantity without under/overflow.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from repro.losses.logit import as_temperature, at_least_float32, kl_rows


def _non_target_index(labels: Tensor, classes: int) -> Tensor:
    """[B, K-1] class indices without each row's label (the j-th other class is j, or j+1 past the label);
    gathers instead of boolean masks, so there is no host sync on the GPU."""
    others = torch.arange(classes - 1, device=labels.device)[None, :]
    return others + (others >= labels[:, None]).long()


def _split_log_probs(scaled_logits: Tensor, labels: Tensor, other_index: Tensor) -> tuple[Tensor, Tensor]:
    """([B, 2] log-probabilities of (target, any other class), [B, K-1] log-softmax over the other classes)."""
    log_norm = torch.logsumexp(scaled_logits, dim=1)
    others = scaled_logits.gather(1, other_index)
    log_target = scaled_logits.gather(1, labels[:, None]).squeeze(1) - log_norm
    log_other = torch.logsumexp(others, dim=1) - log_norm
    return torch.stack([log_target, log_other], dim=1), F.log_softmax(others, dim=1)


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float | Tensor = 4.0
              ) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each batch-mean and multiplied by T^2 as in mdistiller (T a number or a 0-d tensor)."""
    t = as_temperature(temperature)
    z = at_least_float32(student_logits) / t
    v = at_least_float32(teacher_logits).detach() / t
    labels = labels.long()
    other_index = _non_target_index(labels, z.shape[1])
    binary_s, others_s = _split_log_probs(z, labels, other_index)
    binary_t, others_t = _split_log_probs(v, labels, other_index)
    tckd = kl_rows(binary_t, binary_s).mean()
    nckd = kl_rows(others_t, others_s).mean()
    return tckd * (t * t), nckd * (t * t)


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float = 1.0, beta: float = 8.0,
             temperature: float | Tensor = 4.0) -> Tensor:
    """``alpha * TCKD + beta * NCKD`` (the warm-up factor is the caller's, see ``repro.methods.dkd``)."""
    tckd, nckd = dkd_parts(student_logits, teacher_logits, labels, temperature)
    return alpha * tckd + beta * nckd
