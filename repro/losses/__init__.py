"""Distillation losses as pure functions of tensors (no specs, no runners).

``kd_loss``, ``ttm_loss`` and ``wttm_loss`` return the batch-mean scalar exactly as the official code does
(``wttm.md`` section 1); the other modules add the losses the WTTM tables compare against.
"""
from repro.losses.crd import ContrastMemory, EmbedHead, gathered_scores, nce_contrast_loss, sample_contrast_indices
from repro.losses.dist import dist_loss
from repro.losses.dkd import dkd_loss, dkd_parts
from repro.losses.itrd import itrd_correlation_loss, itrd_mutual_loss
from repro.losses.logit import kd_loss, ttm_loss, wttm_loss, wttm_weight

__all__ = ["kd_loss", "ttm_loss", "wttm_loss", "wttm_weight", "dist_loss", "dkd_loss", "dkd_parts",
           "ContrastMemory", "EmbedHead", "gathered_scores", "nce_contrast_loss", "sample_contrast_indices",
           "itrd_correlation_loss", "itrd_mutual_loss"]
