"""The probed feature shapes a term with connectors builds them from (``TermContext.*_feat_shapes``)."""
from __future__ import annotations

from repro.core.errors import ReproError
from repro.methods.base import TermContext


def probed_shapes(ctx: TermContext, term: str) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(student, teacher) per-sample shapes of every feature, from the training loop's probe forward."""
    if not ctx.student_feat_shapes or not ctx.teacher_feat_shapes:
        raise ReproError(f"{term} needs the feature shapes of student and teacher (TermContext.*_feat_shapes)")
    if len(ctx.student_feat_shapes) != len(ctx.teacher_feat_shapes):
        raise ReproError(f"{term}: student and teacher have different numbers of feature stages "
                         f"({len(ctx.student_feat_shapes)} vs {len(ctx.teacher_feat_shapes)})")
    return [tuple(s) for s in ctx.student_feat_shapes], [tuple(t) for t in ctx.teacher_feat_shapes]
