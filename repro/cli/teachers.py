"""``repro teachers fetch | train | cache``: the public CIFAR teachers, training them, precomputing their outputs."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from repro.cli import command
from repro.cli.options import device_of, plan_of, running_options, store_of, tier_options
from repro.cli.plan import cmd_table
from repro.core.errors import ReproError


@command("teachers")
def cmd_teachers(args: argparse.Namespace) -> int:
    from repro.models import teachers

    if args.action == "fetch":
        dest = Path(args.dest) if args.dest else _teachers_root(args)
        paths = teachers.fetch_teachers(dest)
        print(f"sha256 lock: {teachers.user_lock_path(dest)}")
        for arch, path in sorted(paths.items()):
            print(f"{arch}: {path}")
        return 0
    if args.action == "train":
        args.output = "wttm-teachers"
        return cmd_table(args)
    if args.action == "cache":
        from repro.harness.execute import cache_teachers

        for run_id, computed in cache_teachers(plan_of(args.spec, args), store_of(args), device_of(args)):
            print(f"teacher {run_id}: {computed} views computed")
        return 0
    raise ReproError(f"unknown teachers action {args.action!r}")


def _teachers_root(args: argparse.Namespace) -> Path:
    """The teacher root the planner uses for ``--spec`` at ``--tier``: one root for fetching and planning."""
    from repro.harness.plan import teachers_root
    from repro.harness.spec import load_spec

    return teachers_root(load_spec(args.spec).recipe_for(args.tier))


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("teachers", help="fetch the public CIFAR teachers, train them, or precompute their outputs")
    p.add_argument("action", choices=["fetch", "train", "cache"])
    p.add_argument("--dest", default=None,
                   help="fetch: where the checkpoints go (default: the teacher root the planner uses for --spec: "
                        "its teachers.root, else $REPRO_TEACHERS, else teachers/cifar100)")
    p.add_argument("--spec", default="wttm/cifar100-table1",
                   help="fetch: the spec whose teacher root to fill; cache: the spec whose teachers to cache")
    tier_options(p)
    running_options(p)
