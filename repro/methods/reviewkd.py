"""ReviewKD (Chen et al., CVPR 2021): ABF fusion of the student's pre-activation stage features and the pooled
vector, compared with the teacher's by the HCL loss (``repro.losses.reviewkd``). The ABF modules are trainable
and optimised with the student.

Levels: the last ``stages`` spatial features of each network plus its pooled vector as a 1x1 map, both
pre-activation (dvlab-research/ReviewKD ImageNet/models/resnet.py and mobilenet.py return the stages' outputs
before their last ReLU; mdistiller STU_PREACT True and the teacher's ``preact_feats``). For torchvision ResNets
these are layer1..layer4; for MobileNet-V1 the 128/256/512/1024-channel stages, as in the official code.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from repro.core.domains import EPOCHS, POSITIVE_INT, optional
from repro.core.errors import ReproError
from repro.losses.reviewkd import build_fusions, hcl_loss, review_features
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext


@LOSS_TERMS.register("reviewkd")
class ReviewKD(LossTerm):
    features = "preact"
    domains = {"stages": POSITIVE_INT, "mid_channels": optional(POSITIVE_INT), "warmup": EPOCHS}

    # Defaults: 4 stages + the pooled vector (the official ImageNet and mdistiller configs); mid_channels None
    # means mdistiller's min(512, student's last width) (512 for ResNet-18, the official value there; the
    # official MobileNet-V1 value 256 is set by the spec); warmup 0: no warm-up (the official ImageNet code has
    # none; mdistiller's ImageNet WARMUP_EPOCHS 1 gives factor 1 from its first, 1-based epoch too).
    def __init__(self, ctx: TermContext, stages: int = 4, mid_channels: Optional[int] = None,
                 warmup: int = 0) -> None:
        super().__init__(ctx)
        self.stages = int(stages)
        self.warmup = int(warmup)
        levels = self.stages + 1
        if len(ctx.student_feat_dims) < levels or len(ctx.teacher_feat_dims) < levels:
            raise ReproError(f"reviewkd needs {levels} features (stages + pooled) of student and teacher, got "
                             f"{len(ctx.student_feat_dims)} and {len(ctx.teacher_feat_dims)} "
                             f"(TermContext.*_feat_dims)")
        in_channels = [int(c) for c in ctx.student_feat_dims[-levels:]]
        out_channels = [int(c) for c in ctx.teacher_feat_dims[-levels:]]
        mid = int(mid_channels) if mid_channels is not None else min(512, in_channels[-1])
        self.fusions = build_fusions(in_channels, out_channels, mid).to(ctx.device)

    def levels(self, feats: list[Tensor]) -> list[Tensor]:
        """The last ``stages`` spatial maps and the pooled vector as a [B, C, 1, 1] map."""
        maps = feats[-(self.stages + 1):-1]
        if any(m.dim() != 4 for m in maps):
            raise ReproError(f"reviewkd needs {self.stages} spatial [B, C, H, W] stage features before the pooled "
                             f"vector; got shapes {[tuple(m.shape) for m in maps]}")
        return [*maps, feats[-1].flatten(1)[:, :, None, None]]

    def warmup_factor(self, epoch: int) -> float:
        """mdistiller's ``min(epoch / warmup, 1)`` with 1-based epochs; 1 without warm-up."""
        return 1.0 if self.warmup == 0 else min(epoch / self.warmup, 1.0)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None
        teacher = [t.detach() for t in self.levels(out.teacher_feats)]
        student = review_features(self.fusions, self.levels(out.feats), [tuple(t.shape[-2:]) for t in teacher])
        return self.warmup_factor(batch.epoch) * hcl_loss(student, teacher)
