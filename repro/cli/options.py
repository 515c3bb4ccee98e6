"""The options shared by the command groups (one definition each) and what they turn into (store, device, plan).

A command group's parser calls ``tier_options``, ``running_options`` and ``override_options``; a default changed
here changes it for every command that takes the option.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

TIER_CHOICES = ["smoke", "proxy", "full"]
TEACHER_SOURCES = ["train", "checkpoint", "pretrained"]
RUN_STORE_HELP = "run store folder (default: $REPRO_RUNS or ./runs)"


def tier_options(p: argparse.ArgumentParser, tier: bool = True) -> None:
    """--tier/--seeds/--no-teacher-gate/--teachers (unless ``tier=False``), --runs, --device, --tables."""
    if tier:
        p.add_argument("--tier", choices=TIER_CHOICES, default="full")
        p.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the paper's run count)")
        p.add_argument("--no-teacher-gate", action="store_true",
                       help="use checkpoint teachers even when their accuracy is off the reported value")
        p.add_argument("--teachers", choices=TEACHER_SOURCES, default=None,
                       help="where teachers come from (default: the spec's tier setting)")
    p.add_argument("--runs", default=None, help=RUN_STORE_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--tables", default="tables", help="where markdown/CSV tables are written")


def running_options(p: argparse.ArgumentParser) -> None:
    """The options of commands that execute runs (and the executors' --executor/--jobs/--nproc/...)."""
    from repro.harness.executors import add_scaleout_arguments

    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-estimate", action="store_true", help="skip the throughput micro-benchmark")
    p.add_argument("--budget-hours", type=float, default=None, help="refuse a plan estimated above this")
    p.add_argument("--log", default=None, metavar="NAMES",
                   help="run loggers, comma-separated (tensorboard, wandb) or none; default: tensorboard when "
                        "installed (also $REPRO_LOGGERS)")
    p.add_argument("--estimate-device", default=None,
                   help="--executor slurm: estimate on this device (its name as measured and cached before, "
                        "e.g. 'NVIDIA A100-SXM4-80GB'), not on this machine")
    add_scaleout_arguments(p)


def override_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value (repeatable): recipe.epochs=60, "
                        "methods.KD.losses.kd.temperature=2, cells[3].params.wttm.gamma=0.2, "
                        "cells[wrn_40_2->wrn_16_2/WTTM].params.wttm.gamma=0.2; the spec file is not written")


def device_of(args: argparse.Namespace) -> Any:
    from repro.train.distributed import resolve_device

    return resolve_device(args.device)


def store_of(args: argparse.Namespace) -> Any:
    from repro.harness.store import RunStore

    return RunStore(Path(args.runs) if args.runs else None)


def plan_of(spec_ref: str, args: argparse.Namespace) -> Any:
    from repro import api

    return api.plan(spec_ref, args.tier, args.seeds, getattr(args, "overrides", None) or (),
                    teacher_gate=not args.no_teacher_gate, teacher_source=args.teachers)


def output_plans_of(output: str, args: argparse.Namespace) -> list:
    from repro import api

    return api.output_plans(output, args.tier, args.seeds, getattr(args, "overrides", None) or (),
                            teacher_gate=not args.no_teacher_gate, teacher_source=args.teachers)


def set_flags(args: argparse.Namespace) -> str:
    """The --set part of a command line, as stamped on a table."""
    return "".join(f" --set {shlex.quote(text)}" for text in getattr(args, "overrides", None) or [])
