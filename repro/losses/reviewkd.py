"""ReviewKD (Chen et al., CVPR 2021, "Distilling Knowledge via Knowledge Review").

The student's stage features are read in *review* order, from the deepest (the pooled vector as a 1x1 map) to
the shallowest. Each goes through an attention-based fusion (ABF) module: a 1x1 conv + BN to a common width,
fused with the residual coming from the deeper level (nearest-upsampled to this level's size) by two sigmoid
attention maps, then a 3x3 conv + BN to the teacher's width. The outputs are compared with the teacher's
features of the same levels by the hierarchical context loss (HCL): an MSE on the full map plus MSEs on
average-pooled 4x4, 2x2 and 1x1 versions, with weights 1, 1/2, 1/4, 1/8 over the levels smaller than the map,
normalised by their sum.

Written from the paper and dvlab-research/ReviewKD ImageNet/models/reviewkd.py (``ABF``, ``ReviewKD``, ``hcl``),
cross-checked with megvii-research/mdistiller mdistiller/distillers/ReviewKD.py (same design, plus an optional
resize to the teacher's map size).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

HCL_LEVELS = (4, 2, 1)  # pooled sizes of the hierarchical context loss, each weighted half the previous


class AttentionFusion(nn.Module):
    """One ABF module: ``in_channels`` -> ``mid_channels`` (1x1 conv + BN), optional attention fusion with the
    deeper level's residual, then ``mid_channels`` -> ``out_channels`` (3x3 conv + BN)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(mid_channels))
        self.expand = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                    nn.BatchNorm2d(out_channels))
        # Two attention maps (one for this level, one for the residual) from both, as in the official ABF.
        self.attention = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid())
                          if fuse else None)
        # The official modules draw both convs with kaiming_uniform_(a=1); the attention conv keeps torch's init.
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.expand[0].weight, a=1)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None,
                out_size: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor]:
        """(output at the teacher's width, fused map passed on as the next level's residual)."""
        x = self.reduce(x)
        if self.attention is not None:
            assert residual is not None, "a fusing ABF needs the deeper level's residual"
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            maps = self.attention(torch.cat([x, residual], dim=1))
            x = x * maps[:, 0:1] + residual * maps[:, 1:2]
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")  # mdistiller's OUT_SHAPES resize
        return self.expand(x), x


def build_fusions(in_channels: Sequence[int], out_channels: Sequence[int], mid_channels: int) -> nn.ModuleList:
    """ABF modules in *review* order (deepest first); the deepest level has nothing to fuse with."""
    deepest_first = zip(reversed(list(in_channels)), reversed(list(out_channels)))
    return nn.ModuleList(AttentionFusion(c_in, mid_channels, c_out, fuse=i > 0)
                         for i, (c_in, c_out) in enumerate(deepest_first))


def review_features(fusions: nn.ModuleList, student_feats: Sequence[Tensor],
                    out_sizes: Optional[Sequence[tuple[int, int]]] = None) -> list[Tensor]:
    """The ABF outputs for ``student_feats`` (shallowest first, as given), in the same order."""
    feats = list(student_feats)
    sizes = list(out_sizes) if out_sizes is not None else [None] * len(feats)
    outputs: list[Tensor] = []
    residual: Optional[Tensor] = None
    for fusion, feat, size in zip(fusions, reversed(feats), reversed(sizes)):
        out, residual = fusion(feat, residual, size)
        outputs.append(out)
    return outputs[::-1]


def hcl_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor],
             levels: Sequence[int] = HCL_LEVELS) -> Tensor:
    """Sum over levels of (MSE + sum_l w_l MSE(pool_l)) / (1 + sum_l w_l), w = 1/2, 1/4, 1/8 for the pooled
    sizes l smaller than the map's height."""
    total: Optional[Tensor] = None
    for fs, ft in zip(student_feats, teacher_feats):
        fs, ft = fs.float(), ft.float().detach()
        loss = F.mse_loss(fs, ft)
        weight, norm = 1.0, 1.0
        for size in levels:
            if size >= fs.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            norm += weight
        total = loss / norm if total is None else total + loss / norm
    assert total is not None, "hcl_loss needs at least one feature pair"
    return total
