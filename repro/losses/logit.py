"""KD (Hinton), TTM and WTTM (Zheng & Yang, ICLR 2024) in a numerically stable log-sum-exp form.

The official code computes ``softmax(v) ** gamma`` and normalises; we use the identical quantities
``log p_hat = gamma*v - LSE(gamma*v)`` and ``log U = LSE(gamma*v) - gamma*LSE(v)`` (wttm.md 7.5), which stay
exact where the official float32 formula underflows (teacher logit gaps above ~100).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def at_least_float32(x: Tensor) -> Tensor:
    # Distillation losses always run in float32 (or float64 when given float64), never in fp16/bf16.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row KL(p || q) from log-probabilities; entries where p is 0 (underflow, or a -inf teacher logit)
    contribute exactly 0, as torch's kl_div does for a zero target."""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p == float("-inf"), torch.zeros_like(terms), terms).sum(dim=1)


def as_temperature(temperature: float | Tensor) -> float | Tensor:
    """A number as a float; a (0-d) tensor as it is, so that a learned temperature (CTKD) gets gradients."""
    return temperature if isinstance(temperature, Tensor) else float(temperature)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor = 4.0) -> Tensor:
    """Hinton KD: KL(softmax(v/T) || softmax(z/T)) summed over classes, mean over the batch, times T^2."""
    z = at_least_float32(student_logits)
    v = at_least_float32(teacher_logits).detach()
    t = as_temperature(temperature)
    kl = kl_rows(F.log_softmax(v / t, dim=1), F.log_softmax(z / t, dim=1))
    return kl.mean() * (t * t)


def ttm_loss(student_logits: Tensor, teacher_logits: Tensor, gamma: float) -> Tensor:
    """TTM: KL(p_hat || q), p_hat = softmax(v)^gamma / sum softmax(v)^gamma = softmax(gamma*v), q = softmax(z).

    No temperature on the student and no T^2 factor (wttm.md 1.2).
    """
    z = at_least_float32(student_logits)
    v = at_least_float32(teacher_logits).detach()
    kl = kl_rows(F.log_softmax(gamma * v, dim=1), F.log_softmax(z, dim=1))
    return kl.mean()


def wttm_weight(teacher_logits: Tensor, gamma: float) -> Tensor:
    """U = sum_j softmax(v)_j^gamma per sample (1 for a one-hot teacher, K^(1-gamma) for a uniform one)."""
    v = at_least_float32(teacher_logits).detach()
    log_u = torch.logsumexp(gamma * v, dim=1) - gamma * torch.logsumexp(v, dim=1)
    return log_u.exp()


def wttm_loss(student_logits: Tensor, teacher_logits: Tensor, gamma: float) -> Tensor:
    """WTTM: mean_b U_b * KL(p_hat_b || q_b); U is neither batch-normalised nor clipped (wttm.md 1.3)."""
    z = at_least_float32(student_logits)
    v = at_least_float32(teacher_logits).detach()
    kl = kl_rows(F.log_softmax(gamma * v, dim=1), F.log_softmax(z, dim=1))
    return (wttm_weight(v, gamma) * kl).mean()
