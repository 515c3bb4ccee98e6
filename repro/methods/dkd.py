"""DKD (Zhao et al., CVPR 2022) with mdistiller's linear warm-up of the DKD weight."""
from __future__ import annotations

from torch import Tensor

from repro.core.errors import ReproError
from repro.losses.dkd import dkd_loss
from repro.core.domains import EPOCHS, NONNEGATIVE, POSITIVE
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext


@LOSS_TERMS.register("dkd")
class DKD(LossTerm):
    domains = {"alpha": NONNEGATIVE, "beta": NONNEGATIVE, "temperature": POSITIVE, "warmup": EPOCHS}

    # Defaults: mdistiller/engine/cfg.py (CFG.DKD: ALPHA 1, BETA 8, T 4, WARMUP 20, CE_WEIGHT 1). Some CIFAR
    # pairs override beta to 6 (e.g. configs/cifar100/dkd/wrn40_2_wrn_16_2.yaml); the spec sets it per cell.
    # The CE weight 1 is the spec's separate `ce` term, not part of this one.
    def __init__(self, ctx: TermContext, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup: int = 20) -> None:
        super().__init__(ctx)
        if warmup < 0:
            raise ReproError(f"dkd: warmup must be >= 0 epochs, got {warmup}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.warmup = int(warmup)

    def warmup_factor(self, epoch: int) -> float:
        """mdistiller's ``min(epoch / warmup, 1)`` with 1-based epochs (1/20 at epoch 1, 1 from epoch 20)."""
        return 1.0 if self.warmup == 0 else min(epoch / self.warmup, 1.0)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        loss = dkd_loss(out.logits, out.teacher_logits, batch.labels, self.alpha, self.beta, self.temperature)
        return self.warmup_factor(batch.epoch) * loss
