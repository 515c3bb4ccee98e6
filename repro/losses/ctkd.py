"""CTKD, curriculum temperature (Li et al., AAAI 2023; zhengli97/CTKD).

A learnable global temperature ``tau = t_start + t_end * sigmoid(theta)`` (``models/temp_global.py``: theta
starts at 1, ``train_student.py`` / ``helper/loops.py``: t_start 1, t_end 20) passes through a gradient-reversal
layer, so theta *ascends* the distillation loss while the student descends it. The reversal strength follows a
cosine curriculum over the first ``loops`` epochs (``CosineDecay(max 0, min -1, loops)`` read at each 1-based
epoch): ``lambda(e) = (1 - cos(pi * min(e, loops) / loops)) / 2``, from 0 towards 1, then 1. The official layer
multiplies the gradient by the (negative) decay value; here the strength is positive and the sign explicit.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-strength``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, strength: float) -> Tensor:
        ctx.strength = float(strength)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    return _ReverseGradient.apply(x, strength)


def reversal_strength(epoch: int, loops: int) -> float:
    """The curriculum's lambda at a 1-based epoch: 0 at epoch 0, 1 from epoch ``loops`` on."""
    e = min(max(int(epoch), 0), int(loops))
    return (1.0 - math.cos(math.pi * e / int(loops))) / 2.0


def curriculum_temperature(theta: Tensor, strength: float, t_start: float = 1.0, t_end: float = 20.0) -> Tensor:
    """``t_start + t_end * sigmoid(GRL(theta))``: the temperature the distillation loss uses this step."""
    return t_start + t_end * torch.sigmoid(reverse_gradient(theta, strength))
