"""VID as RepDistiller runs it (``--distill vid``): one ``VIDRegressor(C_s, C_t, C_t)`` per pair of middle
features ``feat[1:-1]`` (paired in order), trained with the student; the term is the sum of the pairs' losses."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from repro.core.domains import POSITIVE
from repro.core.errors import ReproError
from repro.losses.vid import VID_EPS, VID_INIT_PRED_VAR, VIDRegressor
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext, feature_shapes


@LOSS_TERMS.register("vid")
class VID(LossTerm):
    features = "feat"
    domains = {"init_pred_var": POSITIVE, "eps": POSITIVE}

    # Defaults: RepDistiller distiller_zoo/VID.py VIDLoss(init_pred_var=5.0, eps=1e-5).
    def __init__(self, ctx: TermContext, init_pred_var: float = VID_INIT_PRED_VAR, eps: float = VID_EPS) -> None:
        super().__init__(ctx)
        student_shapes, teacher_shapes = feature_shapes(ctx, "vid")
        pairs = list(zip(student_shapes[1:-1], teacher_shapes[1:-1]))
        if not pairs or any(len(s) != 3 or len(t) != 3 for s, t in pairs):
            raise ReproError(f"vid needs middle feature maps [C, H, W] in student and teacher, got "
                             f"{student_shapes[1:-1]} and {teacher_shapes[1:-1]}")
        if float(init_pred_var) <= float(eps):
            raise ReproError(f"vid: init_pred_var ({init_pred_var}) must exceed eps ({eps})")
        self.pairs = nn.ModuleList(VIDRegressor(s[0], t[0], t[0], init_pred_var, eps, device=ctx.device)
                                   for s, t in pairs)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        assert out.feats is not None and out.teacher_feats is not None
        maps = zip(out.feats[1:-1], out.teacher_feats[1:-1], self.pairs)
        with torch.autocast(out.logits.device.type, enabled=False):  # regressors and log-variances in fp32
            return sum(pair(s.float(), t.detach().float()) for s, t, pair in maps)  # type: ignore[return-value]
