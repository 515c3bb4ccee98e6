"""KD++ (Wang et al., 2023): Hinton KD plus the ND loss on the pooled embedding (``repro.losses.nd``).

The class means of the teacher's embeddings are computed once, before training, from one pass of the run's own
augmented training batches (``ctx.sample_batches``) with the teacher in eval mode, as the official
emb_fea_distribution.py does over the training set with the training transform. A student narrower or wider
than the teacher gets the trainable projector (optimised with the student), as in the official EmbTrans.

One term, as the official train_kd.py sums it: ``kd_weight * min(1, e / warmup) * KD_T + nd_weight * ND`` with
its 0-based epoch e (so the KD part is 0 in the first epoch and full from epoch ``warmup + 1``); the ND part has
no warm-up.
"""
from __future__ import annotations

import sys
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from repro.core.domains import EPOCHS, NONNEGATIVE, POSITIVE, POSITIVE_INT, optional
from repro.core.errors import ReproError
from repro.losses.logit import kd_loss
from repro.losses.nd import EmbeddingProjector, class_means, nd_loss
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext, forward_model
from repro.methods.head_importance import preserved_rng


@LOSS_TERMS.register("kdpp")
class KDPlusPlus(LossTerm):
    features = "feat"
    domains = {"kd_weight": NONNEGATIVE, "nd_weight": NONNEGATIVE, "temperature": POSITIVE, "warmup": EPOCHS,
               "center_batches": optional(POSITIVE_INT)}

    # Defaults: WangYZ1608/Knowledge-Distillation-via-ND ImageNet/train_kd.py argparse (--kd_loss_factor 1,
    # --nd_loss_factor 1, --t 1, --warm_up 5); the per-pair factors come from the spec (ImageNet/train.sh).
    # center_batches None: the whole training set (one pass of epoch 1's batches).
    def __init__(self, ctx: TermContext, kd_weight: float = 1.0, nd_weight: float = 1.0, temperature: float = 1.0,
                 warmup: int = 5, center_batches: Optional[int] = None) -> None:
        super().__init__(ctx)
        if not ctx.student_feat_dims or not ctx.teacher_feat_dims:
            raise ReproError("kdpp needs the embedding widths of student and teacher (TermContext.*_feat_dims)")
        self.kd_weight, self.nd_weight = float(kd_weight), float(nd_weight)
        self.temperature, self.warmup = float(temperature), int(warmup)
        student_dim, teacher_dim = int(ctx.student_feat_dims[-1]), int(ctx.teacher_feat_dims[-1])
        self.projector = (EmbeddingProjector(student_dim, teacher_dim, device=ctx.device)
                          if student_dim != teacher_dim else None)
        centers, counts = self._teacher_class_means(ctx, center_batches)
        self.register_buffer("class_centers", centers.to(ctx.device, torch.float32), persistent=False)
        self._report = {"class_centers": {"images": int(counts.sum()), "classes_seen": int((counts > 0).sum()),
                                          "batches": "all" if center_batches is None else int(center_batches)},
                        "projector": self.projector is not None}

    @staticmethod
    def _teacher_class_means(ctx: TermContext, center_batches: Optional[int]) -> tuple[Tensor, Tensor]:
        if ctx.teacher is None or ctx.sample_batches is None:
            raise ReproError("kdpp needs the teacher and the training batches (TermContext.sample_batches) to "
                             "compute the teacher's class means")
        teacher = ctx.teacher
        was_training = teacher.training
        teacher.eval()

        def embeddings() -> Iterator[tuple[Tensor, Tensor]]:
            count = sys.maxsize if center_batches is None else int(center_batches)  # maxsize: the whole epoch
            for batch in ctx.sample_batches(count):
                with torch.no_grad():
                    _, feats = forward_model(teacher, batch.images, True, False)
                yield feats[-1].flatten(1), batch.labels

        try:
            with preserved_rng(ctx.device):  # the pass must not shift the training run's random draws
                return class_means(embeddings(), ctx.num_classes)
        finally:
            teacher.train(was_training)

    def report(self) -> dict[str, Any]:
        return self._report

    def kd_factor(self, epoch: int) -> float:
        """The official ``min(1, epoch / warm_up)`` with its 0-based epoch (ours is 1-based)."""
        return 1.0 if self.warmup == 0 else min(1.0, (epoch - 1) / self.warmup)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None and out.teacher_logits is not None
        student_emb = out.feats[-1].flatten(1)
        if self.projector is not None:
            student_emb = self.projector(student_emb)
        nd = nd_loss(student_emb, out.teacher_feats[-1].flatten(1), self.class_centers, batch.labels)
        kd = kd_loss(out.logits, out.teacher_logits, self.temperature)
        return self.kd_weight * self.kd_factor(batch.epoch) * kd + self.nd_weight * nd
