"""Factor Transfer (Kim et al., NeurIPS 2018), as RepDistiller runs it (``distiller_zoo/FT.py``,
``models/util.py Paraphraser/Translator``, ``train_student.py --distill factor``).

A paraphraser (conv encoder to ``k * c_t`` channels and a transposed-conv decoder back) is first trained to
reconstruct the teacher's last feature map (MSE, the initialisation stage); then a translator (conv encoder
with BatchNorm) maps the student's last feature map to a factor, and the loss is ``mean |phi(F_s) - phi(F_t)|``
with ``phi(F) = normalize(mean_c F^p1)`` per sample (p1 = 2, L1 distance: p2 = 1) between the translator's and
the frozen paraphraser encoder's factors, the larger spatially average-pooled to the smaller first.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.losses.spatial import pool_to_common_size

FACTOR_RATE = 0.5  # RepDistiller: k = 0.5 for both paraphraser and translator


def factor(features: Tensor, p1: float = 2) -> Tensor:
    """[b, h*w]: the channel mean of ``F^p1``, L2-normalised per sample."""
    return F.normalize(features.float().pow(p1).mean(1).flatten(1), dim=1)


def factor_transfer_loss(student_factor: Tensor, teacher_factor: Tensor, p1: float = 2, p2: float = 1) -> Tensor:
    """``mean |phi_s - phi_t|^p2`` (p2 = 1: absolute values; otherwise the power as the official code takes it)."""
    student_factor, teacher_factor = pool_to_common_size(student_factor, teacher_factor)
    diff = factor(student_factor, p1) - factor(teacher_factor, p1)
    return diff.abs().mean() if p2 == 1 else diff.pow(p2).mean()


def _conv_stack(conv: type, channels: Sequence[int], bn: bool, device: Optional[torch.device]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers.append(conv(c_in, c_out, 3, 1, 1, device=device))
        if bn:
            layers.append(nn.BatchNorm2d(c_out, device=device))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Encoder c -> c -> kc -> kc (3x3 convs, LeakyReLU 0.1), decoder kc -> kc -> c -> c (transposed convs); no
    BatchNorm (RepDistiller: use_bn=False)."""

    def __init__(self, channels: int, rate: float = FACTOR_RATE, device: Optional[torch.device] = None) -> None:
        super().__init__()
        out = int(channels * rate)
        self.encoder = _conv_stack(nn.Conv2d, [channels, channels, out, out], False, device)
        self.decoder = _conv_stack(nn.ConvTranspose2d, [out, out, channels, channels], False, device)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(factor, reconstruction)."""
        encoded = self.encoder(x)
        return encoded, self.decoder(encoded)


class Translator(nn.Module):
    """Encoder c_s -> c_s -> k c_t -> k c_t (3x3 convs, BatchNorm, LeakyReLU 0.1; RepDistiller: use_bn=True)."""

    def __init__(self, student_channels: int, teacher_channels: int, rate: float = FACTOR_RATE,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        out = int(teacher_channels * rate)
        self.encoder = _conv_stack(nn.Conv2d, [student_channels, student_channels, out, out], True, device)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)
