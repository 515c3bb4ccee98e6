"""Distillation losses as pure functions of tensors (no specs, no runners).

``kd_loss``, ``ttm_loss`` and ``wttm_loss`` return the batch-mean scalar exactly as the official code does
(``wttm.md`` section 1); the other modules add the losses the WTTM tables compare against.
"""
from repro.losses.logit import kd_loss, ttm_loss, wttm_loss, wttm_weight

__all__ = ["kd_loss", "ttm_loss", "wttm_loss", "wttm_weight"]
