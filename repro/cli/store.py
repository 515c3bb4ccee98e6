"""``repro runs / export / import``: what the run store holds, and moving finished runs between stores."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from repro.cli import command
from repro.cli.options import (RUN_STORE_HELP, TEACHER_SOURCES, TIER_CHOICES, override_options, plan_of, store_of,
                               tier_options)


@command("runs")
def cmd_runs(args: argparse.Namespace) -> int:
    """The runs of the store, or of a spec's plans (every tier unless --tier), as a table."""
    from repro.harness.inventory import runs_rows, runs_table
    from repro.harness.spec import TIERS

    plans = []
    if args.spec:
        for tier in [args.tier] if args.tier else TIERS:
            args_tier = argparse.Namespace(**{**vars(args), "tier": tier})
            plans.append(plan_of(args.spec, args_tier))
    rows = runs_rows(store_of(args), plans, args.tier, args.status)
    if rows:
        print(runs_table(rows))
    print(f"{len(rows)} runs" + (f" with status {args.status}" if args.status else ""))
    return 0


@command("export")
def cmd_export(args: argparse.Namespace) -> int:
    from repro.harness.bundles import export_bundle

    summary = export_bundle([plan_of(args.spec, args)], store_of(args), Path(args.output), args.with_weights)
    print(f"wrote {summary.path}: {len(summary.runs)} runs" +
          (f" ({len(summary.skipped)} planned runs without a result left out)" if summary.skipped else ""))
    return 0


@command("import")
def cmd_import(args: argparse.Namespace) -> int:
    from repro.harness.bundles import import_bundle

    summary = import_bundle(Path(args.bundle), store_of(args))
    print(f"{args.bundle}: {len(summary.imported)} runs imported, {len(summary.present)} already present with the "
          f"same numbers, {len(summary.conflicts)} conflicts")
    for line in summary.conflicts:
        print(f"conflict: {line}")
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("runs", help="list runs (id, label, tier, status, top-1, epochs, wall time, origin)")
    p.add_argument("spec", nargs="?", default=None, help="a spec id or YAML path: its planned runs, started or not")
    p.add_argument("--tier", choices=TIER_CHOICES, default=None)
    p.add_argument("--status", default=None,
                   choices=["pending", "submitted", "running", "interrupted", "done", "failed"])
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--no-teacher-gate", action="store_true")
    p.add_argument("--teachers", choices=TEACHER_SOURCES, default=None)
    p.add_argument("--runs", default=None, help=RUN_STORE_HELP)
    override_options(p)
    p = sub.add_parser("export", help="write a spec's finished runs into one bundle (tar.gz with sha256 manifest)")
    p.add_argument("spec")
    p.add_argument("-o", "--output", required=True, help="the bundle file to write, e.g. wttm-smoke.tar.gz")
    p.add_argument("--with-weights", action="store_true", help="include model.pt (needed to train on top of them)")
    tier_options(p)
    override_options(p)
    p = sub.add_parser("import", help="verify a bundle and add its runs to the store (never replaces a result)")
    p.add_argument("bundle")
    p.add_argument("--runs", default=None, help=RUN_STORE_HELP)
