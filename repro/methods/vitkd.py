"""ViTKD (yzd-v/cls_KD ``ViTKDLoss``): mimic the teacher's shallow-block tokens, generate its last-block tokens.

Token maps come from the ViT feature contract (``repro.models.vit``: ``feats[i]`` is block i+1's output,
``feats[-2]`` the last block's after the final norm); patch tokens are the map without the model's prefix
(class / dist) tokens. The linear maps and the generation head are trainable and optimised with the student.
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from repro.core.domains import NONNEGATIVE, OPEN_UNIT, POSITIVE_INT
from repro.core.errors import ReproError
from repro.losses.vitkd import TokenGenerator, random_token_mask, vitkd_generation_loss, vitkd_mimic_loss
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext


def token_layout(model: nn.Module | None, role: str) -> tuple[int, int]:
    """(prefix tokens, width) of a ViT under the feature contract; a clear error for any other model."""
    if model is None or not hasattr(model, "num_prefix_tokens") or not hasattr(model, "embed_dim"):
        raise ReproError(f"vitkd needs a ViT {role} (token features); got {type(model).__name__}")
    return int(model.num_prefix_tokens), int(model.embed_dim)


@LOSS_TERMS.register("vitkd")
class ViTKD(LossTerm):
    features = "feat"
    domains = {"alpha": NONNEGATIVE, "beta": NONNEGATIVE, "mask_ratio": OPEN_UNIT, "shallow_blocks": POSITIVE_INT}

    # Defaults: configs/distillers/imagenet/deit-s3_distill_deit-t_img.py (alpha_vitkd 3e-5, beta_vitkd 3e-6,
    # lambda_vitkd 0.5) and mmcls/models/backbones/vision_transformer.py (low-level tokens of blocks 0 and 1).
    def __init__(self, ctx: TermContext, alpha: float = 3e-5, beta: float = 3e-6, mask_ratio: float = 0.5,
                 shallow_blocks: int = 2) -> None:
        super().__init__(ctx)
        self.student_prefix, student_dim = token_layout(ctx.student, "student")
        self.teacher_prefix, teacher_dim = token_layout(ctx.teacher, "teacher")
        self.alpha, self.beta, self.mask_ratio = float(alpha), float(beta), float(mask_ratio)
        self.shallow_blocks = int(shallow_blocks)
        depth = min(len(ctx.student_feat_dims), len(ctx.teacher_feat_dims)) - 2  # blocks before the last
        if not 1 <= self.shallow_blocks <= depth:
            raise ReproError(f"vitkd: shallow_blocks must be between 1 and {depth} (the blocks before the last "
                             f"of the shallower network), got {shallow_blocks}")
        if not 0 < self.mask_ratio < 1:
            raise ReproError(f"vitkd: mask_ratio must be strictly between 0 and 1, got {mask_ratio}")
        # The official code aligns widths only when they differ (nn.Linear with bias, one per shallow block).
        same = student_dim == teacher_dim
        self.align_shallow = nn.ModuleList([
            nn.Identity() if same else nn.Linear(student_dim, teacher_dim, device=ctx.device)
            for _ in range(self.shallow_blocks)])
        self.align_last = nn.Identity() if same else nn.Linear(student_dim, teacher_dim, device=ctx.device)
        self.generator = TokenGenerator(teacher_dim, device=ctx.device)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None
        s_patch = [f[:, self.student_prefix:] for f in out.feats[:-1]]
        t_patch = [f[:, self.teacher_prefix:] for f in out.teacher_feats[:-1]]
        if s_patch[-1].shape[1] != t_patch[-1].shape[1]:
            raise ReproError(f"vitkd: student and teacher have different patch grids "
                             f"({s_patch[-1].shape[1]} vs {t_patch[-1].shape[1]} tokens)")
        shallow = [align(s) for align, s in zip(self.align_shallow, s_patch)]
        mimic = vitkd_mimic_loss(shallow, t_patch[:self.shallow_blocks])
        last = self.align_last(s_patch[-1])
        mask = random_token_mask(last.shape[0], last.shape[1], self.mask_ratio, last.device)
        generation = vitkd_generation_loss(self.generator(last, mask), t_patch[-1], mask)
        return self.alpha * mimic + self.beta / self.mask_ratio * generation
