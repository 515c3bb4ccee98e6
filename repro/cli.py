"""``repro``: a thin command line over plan / run / report (and the tools around them).

Bad input ends in one line ``error: ...`` on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

from repro.errors import ReproError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def add(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn

    return add


# -- helpers ---------------------------------------------------------------------------------------------------
def _device(args: argparse.Namespace):
    from repro.distributed import resolve_device

    return resolve_device(args.device)


def _store(args: argparse.Namespace):
    from repro.store import RunStore

    return RunStore(Path(args.runs) if args.runs else None)


def _plan(spec_ref: str, args: argparse.Namespace):
    from repro import api

    return api.plan(spec_ref, args.tier, args.seeds, getattr(args, "overrides", None) or (),
                    teacher_gate=not args.no_teacher_gate, teacher_source=args.teachers)


def _output_plans(output: str, args: argparse.Namespace) -> list:
    from repro import api

    return api.output_plans(output, args.tier, args.seeds, getattr(args, "overrides", None) or (),
                            teacher_gate=not args.no_teacher_gate, teacher_source=args.teachers)


def _schedule_summary(config: dict) -> str:
    """``  [400 epochs, ssta_attn until epoch 150]`` for a training run: what the run's config will do."""
    from repro.methods.ssta import scaled_stop_epoch

    if config.get("kind") != "train":
        return ""
    epochs = int(config["recipe"]["epochs"])
    parts = [f"{epochs} epochs"]
    for name, params in (config.get("losses") or {}).items():
        if params.get("stop_epoch") is not None:  # early-stopped terms (SSTA's attention KD)
            stop = scaled_stop_epoch(params["stop_epoch"], params.get("stop_epoch_of"), epochs)
            parts.append(f"{name} until epoch {stop}")
    return f"  [{', '.join(parts)}]"


def _print_plan(plan, store, device, estimate: bool = True, cost=None) -> Optional[float]:
    """Print the plan; returns the estimated seconds of its pending runs (from ``cost``, else measured on
    ``device``), or None when they cannot be estimated (the reason is printed)."""
    from repro.cost import CannotEstimate, CostModel, format_duration

    if cost is None and estimate:
        cost = CostModel(store, device)
    total: Optional[float] = 0.0 if cost is not None else None
    refusal = None
    print(f"plan {plan.spec.id} [tier {plan.tier}]: {len(plan.runs)} runs")
    for text in plan.inert_overrides:
        print(f"note: --set {text} changes no run at tier {plan.tier}{_inert_hint(plan, text)}")
    for run in plan.ordered():
        result = store.result(run.run_id)
        status = result["status"] if result else "pending"
        est = ""
        if status == "pending" and cost is not None and refusal is None:
            try:
                seconds = cost.estimate_seconds(plan, run)
                total += seconds
                est = f"~{format_duration(seconds)}"
            except CannotEstimate as err:
                refusal, total = str(err), None
        overridden = f"  [--set {', '.join(run.overrides)}]" if run.overrides else ""
        print(f"  {run.run_id}  {status:8s} {est:>10s}  {run.label}{_schedule_summary(run.config)}{overridden}")
    if refusal is not None:
        print(f"no time estimate: {refusal}")
    elif cost is not None:
        print(f"estimated time for pending runs on {cost.device_key}: {format_duration(total)}")
    return total


def _inert_hint(plan, text: str) -> str:
    key = text.split("=", 1)[0]
    if not key.startswith("recipe."):
        return ""
    node = plan.spec.tiers.get(plan.tier, {})
    for part in key.split(".")[1:]:
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    return f" (the tier sets it: use --set tiers.{plan.tier}.{key.removeprefix('recipe.')}=...)"


def _remote_cost(store, args: argparse.Namespace):
    """The cost model of runs on other machines (Slurm): the cached measurements of ``--estimate-device``.
    Without it there is no estimate (and --budget-hours is refused): this machine's device is not theirs."""
    from repro.cost import CostModel, measured_devices

    if args.estimate_device:
        return CostModel.from_cache(store, args.estimate_device)
    known = measured_devices(store)
    why = ("the runs execute on the Slurm nodes' devices, which this machine cannot measure; pass "
           "--estimate-device NAME" + (f" (measured: {', '.join(repr(k) for k in known)})" if known else
                                       " after measuring one (`repro plan SPEC --device cuda` on such a node)"))
    if args.budget_hours is not None:
        raise ReproError(f"--budget-hours needs an estimate: {why}")
    print(f"no time estimate: {why}")
    return None


def _execute(plan, args: argparse.Namespace) -> int:
    from repro.distributed import is_main_process
    from repro.executors import execute_with_args, runs_elsewhere

    store = _store(args)
    # Slurm jobs resolve --device on their own nodes; this machine (a login node, maybe without a GPU) does not.
    device = None if runs_elsewhere(args) else _device(args)
    if is_main_process():  # under --nproc every rank runs this: one prints, estimates and checks the budget
        cost = _remote_cost(store, args) if device is None and not args.no_estimate else None
        estimate = not args.no_estimate and (device is not None or cost is not None)
        seconds = _print_plan(plan, store, device, estimate=estimate, cost=cost)
        if args.budget_hours is not None:
            where = cost.device_key if cost is not None else "this device"
            if seconds is None:
                reason = "--no-estimate was given" if args.no_estimate else "see above"
                raise ReproError(f"--budget-hours needs an estimate of the plan on {where} ({reason})")
            if seconds / 3600 > args.budget_hours:
                raise ReproError(f"the plan needs about {seconds / 3600:.2f} h on {where}, over --budget-hours "
                                 f"{args.budget_hours}")
    with _selected_loggers(args):
        summary = execute_with_args(plan, store, device, args)
    print(f"{plan.spec.id} [{plan.tier}]: {len(summary.done)} trained, {len(summary.cached)} cached, "
          f"{len(summary.failed)} failed, {len(summary.blocked)} blocked; {summary.workers} at once")
    return 0


@contextlib.contextmanager
def _selected_loggers(args: argparse.Namespace) -> Iterator[None]:
    """--log NAMES: checked here (an unknown or uninstalled logger is refused before anything runs), then handed
    to the trainers (and to the jobs submitted meanwhile) through the environment, never through the run config;
    the environment is restored afterwards."""
    import os

    from repro.loggers import ENV, selected_loggers

    value = getattr(args, "log", None)
    selected_loggers(value)
    previous = os.environ.get(ENV)
    if value is not None:
        os.environ[ENV] = value
    try:
        yield
    finally:
        if value is not None:
            if previous is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = previous


def _report(output: str, args: argparse.Namespace, command_line: str) -> None:
    from repro import api

    md, csv = api.report(output, args.tier, args.runs, args.tables, command=command_line,
                         plans=_output_plans(output, args))
    print(f"wrote {md} and {csv}")


def _set_flags(args: argparse.Namespace) -> str:
    """The --set part of a command line, as stamped on a table."""
    import shlex

    return "".join(f" --set {shlex.quote(text)}" for text in getattr(args, "overrides", None) or [])


# -- commands ----------------------------------------------------------------------------------------------------
@command("specs")
def cmd_specs(args: argparse.Namespace) -> int:
    from repro.spec import all_spec_ids, load_spec

    for spec_id in all_spec_ids():
        spec = load_spec(spec_id, check_models=False)
        print(f"{spec_id:40s} -> tables/{spec.output}.md  {spec.table}: {spec.title}")
    return 0


@command("schema")
def cmd_schema(args: argparse.Namespace) -> int:
    from repro.spec import json_schema

    text = json.dumps(json_schema(), indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


@command("plan")
def cmd_plan(args: argparse.Namespace) -> int:
    _print_plan(_plan(args.spec, args), _store(args), _device(args), estimate=not args.no_estimate)
    return 0


@command("run")
def cmd_run(args: argparse.Namespace) -> int:
    return _execute(_plan(args.spec, args), args)


@command("report")
def cmd_report(args: argparse.Namespace) -> int:
    _report(args.output, args, f"repro report {args.output} --tier {args.tier}{_set_flags(args)}")
    return 0


@command("table")
def cmd_table(args: argparse.Namespace) -> int:
    """Run every spec that renders into ``tables/<output>.md``, then render it."""
    from repro.distributed import is_main_process

    for plan in _output_plans(args.output, args):
        _execute(plan, args)
    if is_main_process():  # one writer for the table files
        _report(args.output, args, f"repro table {args.output} --tier {args.tier}{_set_flags(args)}")
    return 0


@command("smoke")
def cmd_smoke(args: argparse.Namespace) -> int:
    """Every spec at the smoke tier (the CI smoke reproduction), then every output rendered.

    Specs are spread over ``--parallel`` worker processes (one torch thread each), balanced by run count; runs
    shared between specs are trained once thanks to the per-run locks.
    """
    import os
    import subprocess

    from repro.plan import make_plan
    from repro.spec import all_outputs, all_spec_ids, load_spec

    sizes = sorted(((len(make_plan(load_spec(s), "smoke").runs), s) for s in all_spec_ids()), reverse=True)
    groups: list[list[str]] = [[] for _ in range(max(1, args.parallel))]
    loads = [0] * len(groups)
    for size, spec_id in sizes:  # greedy: the biggest spec to the least loaded worker
        i = loads.index(min(loads))
        groups[i].append(spec_id)
        loads[i] += size
    # Each worker runs its specs one run at a time (--jobs 1): the workers are the parallelism.
    base = [sys.executable, "-m", "repro", "run", "--tier", "smoke", "--no-estimate", "--no-progress", "--jobs", "1"]
    if args.runs:
        base += ["--runs", args.runs]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    workers = [subprocess.Popen(["bash", "-c", " && ".join(" ".join(base[:4] + [spec] + base[4:]) for spec in g)],
                                env=env) for g in groups if g]
    codes = [w.wait() for w in workers]
    if any(codes):
        raise ReproError(f"smoke reproduction failed (worker exit codes {codes}); see the output above")
    args.tier = "smoke"
    for output in all_outputs():
        args.output = output
        _report(output, args, f"repro smoke (output {output})")
    return 0


@command("status")
def cmd_status(args: argparse.Namespace) -> int:
    """Pending, submitted, running, interrupted, done and failed runs, whichever executor runs them."""
    from repro.executors import print_status

    plan = _plan(args.spec, args) if args.spec else None
    print_status(_store(args), plan, verbose=args.verbose)
    return 0


@command("runs")
def cmd_runs(args: argparse.Namespace) -> int:
    """The runs of the store, or of a spec's plans (every tier unless --tier), as a table."""
    from repro.inventory import runs_rows, runs_table
    from repro.spec import TIERS

    plans = []
    if args.spec:
        for tier in [args.tier] if args.tier else TIERS:
            args_tier = argparse.Namespace(**{**vars(args), "tier": tier})
            plans.append(_plan(args.spec, args_tier))
    rows = runs_rows(_store(args), plans, args.tier, args.status)
    if rows:
        print(runs_table(rows))
    print(f"{len(rows)} runs" + (f" with status {args.status}" if args.status else ""))
    return 0


@command("export")
def cmd_export(args: argparse.Namespace) -> int:
    from repro.bundles import export_bundle

    summary = export_bundle([_plan(args.spec, args)], _store(args), Path(args.output), args.with_weights)
    print(f"wrote {summary.path}: {len(summary.runs)} runs" +
          (f" ({len(summary.skipped)} planned runs without a result left out)" if summary.skipped else ""))
    return 0


@command("import")
def cmd_import(args: argparse.Namespace) -> int:
    from repro.bundles import import_bundle

    summary = import_bundle(Path(args.bundle), _store(args))
    print(f"{args.bundle}: {len(summary.imported)} runs imported, {len(summary.present)} already present with the "
          f"same numbers, {len(summary.conflicts)} conflicts")
    for line in summary.conflicts:
        print(f"conflict: {line}")
    return 0


@command("teachers")
def cmd_teachers(args: argparse.Namespace) -> int:
    from repro import teachers

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
        from repro.teacher_outputs import cache_teachers

        for run_id, computed in cache_teachers(_plan(args.spec, args), _store(args), _device(args)):
            print(f"teacher {run_id}: {computed} views computed")
        return 0
    raise ReproError(f"unknown teachers action {args.action!r}")


def _teachers_root(args: argparse.Namespace) -> Path:
    """The teacher root the planner uses for ``--spec`` at ``--tier``: one root for fetching and planning."""
    from repro.plan import teachers_root
    from repro.spec import load_spec

    return teachers_root(load_spec(args.spec).recipe_for(args.tier))


@command("eval")
def cmd_eval(args: argparse.Namespace) -> int:
    from repro.evaluate.command import run_eval

    return run_eval(args)


@command("figures")
def cmd_figures(args: argparse.Namespace) -> int:
    from repro.evaluate.command import run_figures

    return run_figures(args)


@command("bench")
def cmd_bench(args: argparse.Namespace) -> int:
    from repro.bench import run_bench

    return run_bench(args)


# -- parser --------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from repro.executors import add_scaleout_arguments

    parser = argparse.ArgumentParser(prog="repro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, tier: bool = True) -> None:
        if tier:
            p.add_argument("--tier", choices=["smoke", "proxy", "full"], default="full")
            p.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the paper's run count)")
            p.add_argument("--no-teacher-gate", action="store_true",
                           help="use checkpoint teachers even when their accuracy is off the reported value")
            p.add_argument("--teachers", choices=["train", "checkpoint", "pretrained"], default=None,
                           help="where teachers come from (default: the spec's tier setting)")
        p.add_argument("--runs", default=None, help="run store folder (default: $REPRO_RUNS or ./runs)")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
        p.add_argument("--tables", default="tables", help="where markdown/CSV tables are written")

    def running(p: argparse.ArgumentParser) -> None:
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

    def overridable(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec value (repeatable): recipe.epochs=60, "
                            "methods.KD.losses.kd.temperature=2, cells[3].params.wttm.gamma=0.2, "
                            "cells[wrn_40_2->wrn_16_2/WTTM].params.wttm.gamma=0.2; the spec file is not written")

    sub.add_parser("specs", help="list the specs")
    p = sub.add_parser("schema", help="write the JSON Schema of a spec (for editor completion)")
    p.add_argument("-o", "--output", default=None)
    for name, help_text in (("plan", "print the runs of a spec, which are cached, and their estimated cost"),
                            ("run", "run what is pending in a spec")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("spec", help="spec id (e.g. wttm/cifar100-table1) or a YAML path")
        common(p)
        overridable(p)
        if name == "run":
            running(p)
        else:
            p.add_argument("--no-estimate", action="store_true", help="skip the throughput micro-benchmark")
    p = sub.add_parser("report", help="render tables/<output>.md and .csv from the run store")
    p.add_argument("output", help="e.g. wttm-cifar100")
    common(p)
    overridable(p)
    p = sub.add_parser("table", help="run every spec of an output, then render it")
    p.add_argument("output")
    common(p)
    overridable(p)
    running(p)
    p = sub.add_parser("smoke", help="every spec at the smoke tier (the CI smoke reproduction)")
    common(p)
    p.add_argument("--parallel", type=int, default=2, help="worker processes (default 2)")
    p = sub.add_parser("status", help="pending / running / done / failed runs, across executors")
    p.add_argument("spec", nargs="?", default=None, help="a spec id or YAML path: its runs, started or not")
    p.add_argument("-v", "--verbose", action="store_true")
    common(p)
    p = sub.add_parser("runs", help="list runs (id, label, tier, status, top-1, epochs, wall time, origin)")
    p.add_argument("spec", nargs="?", default=None, help="a spec id or YAML path: its planned runs, started or not")
    p.add_argument("--tier", choices=["smoke", "proxy", "full"], default=None)
    p.add_argument("--status", default=None,
                   choices=["pending", "submitted", "running", "interrupted", "done", "failed"])
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--no-teacher-gate", action="store_true")
    p.add_argument("--teachers", choices=["train", "checkpoint", "pretrained"], default=None)
    p.add_argument("--runs", default=None, help="run store folder (default: $REPRO_RUNS or ./runs)")
    overridable(p)
    p = sub.add_parser("export", help="write a spec's finished runs into one bundle (tar.gz with sha256 manifest)")
    p.add_argument("spec")
    p.add_argument("-o", "--output", required=True, help="the bundle file to write, e.g. wttm-smoke.tar.gz")
    p.add_argument("--with-weights", action="store_true", help="include model.pt (needed to train on top of them)")
    common(p)
    overridable(p)
    p = sub.add_parser("import", help="verify a bundle and add its runs to the store (never replaces a result)")
    p.add_argument("bundle")
    p.add_argument("--runs", default=None, help="run store folder (default: $REPRO_RUNS or ./runs)")
    p = sub.add_parser("teachers", help="fetch the public CIFAR teachers, train them, or precompute their outputs")
    p.add_argument("action", choices=["fetch", "train", "cache"])
    p.add_argument("--dest", default=None,
                   help="fetch: where the checkpoints go (default: the teacher root the planner uses for --spec: "
                        "its teachers.root, else $REPRO_TEACHERS, else teachers/cifar100)")
    p.add_argument("--spec", default="wttm/cifar100-table1",
                   help="fetch: the spec whose teacher root to fill; cache: the spec whose teachers to cache")
    common(p)
    running(p)
    from repro.bench import add_bench_parser
    from repro.evaluate.command import add_eval_parser, add_figures_parser

    add_bench_parser(sub)
    add_eval_parser(sub)
    add_figures_parser(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    from repro.numerics import set_cublas_workspace

    set_cublas_workspace()  # before any CUDA work of this process (cost model, teacher gate, every run)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        from repro.executors import prepare

        launched = prepare(args, argv)  # --nproc N: this process launches N workers and waits for them
        if launched is not None:
            return launched
        return COMMANDS[args.command](args)
    except ReproError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished runs are kept and the interrupted run resumes from its last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
