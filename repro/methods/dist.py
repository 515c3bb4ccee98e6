"""DIST (Huang et al., NeurIPS 2022) as the WTTM tables run it: ``--distill dist`` in the TTM repo."""
from __future__ import annotations

from torch import Tensor

from repro.losses.dist import dist_loss
from repro.core.domains import NONNEGATIVE, POSITIVE
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext


@LOSS_TERMS.register("dist")
class DIST(LossTerm):
    domains = {"beta": NONNEGATIVE, "gamma": NONNEGATIVE, "tau": POSITIVE}

    # Defaults are the TTM repo's CLI defaults (train_student.py: --dist_beta 1, --dist_gamma 1, --dist_tau 4);
    # the term's own weight (the repo's -b) and the CE weight (-r) come from the spec.
    def __init__(self, ctx: TermContext, beta: float = 1.0, gamma: float = 1.0, tau: float = 4.0) -> None:
        super().__init__(ctx)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.tau = float(tau)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        return dist_loss(out.logits, out.teacher_logits, self.beta, self.gamma, self.tau)
