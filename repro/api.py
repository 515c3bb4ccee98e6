"""A small Python API for notebooks: the functions ``repro plan|run|report`` call.

    from repro import api
    spec = api.load_spec("wttm/figure1-entropy", overrides=["tiers.smoke.epochs=2"])
    plan = api.plan(spec, "smoke")
    api.run(plan, runs="runs", device="cpu")
    api.report("wttm-figure1", "smoke", runs="runs", overrides=["tiers.smoke.epochs=2"])

Overrides are ``--set`` strings (``repro.harness.overrides``); a plan records them on the runs they change, as the CLI's
does. ``run`` executes in this process (the CLI's local path; Slurm and multi-process runs are the CLI's).
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional, Sequence, Union

from repro.harness.compare import CellResult, compare_plan
from repro.core.errors import ReproError
from repro.harness.plan import Plan, plan_spec
from repro.harness.spec import Spec
from repro.harness.store import RunStore

__all__ = ["load_spec", "plan", "run", "report", "output_plans", "compare"]


def load_spec(spec_ref: str, overrides: Sequence[str] = ()) -> Spec:
    """A validated spec (id or YAML path) with ``--set`` overrides applied; the file is never written."""
    from repro.harness.overrides import parse_override
    from repro.harness.spec import load_spec as load

    spec = load(spec_ref, overrides=[parse_override(o) for o in overrides])
    spec._loaded_as = (spec_ref, tuple(overrides))  # so that plan() records the overrides on the runs
    return spec


def plan(spec: Union[str, Spec], tier: str = "smoke", seeds: Optional[int] = None,
         overrides: Sequence[str] = (), teacher_gate: bool = True, teacher_source: Optional[str] = None) -> Plan:
    """The runs of a spec (a spec id, a YAML path, or a spec from ``load_spec``) at ``tier``."""
    if isinstance(spec, Spec):
        if spec._loaded_as is None:
            raise ReproError("api.plan: pass a spec id or path, or a spec from repro.api.load_spec")
        ref, loaded_with = spec._loaded_as
        overrides = [*loaded_with, *overrides]
    else:
        ref = spec
    return plan_spec(ref, tier, seeds, teacher_gate, teacher_source, overrides)


def output_plans(output: str, tier: str = "smoke", seeds: Optional[int] = None, overrides: Sequence[str] = (),
                 teacher_gate: bool = True, teacher_source: Optional[str] = None) -> list[Plan]:
    """The plans of every spec that renders into ``tables/<output>.md``. With several specs a cell override
    applies where its cells are; one that reaches no spec, or a cell index (ambiguous there), is an error."""
    from repro.harness.overrides import parse_override
    from repro.harness.spec import specs_for_output

    spec_ids = specs_for_output(output)
    several = len(spec_ids) > 1
    if several:
        for text in overrides:
            if any(isinstance(step, int) for step in parse_override(text).path):
                raise ReproError(f"--set {text!r}: output {output!r} renders {len(spec_ids)} specs, so a cell index "
                                 f"is ambiguous; address the cell as cells[TEACHER->STUDENT/METHOD]")
    plans = [plan_spec(s, tier, seeds, teacher_gate, teacher_source, overrides, unmatched_cells_ok=several)
             for s in spec_ids]
    reached = {text for p in plans for text in p.overrides}
    for text in overrides:
        if parse_override(text).text not in reached:
            raise ReproError(f"--set {text!r}: matches no cell of any spec of output {output!r}")
    return plans


def run(plan: Plan, runs: Optional[Union[str, Path]] = None, device: str = "auto", progress: bool = False,
        retry_failed: bool = False):
    """Train what is pending in ``plan`` into the store ``runs`` (default ``$REPRO_RUNS`` or ./runs); returns
    the execution summary (done, cached, failed, blocked run ids)."""
    from repro.train.distributed import resolve_device
    from repro.harness.execute import execute

    return execute(plan, RunStore(Path(runs) if runs else None), resolve_device(device), progress=progress,
                   retry_failed=retry_failed)


def compare(plan: Plan, runs: Optional[Union[str, Path]] = None) -> list[CellResult]:
    """Each cell of ``plan`` with its runs' mean/std and verdict (what a table row shows)."""
    return compare_plan(plan, RunStore(Path(runs) if runs else None))


Sections = list[tuple[Plan, list[CellResult]]]


def compare_sections(plans: list[Plan], runs: Optional[Union[str, Path]] = None) -> Sections:
    """Each plan with its compared cells: what ``report`` renders and ``check_floors`` checks, read once."""
    store = RunStore(Path(runs) if runs else None)
    return [(p, compare_plan(p, store)) for p in plans]


def check_floors(sections: Sections) -> list[str]:
    """The compared cells below their tier's learning floor (``Spec.tier_floors``), one line each."""
    from repro.harness.floors import floor_problems

    return floor_problems(sections)


def report(output: str, tier: str = "smoke", runs: Optional[Union[str, Path]] = None,
           tables: Union[str, Path] = "tables", seeds: Optional[int] = None, overrides: Sequence[str] = (),
           command: Optional[str] = None, plans: Optional[list[Plan]] = None,
           sections: Optional[Sections] = None) -> tuple[Path, Path]:
    """Render ``tables/<output>.md`` and ``.csv`` from the store; returns their paths. ``sections``: the plans
    already compared (``compare_sections``), so a caller that also checks them reads the results once."""
    from repro.harness.render.tables import render_output

    if sections is None:
        plans = plans if plans is not None else output_plans(output, tier, seeds, overrides)
        sections = compare_sections(plans, runs)
    sets = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    return render_output(output, tier, sections, Path(tables), command or f"repro.api.report({output!r}, "
                         f"{tier!r}){sets}")
