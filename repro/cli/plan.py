"""``repro plan / run / report / table / smoke / status``: a spec's runs, executing them, rendering its tables."""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Iterator, Optional

from repro.cli import command
from repro.cli.options import (device_of, output_plans_of, override_options, plan_of, running_options, set_flags,
                               store_of, tier_options)
from repro.core.errors import ReproError


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
    from repro.harness.cost import CannotEstimate, CostModel, format_duration

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
    from repro.harness.cost import CostModel, measured_devices

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
    from repro.train.distributed import is_main_process
    from repro.harness.executors import execute_with_args, runs_elsewhere

    store = store_of(args)
    # Slurm jobs resolve --device on their own nodes; this machine (a login node, maybe without a GPU) does not.
    device = None if runs_elsewhere(args) else device_of(args)
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

    from repro.train.loggers import ENV, selected_loggers

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


def _report(output: str, args: argparse.Namespace, command_line: str) -> list[str]:
    """Render the output's tables; return its cells below their tier's learning floor (printed too)."""
    from repro import api

    sections = api.compare_sections(output_plans_of(output, args), args.runs)
    md, csv = api.report(output, args.tier, args.runs, args.tables, command=command_line, sections=sections)
    print(f"wrote {md} and {csv}")
    problems = api.check_floors(sections)
    for line in problems:
        print(f"below the floor: {line}")
    return problems


def _fail_on_floors(problems: list[str], tier: str) -> None:
    if problems:
        raise ReproError(f"{len(problems)} cell(s) below the {tier} tier's learning floor (a loss that does not "
                         f"train, a detached gradient or a wrong teacher looks like this):\n  " + "\n  ".join(problems))


@command("plan")
def cmd_plan(args: argparse.Namespace) -> int:
    _print_plan(plan_of(args.spec, args), store_of(args), device_of(args), estimate=not args.no_estimate)
    return 0


@command("run")
def cmd_run(args: argparse.Namespace) -> int:
    return _execute(plan_of(args.spec, args), args)


@command("report")
def cmd_report(args: argparse.Namespace) -> int:
    _report(args.output, args, f"repro report {args.output} --tier {args.tier}{set_flags(args)}")
    return 0


@command("table")
def cmd_table(args: argparse.Namespace) -> int:
    """Run every spec that renders into ``tables/<output>.md``, then render it."""
    from repro.train.distributed import is_main_process

    from repro.harness.plan import merged_plan

    plans = output_plans_of(args.output, args)
    _execute(merged_plan(f"{args.output} ({len(plans)} specs)", plans), args)
    if is_main_process():  # one writer for the table files
        problems = _report(args.output, args, f"repro table {args.output} --tier {args.tier}{set_flags(args)}")
        _fail_on_floors(problems, args.tier)
    return 0


@command("smoke")
def cmd_smoke(args: argparse.Namespace) -> int:
    """Every spec at the smoke tier (the CI smoke reproduction), then every output rendered.

    Specs are spread over ``--parallel`` worker processes (one torch thread each), balanced by run count; runs
    shared between specs are trained once thanks to the per-run locks.
    """
    import os
    import subprocess

    from repro.harness.plan import make_plan
    from repro.harness.spec import all_outputs, all_spec_ids, load_spec

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
    problems = []
    for output in all_outputs():
        args.output = output
        problems += _report(output, args, f"repro smoke (output {output})")
    _fail_on_floors(problems, "smoke")
    return 0


@command("status")
def cmd_status(args: argparse.Namespace) -> int:
    """Pending, submitted, running, interrupted, done and failed runs, whichever executor runs them."""
    from repro.harness.executors import print_status

    plan = plan_of(args.spec, args) if args.spec else None
    print_status(store_of(args), plan, verbose=args.verbose)
    return 0


def add_parsers(sub: Any) -> None:
    for name, help_text in (("plan", "print the runs of a spec, which are cached, and their estimated cost"),
                            ("run", "run what is pending in a spec")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("spec", help="spec id (e.g. wttm/cifar100-table1) or a YAML path")
        tier_options(p)
        override_options(p)
        if name == "run":
            running_options(p)
        else:
            p.add_argument("--no-estimate", action="store_true", help="skip the throughput micro-benchmark")
    p = sub.add_parser("report", help="render tables/<output>.md and .csv from the run store")
    p.add_argument("output", help="e.g. wttm-cifar100")
    tier_options(p)
    override_options(p)
    p = sub.add_parser("table", help="run every spec of an output, then render it")
    p.add_argument("output")
    tier_options(p)
    override_options(p)
    running_options(p)
    p = sub.add_parser("smoke", help="every spec at the smoke tier (the CI smoke reproduction)")
    tier_options(p)
    p.add_argument("--parallel", type=int, default=2, help="worker processes (default 2)")
    p = sub.add_parser("status", help="pending / running / done / failed runs, across executors")
    p.add_argument("spec", nargs="?", default=None, help="a spec id or YAML path: its runs, started or not")
    p.add_argument("-v", "--verbose", action="store_true")
    tier_options(p)
