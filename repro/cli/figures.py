"""``repro figures --tier T``: every registered figure of a tier into ``figures/`` (``repro.harness.render.figure_steps``;
each paper's figures are defined in its folder). At the smoke tier it first runs the smoke runs they need
(plan + execute, as ``repro run``) and evaluates the analysis models on synthetic data.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from repro.analyses.suite_config import SMOKE_EVAL_ROOT
from repro.cli import command
from repro.cli.options import RUN_STORE_HELP, TIER_CHOICES, device_of, store_of
from repro.core.errors import ReproError


def add_figures_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("figures", help="write every figure of a tier into figures/ (PNG)")
    p.add_argument("--tier", choices=TIER_CHOICES, default="full")
    p.add_argument("--only", help="comma-separated figure groups (default: all; an unknown name lists them)")
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--run", dest="run_first", action="store_true", default=None,
                      help="run the pending runs the figures need first (default at the smoke tier only)")
    runs.add_argument("--no-run", dest="run_first", action="store_false", help="draw from the store as it is")
    p.add_argument("--outputs", help="table outputs for reported-vs-reproduced (default: every output)")
    p.add_argument("--figures", default="figures", help="output folder (default: %(default)s)")
    p.add_argument("--tables", default="tables", help="where the table CSVs are read from")
    p.add_argument("--runs", help=RUN_STORE_HELP)
    p.add_argument("--device", default="auto")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--no-teacher-gate", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--analysis-spec", help="spec whose models the analysis figures evaluate (default: the paper's "
                                           "choice, see its figures.py)")
    p.add_argument("--data-root", help="ImageNet val folder (top-10 analysis)")
    p.add_argument("--imagenet-c-root", help="ImageNet-C folder")
    p.add_argument("--cue-conflict-root", help="cue-conflict stimuli folder")
    p.add_argument("--corruptions", help="ImageNet-C corruptions (default: the 15 of mCE)")
    p.add_argument("--synthetic-data", action="store_true", help="evaluate on synthetic data at any tier")
    p.add_argument("--synthetic-root", default=str(SMOKE_EVAL_ROOT), help="where synthetic evaluation data goes")
    return p


def run_figures(args: argparse.Namespace) -> int:
    from repro.harness.render.figure_steps import FigureContext, figure_steps
    from repro.harness.render.figures import figure_stamp

    registered = figure_steps()
    steps = list(registered) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in steps if s not in registered]
    if unknown:
        raise ReproError(f"--only: unknown figure group(s) {unknown}; known: {', '.join(registered)}")
    run_first = args.run_first if args.run_first is not None else args.tier == "smoke"
    ctx = FigureContext(args, args.tier, store_of(args), device_of(args), Path(args.figures),
                        figure_stamp(args.tier), run_first)
    started = time.perf_counter()
    written = []
    for step in steps:
        step_started = time.perf_counter()
        paths = registered[step](ctx)
        written += paths
        print(f"{step}: {len(paths)} figure(s) in {time.perf_counter() - step_started:.0f} s")
    for path in written:
        print(f"wrote {path}")
    print(f"figures [{args.tier}]: {len(written)} written in {time.perf_counter() - started:.0f} s")
    return 0



@command("figures")
def cmd_figures(args: argparse.Namespace) -> int:
    return run_figures(args)


def add_parsers(sub: Any) -> None:
    add_figures_parser(sub)
