"""CRD (Tian et al., ICLR 2020) as RepDistiller and the TTM repo run it (``--distill crd``).

The term draws its own negatives from ``ctx.train_labels`` and ``batch.indices`` on the device, so the data
pipeline only has to return dataset indices. Its embedding heads are trainable and optimised with the student.
"""
from __future__ import annotations

import torch
from torch import Tensor

from repro.core.errors import ReproError
from repro.losses.crd import (CONTRAST_MODES, ContrastMemory, EmbedHead, class_size_bounds, nce_contrast_loss,
                              sample_contrast_indices)
from repro.core.domains import POSITIVE, POSITIVE_INT, PROBABILITY, one_of
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext


def last_feature_dims(ctx: TermContext, term: str) -> tuple[int, int]:
    """(student, teacher) width of the last (pooled) feature, from the training loop's probe forward."""
    if not ctx.student_feat_dims or not ctx.teacher_feat_dims:
        raise ReproError(f"{term} needs the feature widths of student and teacher (TermContext.*_feat_dims)")
    return int(ctx.student_feat_dims[-1]), int(ctx.teacher_feat_dims[-1])


@LOSS_TERMS.register("crd")
class CRD(LossTerm):
    features = "feat"
    reads_teacher_features = "last"  # teacher_feats[-1] only
    domains = {"feat_dim": POSITIVE_INT, "k": POSITIVE_INT, "nce_t": POSITIVE, "nce_m": PROBABILITY,
               "mode": one_of(*CONTRAST_MODES)}

    # Defaults: RepDistiller train_student.py / TTM repo CLI (--feat_dim 128, --nce_k 16384, --nce_t 0.07,
    # --nce_m 0.5, --mode exact), i.e. the CRD paper's CIFAR-100 setting. Its weight (0.8 in the WTTM tables)
    # comes from the spec.
    def __init__(self, ctx: TermContext, feat_dim: int = 128, k: int = 16384, nce_t: float = 0.07,
                 nce_m: float = 0.5, mode: str = "exact") -> None:
        super().__init__(ctx)
        student_dim, teacher_dim = last_feature_dims(ctx, "crd")
        n_data = len(ctx.train_labels)
        if n_data == 0:
            raise ReproError("crd needs the training-set labels (TermContext.train_labels is empty)")
        self.k = int(k)
        self.mode = str(mode)
        self.embed_student = EmbedHead(student_dim, feat_dim, device=ctx.device)
        self.embed_teacher = EmbedHead(teacher_dim, feat_dim, device=ctx.device)
        self.memory = ContrastMemory(feat_dim, n_data, nce_t, nce_m, device=ctx.device)
        # Not saved with the term: it is the dataset's, and the run rebuilds it from the data.
        self.register_buffer("train_labels", ctx.train_labels.to(ctx.device, torch.long), persistent=False)
        if self.mode not in CONTRAST_MODES:
            raise ReproError(f"crd: unknown mode {self.mode!r}; known: {', '.join(CONTRAST_MODES)}")
        if self.k < 1 or self.train_labels.unique().numel() < 2:
            raise ReproError(f"crd needs k >= 1 (got {self.k}) and a training set with at least two classes")
        self.class_sizes = class_size_bounds(self.train_labels)  # one host read here, none per step

    def contrast_indices(self, indices: Tensor) -> Tensor:
        """[B, k+1] dataset indices (positive first) for the batch; drawn with the global RNG."""
        return sample_contrast_indices(self.train_labels, indices, self.k, self.mode, class_sizes=self.class_sizes)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None
        emb_student = self.embed_student(out.feats[-1])
        emb_teacher = self.embed_teacher(out.teacher_feats[-1].detach())
        indices = batch.indices.to(self.train_labels.device, torch.long)
        contrast_idx = self.contrast_indices(indices)
        probs_student, probs_teacher = self.memory(emb_student, emb_teacher, contrast_idx, indices)
        n_data = self.memory.n_data
        return nce_contrast_loss(probs_student, n_data) + nce_contrast_loss(probs_teacher, n_data)
