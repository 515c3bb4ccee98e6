"""NKD, normalized KD (Yang et al., ICCV 2023; yzd-v/cls_KD ``mmcls/models/dis_losses/nkd.py``).

KD split at the label t: the target part is the cross-entropy between the teacher's and the student's target
probabilities (no temperature), ``-mean_b T_t log S_t``; the non-target part is the cross-entropy between the
*normalised* non-target distributions (softmax over the K-1 other classes at temperature tau) times
``gamma * tau^2``. Both are cross-entropies, not KLs, as in the official code, so the logged value matches
cls_KD's (the teacher's entropy is a constant: the gradients are those of the KL form).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from repro.losses.dkd import _non_target_index
from repro.losses.logit import at_least_float32


def nkd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0,
             gamma: float = 1.5) -> Tensor:
    """``-mean_b T_t log S_t - gamma tau^2 mean_b sum_{j != t} T^_j log S^_j`` (hats: non-target softmax at tau)."""
    z = at_least_float32(student_logits)
    v = at_least_float32(teacher_logits).detach()
    labels = labels.long()[:, None]
    tau = float(temperature)
    target = -(F.softmax(v, dim=1).gather(1, labels) * F.log_softmax(z, dim=1).gather(1, labels)).mean()
    other_index = _non_target_index(labels[:, 0], z.shape[1])
    log_s_other = F.log_softmax(z.gather(1, other_index) / tau, dim=1)
    t_other = F.softmax(v.gather(1, other_index) / tau, dim=1)
    non_target = -(t_other * log_s_other).sum(dim=1).mean()
    return target + gamma * tau * tau * non_target
