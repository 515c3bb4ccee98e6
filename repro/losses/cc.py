"""Correlation Congruence (Peng et al., ICCV 2019), as RepDistiller runs it (``distiller_zoo/CC.py``, the
authors' own code restructured by RepDistiller; ``train_student.py --distill correlation``).

Student and teacher penultimate vectors go through their own trainable linear embeddings (``LinearEmbed`` to
``feat_dim``, no normalisation); with ``delta_i = |e_s(i) - e_t(i)|`` for the i-th sample of the batch, the loss
is the mean over consecutive pairs of samples of ``<delta_i, delta_{i+1}>``: a first-order (Taylor) estimate of
the congruence of the two correlation structures over the batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor


def correlation_congruence_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_i sum_d |s_i - t_i|_d * |s_{i+1} - t_{i+1}|_d`` over the b - 1 consecutive pairs of the batch."""
    delta = (student.float() - teacher.float()).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


class LinearEmbed(nn.Module):
    """Flatten, then one linear layer (RepDistiller ``models/util.py LinearEmbed``); float32 under autocast."""

    def __init__(self, dim_in: int, dim_out: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out, device=device)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.linear(x.flatten(1).float())
