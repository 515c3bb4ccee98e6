"""The models of a spec's runs, evaluated for analysis figures: the teacher, teaching assistant(s) and students of
a plan's cells (finished runs only), each evaluated once on the chosen suites into a record kept beside the run
(reused while the data, options and suites are the same). ``ctx`` is the ``repro figures`` context
(``repro.harness.render.figure_steps.FigureContext``): its tier, store, device and command-line arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from repro.analyses.records import cached_record, default_record_path, distinct_names, evaluate_record
from repro.analyses.resolve import (IMAGENET_CLASSES, default_image_size, load_model,
                                    run_normalization)
from repro.analyses.suite_config import (EvalData, SuiteOptions, build_synthetic_eval_data, data_flags,
                                         data_from_args)


@dataclass
class AnalysisModel:
    label: str
    run_id: str
    role: str  # "teacher", "assistant" or "student"


def analysis_models(plan: Any, store: Any) -> list[AnalysisModel]:
    """Teacher, teaching assistant(s) and students of a spec's cells (seed 0 of each), finished runs only,
    each run once, in the order the cells name them."""
    models: dict[str, AnalysisModel] = {}

    def add(run_id: Optional[str], label: str, role: str) -> None:
        if run_id and run_id not in models and store.is_done(run_id):
            models[run_id] = AnalysisModel(label, run_id, role)

    def name(key: Optional[str]) -> str:
        # Display only: timm's "_patch16_224" suffix is the same for every ViT of a spec and crowds the legends.
        return plan.spec.arch_of(key).replace("_patch16_224", "").replace("_p16_224", "") if key else "?"

    for cell_runs in plan.cells:
        cell = cell_runs.cell
        for run_id in cell_runs.run_ids[:1]:
            config = plan.runs[run_id].config
            add((config.get("teacher") or {}).get("run"), f"teacher {name(cell.teacher)}", "teacher")
            for ref in (config.get("assistants") or {}).values():
                add(ref["run"], f"TA {name(cell.assistant)}", "assistant")
            if cell_runs.method.role == "teacher":
                add(run_id, f"teacher {name(cell.teacher)}", "teacher")
            else:
                add(run_id, f"{cell.method} {name(cell.student)}", "student")
    return list(models.values())


def analysis_data(ctx: Any, num_outputs: int, image_size: int, suites: Sequence[str]) -> EvalData:
    """Synthetic data at the smoke tier (or with --synthetic-data), else the folders given on the command line."""
    if ctx.tier == "smoke" or ctx.args.synthetic_data:
        root = Path(ctx.args.synthetic_root) / f"{num_outputs}way-{image_size}px"
        return build_synthetic_eval_data(root, num_outputs, image_size, suites)
    return data_from_args(ctx.args)


def evaluate_analysis_model(ctx: Any, entry: AnalysisModel, other: Optional[AnalysisModel]
                            ) -> Optional[dict[str, Any]]:
    """The record of one analysis model: ImageNet-C, shape bias (1000-way models only) and, for the teacher of the
    top-10 pair, top10 against the TA. Skipped suites are reported on the console with the reason."""
    from repro.core.io import atomic_write_json

    model = load_model(entry.run_id, ctx.store, ctx.device)
    model.label = entry.label  # the figure's short name, not the run's long label
    suites = ["imagenet-c"]
    if model.num_classes == IMAGENET_CLASSES:
        suites.append("shape-bias")
    else:
        print(f"  {entry.label}: shape bias skipped (it needs 1000-way ImageNet outputs, the model has "
              f"{model.num_classes})")
    other_model = None
    if other is not None:
        other_model = load_model(other.run_id, ctx.store, ctx.device)
        other_model.label = other.label
        suites.append("top10")
    image_size = default_image_size(model)
    data = analysis_data(ctx, model.num_classes, image_size, suites)
    missing = [s for s in suites if data.root_for(s) is None]
    if missing:
        print(f"  {entry.label}: {', '.join(missing)} skipped: pass "
              f"{' '.join(data_flags(missing))}")
        suites = [s for s in suites if s not in missing]
    if not suites:
        return None
    path = default_record_path(model, ctx.store, data.synthetic)
    mean, std = run_normalization(model)
    options = SuiteOptions(image_size=image_size, mean=mean, std=std, progress=not ctx.args.no_progress,
                           num_workers=0 if data.synthetic else None)
    names = distinct_names(model.label, other_model.label) if other_model is not None else None
    record = cached_record(path, data, suites, options, names)
    if record is None:
        record = evaluate_record(model, suites, data, options, ctx.device, other_model,
                                 command=f"repro figures --tier {ctx.tier}")
        atomic_write_json(path, record)
    return record
