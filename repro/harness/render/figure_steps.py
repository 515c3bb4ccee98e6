"""The figures of ``repro figures``: a registry of named figure steps and the context they draw in.

A step is ``fn(ctx) -> [written PNG paths]``, registered with ``@figure("name")``. Each paper's steps live in its
folder (``repro/papers/<paper>/figures.py``: which spec and runs they read, their titles, how they plot) and are
registered when ``figure_steps()`` imports them (``repro.papers.load_figure_modules``); this module holds only what
every paper shares, the reported-vs-reproduced figure of every table output, drawn last so that it sees the runs
the other steps have just finished.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from repro.core.errors import ReproError


@dataclass
class FigureContext:
    args: argparse.Namespace
    tier: str
    store: Any
    device: torch.device
    out_dir: Path
    stamp: str
    run_first: bool
    plans: dict[str, Any] = field(default_factory=dict)
    executed: set[str] = field(default_factory=set)

    def plan(self, spec_id: str) -> Any:
        """The spec's plan at this tier; run first (once) when the command runs what it needs."""
        from repro.harness.plan import make_plan
        from repro.harness.execute import execute
        from repro.harness.spec import load_spec

        if spec_id not in self.plans:
            self.plans[spec_id] = make_plan(load_spec(spec_id), self.tier, self.args.seeds,
                                            teacher_gate=not self.args.no_teacher_gate)
        if self.run_first and spec_id not in self.executed:
            self.executed.add(spec_id)
            started = time.perf_counter()
            summary = execute(self.plans[spec_id], self.store, self.device, progress=not self.args.no_progress)
            print(f"{spec_id} [{self.tier}]: {len(summary.done)} trained, {len(summary.cached)} cached, "
                  f"{len(summary.failed)} failed, {len(summary.blocked)} blocked "
                  f"({time.perf_counter() - started:.0f} s)")
        return self.plans[spec_id]


FigureStep = Callable[["FigureContext"], list[Path]]


@dataclass(frozen=True)
class FigureDef:
    draw: FigureStep
    last: bool  # drawn after every other step (it reads what they ran)


_FIGURES: dict[str, FigureDef] = {}


def figure(name: str, *, last: bool = False) -> Callable[[FigureStep], FigureStep]:
    """Decorator: register a figure step under ``name`` (the ``--only`` name). The same function registered again
    (its module imported again from its file) replaces itself; another function under a taken name is refused."""

    def add(fn: FigureStep) -> FigureStep:
        old = _FIGURES.get(name)
        if old is not None and (old.draw.__module__, old.draw.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ReproError(f"figure {name!r} is registered twice: by {old.draw.__module__} and {fn.__module__}")
        _FIGURES[name] = FigureDef(fn, last)
        return fn

    return add


def figure_steps() -> dict[str, FigureStep]:
    """Every figure step, in drawing order: each paper's (papers in name order, steps in the order their module
    registers them), then the shared ones marked ``last``. Only papers found now count (``$REPRO_PAPERS`` may have
    changed since a paper's module registered its figures)."""
    from repro.papers import is_paper_module, load_figure_modules

    papers = load_figure_modules()  # module names, in paper name order

    def rank(item: tuple[str, FigureDef]) -> tuple[bool, int]:
        module = item[1].draw.__module__
        return item[1].last, papers.index(module) if module in papers else len(papers)

    current = [(n, d) for n, d in _FIGURES.items()
               if d.draw.__module__ in papers or not is_paper_module(d.draw.__module__)]
    return {name: d.draw for name, d in sorted(current, key=rank)}  # stable: registration order within a paper


@figure("reported-vs-reproduced", last=True)
def reported_vs_reproduced_step(ctx: FigureContext) -> list[Path]:
    """One figure per table output, from ``tables/<output>.csv`` when it is of this tier, else from the store.
    An output whose specs do not load is skipped with its error (the other figures are still drawn)."""
    from repro.harness.render.figures import REPORTED_VS_REPRODUCED, plot_reported_vs_reproduced
    from repro.harness.spec import all_outputs

    outputs = [o.strip() for o in ctx.args.outputs.split(",") if o.strip()] if ctx.args.outputs else all_outputs()
    written = []
    for output in outputs:
        try:
            frame, source = output_frame(output, ctx)
        except ReproError as err:
            print(f"reported-vs-reproduced: {output} skipped: {err}")
            continue
        title = f"{output}: reported vs reproduced top-1 ({ctx.tier} tier)"
        if ctx.tier != "full":
            title += "\n(not comparable with the paper at this tier)"
        path = ctx.out_dir / REPORTED_VS_REPRODUCED.format(output=output)
        written.append(plot_reported_vs_reproduced(frame, path, f"{ctx.stamp}  source={source}", title))
    return written


def output_frame(output: str, ctx: FigureContext) -> tuple[Any, str]:
    """The output's cells as the table CSV has them: the CSV if it is of this tier, else recomputed."""
    import pandas as pd

    from repro.harness.compare import compare_plan
    from repro.harness.render.figures import read_table_csv
    from repro.harness.render.tables import CSV_COLUMNS, csv_rows
    from repro.harness.spec import specs_for_output

    csv_path = Path(ctx.args.tables) / f"{output}.csv"
    if csv_path.is_file():
        frame = read_table_csv(csv_path)
        if len(frame) and set(frame["tier"]) == {ctx.tier}:
            return frame, str(csv_path)
    rows = []
    for spec_id in specs_for_output(output):
        rows += csv_rows(compare_plan(ctx.plans.get(spec_id) or _plan_only(ctx, spec_id), ctx.store))
    return pd.DataFrame(rows, columns=CSV_COLUMNS), "run store"


def _plan_only(ctx: FigureContext, spec_id: str) -> Any:
    from repro.harness.plan import make_plan
    from repro.harness.spec import load_spec

    return make_plan(load_spec(spec_id), ctx.tier, ctx.args.seeds, teacher_gate=not ctx.args.no_teacher_gate)

