"""Execute a plan: every pending run in dependency order, each written to the run store.

A finished run (done or failed) is never run again; a run killed half-way resumes from its last checkpoint.
Bad input (missing data, missing checkpoint) stops the whole plan with one message and writes no result, so it
runs once the input is fixed. A failed run (non-finite loss, failed teacher gate) is recorded as failed and its
dependants are skipped.

Any number of processes (on one machine or sharing the store over a network filesystem) may execute the same plan
at once: a run is trained only under its lock (``repro.harness.locks``), so each run is trained exactly once and the
others wait for it. ``RunStates`` is that bookkeeping, the one copy: this module's in-process loop (``execute``)
and the executors that spread runs over worker processes or jobs (``repro.harness.executors``, whose jobs call
``run_claimed``) all drive it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from repro.train import distributed
from repro.train.distributed import ScaleOptions
from repro.core.errors import ReproError
from repro.harness.locks import RunLock
from repro.models import create_model
from repro.models.weights import load_repdistiller, load_run_weights
from repro.harness.plan import Plan, PlannedRun
from repro.harness.store import RunStore
from repro.train.loop import Resolved, RunFailed, evaluate_model, stamp, train_run
from repro.train.config import TrainRecipe


@dataclass
class ExecutionSummary:
    done: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    workers: int = 1  # the most runs that executed at once (1: one after another in this process)


def load_run_model(store: RunStore, run_id: str, device: torch.device) -> tuple[nn.Module, str]:
    """The frozen model a finished run produced, and a hash of its weights."""
    config = store.config(run_id)
    if config is None or not store.is_done(run_id):
        raise ReproError(f"run {run_id} has not finished; it cannot be used as a teacher yet")
    model_cfg = config["model"]
    if config["kind"] == "eval":
        model, key = load_eval_model(config)
    else:
        path = store.model_path(run_id)
        if not path.is_file():
            raise ReproError(f"run {run_id} has a result but no weights ({path}); if it was imported, import a "
                             f"bundle exported with --with-weights to train on top of it")
        model = create_model(model_cfg["arch"], num_classes=model_cfg["num_classes"], **model_cfg.get("args", {}))
        key = load_run_weights(model, path)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, key


def resolve_dependencies(config: dict[str, Any], store: RunStore, device: torch.device) -> Resolved:
    resolved = Resolved(assistants={})
    if config.get("init"):
        model, _ = load_run_model(store, config["init"]["run"], torch.device("cpu"))
        resolved.init_state = model.state_dict()
    if config.get("teacher"):
        resolved.teacher, resolved.teacher_key = load_run_model(store, config["teacher"]["run"], device)
    for name, ref in (config.get("assistants") or {}).items():
        resolved.assistants[name], _ = load_run_model(store, ref["run"], device)
    return resolved


def load_eval_model(config: dict[str, Any]) -> tuple[nn.Module, str]:
    """The model of an evaluation run: a RepDistiller-format checkpoint (sha256-locked), or whatever the model
    family loads from its arguments (pretrained weights, a local checkpoint); plus a key naming its weights."""
    from repro.core.env import canonical_model_key
    from repro.models.teachers import verify_teacher

    model_cfg = config["model"]
    if not config.get("checkpoint"):
        model = create_model(model_cfg["arch"], num_classes=model_cfg["num_classes"], **model_cfg.get("args", {}))
        return model, canonical_model_key(model_cfg)
    checkpoint = config["checkpoint"]
    path = Path(checkpoint["path"])
    if not path.is_file():
        raise ReproError(f"teacher checkpoint {path} is missing: run `repro teachers fetch` (or put the file there), "
                         f"or use TIER=smoke, whose teachers are trained")
    sha256 = verify_teacher(model_cfg["arch"], path, checkpoint.get("lock"))
    if checkpoint.get("sha256") and sha256 != checkpoint["sha256"]:
        raise ReproError(f"teacher checkpoint {path} has sha256 {sha256}, but this run was planned for "
                         f"{checkpoint['sha256']}: the file changed after planning; plan again")
    return load_repdistiller(model_cfg["arch"], path, num_classes=model_cfg["num_classes"]), sha256


def evaluate_checkpoint(config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A checkpoint teacher's run: verify its weights, measure its accuracy, apply the accuracy gate."""
    from repro.models.teachers import lock_origin

    arch = config["model"]["arch"]
    model, weights_key = load_eval_model(config)
    scores = evaluate_model(model, config["recipe"], device)
    pinned = {"checkpoint_sha256": weights_key, "checkpoint_lock": lock_origin(arch)} if config.get("checkpoint") \
        else {}
    result = {"best_top1": scores["top1"], "last_top1": scores["top1"], "best_top5": scores["top5"],
              "last_top5": scores["top5"], "best_epoch": None, **pinned,
              "world_size": distributed.current().world_size,
              "expected_top1": config.get("expected_top1"), "gate_tolerance": config.get("gate_tolerance")}
    expected, tolerance = config.get("expected_top1"), config.get("gate_tolerance")
    if expected is not None and tolerance is not None and abs(scores["top1"] - expected) > tolerance:
        raise RunFailed(f"teacher-accuracy gate: {arch} measured {scores['top1']:.2f} vs expected {expected:.2f} "
                        f"(tolerance {tolerance}); pass --no-teacher-gate to use it anyway", **result)
    return result


def execute_run(run: PlannedRun, store: RunStore, device: torch.device, progress: bool,
                options: Optional[ScaleOptions] = None, workers: Optional[int] = 1) -> dict[str, Any]:
    """Train or evaluate one run and record its result. Every rank of a process group calls it; rank 0 writes.

    ``workers``: how many runs this machine ran side by side (1: one at a time; None: not this machine's to say,
    a Slurm job), stamped with the torch threads of this run: its speed depends on both."""
    writer = distributed.is_main_process()
    if writer:
        store.write_config(run.run_id, run.config)
    started = time.time()
    try:
        if run.config["kind"] == "eval":
            fields = evaluate_checkpoint(run.config, device)
        else:
            resolved = resolve_dependencies(run.config, store, device)
            fields = train_run(run.config, store, run.run_id, device, resolved, progress, options)
        status, extra = "done", {}
    except RunFailed as failure:
        fields, status, extra = failure.details, "failed", {"reason": failure.reason}
    if run.overrides:  # what the config was made with, beyond the spec file (stamped on every table showing it)
        extra = {**extra, "overrides": run.overrides}
    result = stamp({"run_id": run.run_id, "label": run.label, "status": status, "kind": run.config["kind"],
                    "tier": run.config["tier"], "seed": run.config.get("seed"), **fields, **extra,
                    "workers": workers, "torch_threads": torch.get_num_threads(),
                    "wall_time_s": time.time() - started}, device)
    if writer:
        store.write_result(run.run_id, result)
    return result


class PlanProgress:
    """What a person watching a plan sees: one line per run that ends here (label, top-1, seconds; the reason when
    it failed) and, only when the output is a terminal, one live bar for the whole plan. There is never a bar per
    training step next to it: with several runs at once those redraw into hundreds of lines of a log."""

    def __init__(self, desc: str, total: int, bar: bool = True) -> None:
        self.total = total
        # disable=None: tqdm draws only on a terminal; a CI log gets the plain lines alone.
        self.bar = tqdm(total=total, desc=desc, unit="run", mininterval=1.0, disable=None if bar else True)

    def say(self, line: str) -> None:
        tqdm.write(line)  # above the bar, which is redrawn under it

    def ended(self, settled: int, run: PlannedRun, status: str, result: Optional[dict[str, Any]]) -> None:
        """A run settled; ``result`` is given for those that ran now (and blocked ones), which get their line."""
        self.bar.n = settled
        self.bar.refresh()
        if result is not None:
            self.say(f"[{settled}/{self.total}] {run_line(run, status, result)}")

    def close(self) -> None:
        self.bar.close()


def run_line(run: PlannedRun, status: str, result: dict[str, Any]) -> str:
    """``done    3f2a...  wrn_40_2->wrn_16_2 KD seed 0  top-1 71.20 (best 71.50)  42 s``."""
    head = f"{status:7s} {run.run_id}  {run.label}"
    if status == "blocked":
        return f"{head}: a run it needs failed"
    seconds = f"  {result['wall_time_s']:.0f} s" if result.get("wall_time_s") is not None else ""
    if status == "failed":
        return f"{head}{seconds}: {result.get('reason')}"
    top1 = "" if result.get("last_top1") is None else f"  top-1 {result['last_top1']:.2f}"
    best = "" if result.get("best_top1") is None or not top1 else f" (best {result['best_top1']:.2f})"
    return f"{head}{top1}{best}{seconds}"


SETTLED = ("done", "cached", "failed", "blocked")  # the ExecutionSummary buckets


class RunStates:
    """Which runs of a plan are pending, started, done or bad: the one claim/settle state machine that every engine
    drives, for one process among any number on the same store (rank 0 of a group decides).

    - ``execute`` (in this process) takes ``claim_next()`` and ``record``s what it trained;
    - the job scheduler (``repro.harness.executors``) submits ``ready()`` runs, marks them ``start``ed and ``record``s what
      each job reports;
    - each job (``run_claimed``) ``claim``s its one run.

    A run is trained only by the process holding its lock, and only if it has no result once the lock is held, so
    two drivers on one plan never train a run twice: each takes the next free run whose dependencies are done and
    waits for runs another process is training. Failed results present at the start are retried with
    ``retry_failed``; results that appear later (another process's) are taken as they are.
    """

    def __init__(self, runs: Sequence[PlannedRun], store: RunStore, retry_failed: bool = False,
                 progress: Optional[PlanProgress] = None) -> None:
        self.store = store
        self.pending = list(runs)  # not settled yet (started ones included), in dependency order
        self.started: set[str] = set()  # handed to a trainer or a job
        self.settled: dict[str, str] = {}  # run id -> done | cached | failed | blocked, in the order they ended
        # Failed results to retry, as they were at the start: one that changes was re-run by another process.
        self.retry = {r.run_id: result for r in self.pending if retry_failed
                      and (result := store.result(r.run_id)) is not None and result.get("status") == "failed"}
        self.announced: set[str] = set()
        self.progress = progress

    @property
    def summary(self) -> ExecutionSummary:
        return ExecutionSummary(**{bucket: [run_id for run_id, status in self.settled.items() if status == bucket]
                                   for bucket in SETTLED})

    def finished(self, run: PlannedRun) -> Optional[str]:
        """``"cached"`` or ``"failed"`` when the run has a result to keep; None when it is to be trained."""
        previous = self.store.result(run.run_id)
        if previous is None or self.retry.get(run.run_id) == previous:
            return None
        return "cached" if previous.get("status") == "done" else "failed"

    def unfinished(self) -> int:
        """Runs still to train (what can usefully run side by side)."""
        return sum(self.finished(run) is None for run in self.pending)

    def ready(self) -> Iterator[PlannedRun]:
        """Runs to start now: not started, unfinished, every dependency done. Runs found finished, and runs whose
        dependency failed, are settled on the way."""
        for run in list(self.pending):
            if run.run_id in self.started:
                continue
            if (status := self.finished(run)) is not None:
                self._settle(run, status)
            elif any(self.settled.get(dep) in ("failed", "blocked") for dep in run.deps):
                self._settle(run, "blocked")
            elif all(self.settled.get(dep) in ("done", "cached") for dep in run.deps):
                yield run
            # else: a dependency is still being trained (here or elsewhere)

    def claim(self, run: PlannedRun) -> Optional[RunLock]:
        """Take ``run``'s lock to train it here. None when it turned out finished (it is settled) or another process
        holds it (waited for)."""
        if (status := self.finished(run)) is not None:
            self._settle(run, status)
            return None
        lock = self.store.lock(run.run_id)
        if not lock.try_acquire(note=run.label):
            self.wait_for(run, lock.describe())
            return None
        if (status := self.finished(run)) is not None:  # finished by another process between our look and our lock
            lock.release()
            self._settle(run, status)
            return None
        self.store.clear_result(run.run_id)  # the failed result being retried, if any
        self.started.add(run.run_id)
        return lock

    def claim_next(self) -> tuple[Optional[PlannedRun], Optional[RunLock]]:
        """The next run to train here with its held lock, or ``(None, None)``: wait while ``pending``, else done."""
        for run in self.ready():
            if (lock := self.claim(run)) is not None:
                return run, lock
        return None, None

    def start(self, run: PlannedRun) -> None:
        """``run`` went to a job, which claims it itself."""
        self.started.add(run.run_id)

    def record(self, run: PlannedRun, status: str) -> None:
        """What became of a started run: ``done``/``failed`` (trained), ``cached``/``failed`` (its job found it
        finished) or ``busy`` (another process trains it: waited for again, in plan order)."""
        self.started.discard(run.run_id)
        if status != "busy":
            self._settle(run, status, ran=True)

    def wait_for(self, run: PlannedRun, holder: str) -> None:
        if run.run_id not in self.announced:
            self.announced.add(run.run_id)
            self.say(f"run {run.run_id} ({run.label}) is being trained by {holder}; waiting for it")

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress.say(line)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def _settle(self, run: PlannedRun, status: str, ran: bool = False) -> None:
        """``ran``: it ended here and now (a line for it); runs found finished are only counted."""
        self.settled[run.run_id] = status
        self.pending.remove(run)
        self.started.discard(run.run_id)
        self.retry.pop(run.run_id, None)
        if self.progress is not None:
            told = ran and status != "cached" or status == "blocked"
            result = (self.store.result(run.run_id) or {}) if told else None
            self.progress.ended(len(self.settled), run, status, result)


def execute(plan: Plan, store: RunStore, device: torch.device, progress: bool = True,
            retry_failed: bool = False, options: Optional[ScaleOptions] = None,
            poll_s: float = 2.0) -> ExecutionSummary:
    """Run what is pending in ``plan`` in this process, one run at a time, in dependency order, safely alongside
    other processes on the same store.

    Inside a process group (``--nproc``) every rank calls this: rank 0 claims the next run and broadcasts it, all
    ranks train it together, rank 0 writes. The summary is rank 0's, broadcast to all.
    """
    par = distributed.current()
    device = distributed.device_for_rank(device, par)
    states = RunStates(plan.ordered(), store, retry_failed,
                       PlanProgress(f"{plan.spec.id} [{plan.tier}]", len(plan.runs), progress)) if par.is_main else None
    # A lone run may draw its own per-step bar (in a terminal); beside a plan's bar and lines it would be noise.
    step_bar = progress and len(plan.runs) == 1
    while True:
        lock, decision = None, None
        if states is not None:
            run, lock = states.claim_next()
            decision = ("train", run.run_id) if run else ("wait" if states.pending else "finished", None)
        kind, run_id = distributed.broadcast_object(decision, par)
        if kind == "finished":
            break
        if kind == "wait":
            time.sleep(poll_s)
            continue
        run = plan.runs[run_id]
        try:
            result = execute_run(run, store, device, step_bar, options)
        finally:
            if lock is not None:
                lock.release()
        if states is not None:
            states.record(run, result["status"])
    if states is not None:
        states.close()
    return distributed.broadcast_object(states.summary if states is not None else None, par)


def run_claimed(run: PlannedRun, store: RunStore, device: torch.device, progress: bool = False,
                options: Optional[ScaleOptions] = None, retry_failed: bool = False,
                workers: Optional[int] = 1) -> str:
    """Claim one run and train it (what an executor job does): ``"done"`` or ``"failed"`` when trained here,
    ``"cached"`` or ``"failed"`` when a result is already there, ``"busy"`` when another process holds it.
    ``workers``: runs the driver runs side by side (stamped on the result)."""
    par = distributed.current()
    device = distributed.device_for_rank(device, par)
    lock, decision = None, None
    if par.is_main:
        states = RunStates([run], store, retry_failed)
        lock = states.claim(run)
        decision = "train" if lock is not None else states.settled.get(run.run_id, "busy")
    decision = distributed.broadcast_object(decision, par)
    if decision != "train":
        return decision
    try:
        return execute_run(run, store, device, progress, options, workers)["status"]
    finally:
        if lock is not None:
            lock.release()


# -- `repro teachers cache`: the teacher-output cache of every finished teacher of a plan -------------------
def teacher_runs(plan: Plan) -> list[str]:
    """Runs that some student of the plan uses as its teacher, in plan order."""
    wanted = {r.config["teacher"]["run"] for r in plan.ordered() if r.config.get("teacher")}
    return [rid for rid in plan.runs if rid in wanted]


def cache_teachers(plan: Plan, store: RunStore, device: torch.device) -> list[tuple[str, int]]:
    """Fill the cache of every finished teacher of the plan; returns (run id, entries computed)."""
    from repro.data.teacher_cache import fill_cache
    from repro.data.pipelines import build_pipeline
    from repro.train.teacher_cache_open import cache_last_feature, open_teacher_cache

    done = []
    for run_id in teacher_runs(plan):
        if not store.is_done(run_id):
            raise ReproError(f"teacher run {run_id} ({plan.runs[run_id].label}) has not finished: "
                             f"run `repro run {plan.spec.id} --tier {plan.tier}` first")
        model, weights_key = load_run_model(store, run_id, device)
        students = [r for r in plan.ordered() if (r.config.get("teacher") or {}).get("run") == run_id]
        recipe = TrainRecipe.model_validate(students[0].config["recipe"])
        data = build_pipeline(recipe, 0, device)
        if data.dataset is None:
            raise ReproError(f"pipeline {recipe.pipeline!r} has no discrete views: its teacher outputs cannot be cached")
        last = cache_last_feature(recipe, model, data.image_size, device)
        cache = open_teacher_cache(store.root, weights_key, recipe, data.dataset,
                                   students[0].config["model"]["num_classes"], feature_width=last.width)
        bar = tqdm(total=len(data.dataset) * 162, desc=f"cache {run_id[:8]}", unit="view", mininterval=1.0)
        computed = fill_cache(cache, model, data.dataset, recipe.normalization.mean, recipe.normalization.std, device,
                              progress=lambda n, total: bar.update(n - bar.n))
        bar.close()
        cache.close()
        done.append((run_id, computed))
    return done
