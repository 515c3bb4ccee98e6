"""WTTM's figures (``repro figures``): Figure 1, the student's mean predictive entropy per epoch, drawn from the
entropy logged by the runs of spec wttm/figure1-entropy."""
from __future__ import annotations

from pathlib import Path

from repro.harness.render.figure_steps import FigureContext, figure

FIGURE1_SPEC = "wttm/figure1-entropy"
ENTROPY_FIGURE = "entropy-wttm-figure1.png"


@figure("entropy")
def entropy_step(ctx: FigureContext) -> list[Path]:
    """WTTM Figure 1 from the entropy logged by the runs of spec wttm/figure1-entropy."""
    from repro.harness.render.figures import gather_entropy_curves, plot_entropy_curves

    plan = ctx.plan(FIGURE1_SPEC)
    curves = gather_entropy_curves(plan, ctx.store)
    title = "WTTM Figure 1: student's mean predictive entropy H(q) per epoch (KD λ=0.9, TTM β=36, WTTM β=36/Ū; T=4)"
    return [plot_entropy_curves(curves, ctx.out_dir / ENTROPY_FIGURE, ctx.stamp, title)]
