"""SSTA's figures (``repro figures``): the transfer figure (CIFAR fine-tuning accuracy of teacher, TA and
students, spec ssta/transfer) and the analyses of its models (shape bias, ImageNet-C, top-10 categories), evaluated
on the models of the first analysis spec that loads."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from repro.analyses.spec_models import AnalysisModel, analysis_models, evaluate_analysis_model
from repro.core.errors import ReproError
from repro.harness.render.figure_steps import FigureContext, figure

TRANSFER_SPEC = "ssta/transfer"
# Where the SSTA analysis models (teacher, TA, students) come from: the first of these specs that exists.
ANALYSIS_SPECS = ("ssta/imagenet-main", "ssta/transfer")


@figure("transfer")
def transfer_step(ctx: FigureContext) -> list[Path]:
    """SSTA transfer: CIFAR-10/100 fine-tuning accuracy of teacher, TA and students (spec ssta/transfer)."""
    from repro.harness.compare import compare_plan
    from repro.harness.render.figures import TRANSFER_FIGURE, gather_transfer, plot_transfer

    plan = ctx.plan(TRANSFER_SPEC)
    names = {key: plan.spec.model_def(key).arch or key for key in plan.spec.models}
    frame = gather_transfer(compare_plan(plan, ctx.store), ctx.store, names)
    substituted = plan.spec.tier_models.get(ctx.tier)
    title = f"SSTA transfer: top-1 after fine-tuning on CIFAR ({ctx.tier} tier)"
    if substituted:
        title += "\nmodels substituted at this tier: " + ", ".join(sorted(set(substituted.values())))
    return [plot_transfer(frame, ctx.out_dir / TRANSFER_FIGURE, ctx.stamp, title)]


# ----------------------------------------------------------------------------------------------- SSTA analyses


def top10_pair(models: Sequence[AnalysisModel]) -> Optional[tuple[AnalysisModel, AnalysisModel]]:
    """SSTA's top-10 figure compares the supervised teacher with the self-supervised TA; without a TA (or a
    teacher), the first two models of the spec stand in."""
    teachers = [m for m in models if m.role == "teacher"]
    assistants = [m for m in models if m.role == "assistant"]
    if teachers and assistants:
        return teachers[0], assistants[0]
    return (models[0], models[1]) if len(models) >= 2 else None


def analysis_spec_id(ctx: FigureContext) -> str:
    """``--analysis-spec``, else the first of ANALYSIS_SPECS that exists and loads (a spec being written may not
    load yet: the next one stands in, and the console says so)."""
    from repro.harness.spec import all_spec_ids, load_spec

    if ctx.args.analysis_spec:
        return ctx.args.analysis_spec
    known = set(all_spec_ids())
    for spec_id in ANALYSIS_SPECS:
        if spec_id not in known:
            continue
        try:
            load_spec(spec_id)
        except ReproError as err:
            print(f"SSTA analyses: {spec_id} does not load ({err}); trying the next model source")
            continue
        return spec_id
    raise ReproError(f"SSTA analyses: none of {', '.join(ANALYSIS_SPECS)} loads; pass --analysis-spec")


@figure("ssta-analyses")
def ssta_analyses_step(ctx: FigureContext) -> list[Path]:
    """Shape bias, ImageNet-C and top-10 of the SSTA models (teacher, TA, students of the analysis spec)."""
    from repro.harness.render.analysis_plots import plot_imagenet_c, plot_shape_bias, plot_top10
    from repro.harness.render.figures import (
        IMAGENET_C_FIGURE,
        SHAPE_BIAS_FIGURE,
        TOP10_FIGURE,
        gather_imagenet_c,
        gather_shape_bias,
        gather_top10,
    )

    spec_id = analysis_spec_id(ctx)
    plan = ctx.plan(spec_id)
    models = analysis_models(plan, ctx.store)
    if not models:
        print(f"SSTA analyses: no finished run in {spec_id} [{ctx.tier}] yet; run it first")
        return []
    pair = top10_pair(models)
    records = {}
    for entry in models:
        other = pair[1] if pair is not None and entry is pair[0] else None
        record = evaluate_analysis_model(ctx, entry, other)
        if record is not None:
            records[entry.label] = record
    stamp = f"{ctx.stamp}  models={spec_id}" + ("  data=synthetic" if ctx.tier == "smoke" else "")
    written = []
    per_class, overall = gather_shape_bias(records)
    if per_class:
        written.append(plot_shape_bias(per_class, ctx.out_dir / SHAPE_BIAS_FIGURE, stamp, overall,
                                       title=f"Shape bias on cue-conflict stimuli ({ctx.tier} tier)"))
    errors = gather_imagenet_c(records)
    if errors:
        written.append(plot_imagenet_c(errors, ctx.out_dir / IMAGENET_C_FIGURE, stamp,
                                       metric="Corruption error CE (% of AlexNet's)",
                                       title=f"ImageNet-C corruption error per corruption ({ctx.tier} tier)"))
    table = gather_top10(records)
    if table is not None:
        written.append(plot_top10(table, ctx.out_dir / TOP10_FIGURE, stamp,
                                  title=f"Top-10 categories: correct images per class ({ctx.tier} tier)"))
    for name, figure_name in (("shape bias", SHAPE_BIAS_FIGURE), ("ImageNet-C", IMAGENET_C_FIGURE),
                              ("top-10", TOP10_FIGURE)):
        if not any(path.name == figure_name for path in written):
            print(f"SSTA analyses: no {name} result, {figure_name} not written")
    return written
