"""ViTKD (Yang et al., 2022; yzd-v/cls_KD ``mmcls/models/dis_losses/vitkd.py``).

Two parts, on patch tokens (class / dist tokens dropped):
* mimicking: the student's tokens of the first shallow blocks, each through its own linear map to the
  teacher's width, regress the teacher's tokens of the same blocks: ``sum of squared errors / B``;
* generation: the student's last-block tokens (after the final norm), mapped to the teacher's width, have a
  random ``ratio`` of the tokens of each sample replaced by a learned mask token; a 3x3 conv - ReLU - 3x3 conv
  over the token grid regenerates the teacher's last-block tokens, scored on the masked tokens only
  (``sum of squared errors / B``).
The official loss is ``alpha * mimic + beta / ratio * generation`` (``repro.methods.vitkd``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from repro.core.errors import ReproError


def vitkd_mimic_loss(student_tokens: Sequence[Tensor], teacher_tokens: Sequence[Tensor]) -> Tensor:
    """Summed squared error over blocks, tokens and channels, divided by the batch size."""
    batch = student_tokens[0].shape[0]
    total = sum(((s - t.detach()) ** 2).sum() for s, t in zip(student_tokens, teacher_tokens, strict=True))
    return total / batch


def random_token_mask(batch: int, length: int, ratio: float, device: torch.device,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """[B, N] bool, True where a token is masked: per sample, the ``N - int(N * (1 - ratio))`` tokens with the
    largest uniform noise (the official per-sample shuffle, drawn with the given or the global RNG)."""
    keep = int(length * (1 - ratio))
    noise = torch.rand(batch, length, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each token's noise within its sample
    return ranks >= keep


def vitkd_generation_loss(generated: Tensor, teacher_tokens: Tensor, mask: Tensor) -> Tensor:
    """Summed squared error over the masked tokens and all channels, divided by the batch size."""
    squared = (generated - teacher_tokens.detach()) ** 2
    return (squared * mask[..., None].to(squared.dtype)).sum() / generated.shape[0]


class TokenGenerator(nn.Module):
    """The generation head: masked tokens become the mask token, then conv3x3 - ReLU - conv3x3 on the grid."""

    def __init__(self, dim: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim, device=device))
        self.generation = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=3, padding=1, device=device),
                                        nn.ReLU(inplace=True),
                                        nn.Conv2d(dim, dim, kernel_size=3, padding=1, device=device))

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        b, n, d = tokens.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ReproError(f"vitkd: the generation needs a square token grid, got {n} patch tokens")
        x = torch.where(mask[..., None], self.mask_token.to(tokens.dtype).expand(b, n, d), tokens)
        x = self.generation(x.reshape(b, side, side, d).permute(0, 3, 1, 2))
        return x.flatten(2).transpose(1, 2)
