"""Execute a plan: every pending run in dependency order, each written to the run store.

A finished run (done or failed) is never run again; a run killed half-way resumes from its last checkpoint.
Bad input (missing data, missing checkpoint) stops the whole plan with one message and writes no result, so it
runs once the input is fixed. A failed run (non-finite loss, failed teacher gate) is recorded as failed and its
dependants are skipped.

Any number of processes (on one machine or sharing the store over a network filesystem) may execute the same plan
at once: a run is trained only under its lock (``repro.locks``), so each run is trained exactly once and the
others wait for it. Executors that spread runs over jobs (``repro.executors``) call ``run_claimed`` per run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from repro import distributed
from repro.distributed import ScaleOptions
from repro.errors import ReproError
from repro.locks import RunLock
from repro.models import create_model
from repro.models.weights import load_repdistiller, load_run_weights
from repro.plan import Plan, PlannedRun
from repro.store import RunStore
from repro.train import Resolved, RunFailed, evaluate_model, stamp, train_run
from repro.train_config import TrainRecipe


@dataclass
class ExecutionSummary:
    done: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)


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
    from repro.provenance import canonical_model_key
    from repro.teachers import verify_teacher

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
    from repro.teachers import lock_origin

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
                options: Optional[ScaleOptions] = None) -> dict[str, Any]:
    """Train or evaluate one run and record its result. Every rank of a process group calls it; rank 0 writes."""
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
                    "wall_time_s": time.time() - started}, device)
    if writer:
        store.write_result(run.run_id, result)
    return result


class Claims:
    """Which run to train next, for one process among any number on the same store (rank 0 of a group decides).

    A run is trained only by the process holding its lock, and only if it has no result once the lock is held,
    so two ``repro run`` invocations on one plan never train a run twice: each takes the next free run whose
    dependencies are done and waits for runs another process is training. Failed results present at the start
    are retried with ``retry_failed``; results that appear later (another process's) are taken as they are.
    """

    def __init__(self, plan: Plan, store: RunStore, retry_failed: bool = False) -> None:
        self.store = store
        self.pending = plan.ordered()
        self.summary = ExecutionSummary()
        self.done: set[str] = set()
        self.bad: set[str] = set()
        # Failed results to retry, as they were at the start: one that changes was re-run by another process.
        self.retry = {r.run_id: result for r in self.pending if retry_failed
                      and (result := store.result(r.run_id)) is not None and result.get("status") == "failed"}
        self.announced: set[str] = set()

    def next(self) -> tuple[str, Optional[PlannedRun], Optional[RunLock]]:
        """``("train", run, held lock)``, ``("wait", None, None)`` while others hold what is left, or
        ``("finished", None, None)``."""
        for run in list(self.pending):
            if self._settle_if_finished(run):
                continue
            if any(dep in self.bad for dep in run.deps):
                self._settle(run, self.summary.blocked, bad=True)
                continue
            if not all(dep in self.done for dep in run.deps):
                continue  # a dependency is being trained elsewhere
            lock = self.store.lock(run.run_id)
            if not lock.try_acquire(note=run.label):
                self._announce_wait(run, lock)
                continue
            if self._settle_if_finished(run):  # finished by another process between our look and our lock
                lock.release()
                continue
            if self.store.result(run.run_id) is not None:
                self.store.clear_result(run.run_id)
            return "train", run, lock
        return ("wait" if self.pending else "finished"), None, None

    def record(self, run: PlannedRun, result: dict[str, Any]) -> None:
        """A run this process trained."""
        if result["status"] == "done":
            self._settle(run, self.summary.done, done=True)
        else:
            self._settle(run, self.summary.failed, bad=True)
            tqdm.write(f"run {run.run_id} failed: {result.get('reason')}")

    def _settle_if_finished(self, run: PlannedRun) -> bool:
        previous = self.store.result(run.run_id)
        if previous is None or self.retry.get(run.run_id) == previous:
            return False
        if previous.get("status") == "done":
            self._settle(run, self.summary.cached, done=True)
        else:
            self._settle(run, self.summary.failed, bad=True)
        return True

    def _settle(self, run: PlannedRun, bucket: list[str], done: bool = False, bad: bool = False) -> None:
        bucket.append(run.run_id)
        self.pending.remove(run)
        self.retry.pop(run.run_id, None)
        if done:
            self.done.add(run.run_id)
        if bad:
            self.bad.add(run.run_id)

    def _announce_wait(self, run: PlannedRun, lock: RunLock) -> None:
        if run.run_id not in self.announced:
            self.announced.add(run.run_id)
            tqdm.write(f"run {run.run_id} ({run.label}) is being trained by {lock.describe()}; waiting for it")


def execute(plan: Plan, store: RunStore, device: torch.device, progress: bool = True,
            retry_failed: bool = False, options: Optional[ScaleOptions] = None,
            poll_s: float = 2.0) -> ExecutionSummary:
    """Run what is pending in ``plan``, in dependency order, safely alongside other processes on the same store.

    Inside a process group (``--nproc``) every rank calls this: rank 0 claims the next run and broadcasts it, all
    ranks train it together, rank 0 writes. The summary is rank 0's, broadcast to all.
    """
    par = distributed.current()
    device = distributed.device_for_rank(device, par)
    claims = Claims(plan, store, retry_failed) if par.is_main else None
    bar = tqdm(total=len(plan.runs), desc=f"{plan.spec.id} [{plan.tier}]", unit="run",
               disable=not (progress and par.is_main), mininterval=1.0)
    while True:
        lock, decision = None, None
        if claims is not None:
            kind, run, lock = claims.next()
            decision = (kind, run.run_id if run else None)
        kind, run_id = distributed.broadcast_object(decision, par)
        if kind == "finished":
            break
        if kind == "wait":
            time.sleep(poll_s)
            continue
        run = plan.runs[run_id]
        bar.set_postfix_str(run.label, refresh=True)
        try:
            result = execute_run(run, store, device, progress, options)
        finally:
            if lock is not None:
                lock.release()
        if claims is not None:
            claims.record(run, result)
            bar.n = len(plan.runs) - len(claims.pending)
            bar.refresh()
    bar.close()
    return distributed.broadcast_object(claims.summary if claims is not None else None, par)


def run_claimed(run: PlannedRun, store: RunStore, device: torch.device, progress: bool = False,
                options: Optional[ScaleOptions] = None, retry_failed: bool = False) -> str:
    """Claim one run and train it (what an executor job does): ``"done"`` or ``"failed"`` when trained here,
    ``"cached"`` when a result is already there, ``"busy"`` when another process holds it."""
    par = distributed.current()
    device = distributed.device_for_rank(device, par)
    lock, decision = None, None
    if par.is_main:
        decision, lock = _claim_one(run, store, retry_failed)
    decision = distributed.broadcast_object(decision, par)
    if decision != "train":
        return decision
    try:
        return execute_run(run, store, device, progress, options)["status"]
    finally:
        if lock is not None:
            lock.release()


def _claim_one(run: PlannedRun, store: RunStore, retry_failed: bool) -> tuple[str, Optional[RunLock]]:
    def finished() -> Optional[str]:
        previous = store.result(run.run_id)
        if previous is None or (retry_failed and previous.get("status") == "failed"):
            return None
        return "cached" if previous.get("status") == "done" else "failed"

    if (status := finished()) is not None:
        return status, None
    lock = store.lock(run.run_id)
    if not lock.try_acquire(note=run.label):
        return "busy", None
    if (status := finished()) is not None:
        lock.release()
        return status, None
    store.clear_result(run.run_id)
    return "train", lock


# -- `repro teachers cache`: the teacher-output cache of every finished teacher of a plan -------------------
def teacher_runs(plan: Plan) -> list[str]:
    """Runs that some student of the plan uses as its teacher, in plan order."""
    wanted = {r.config["teacher"]["run"] for r in plan.ordered() if r.config.get("teacher")}
    return [rid for rid in plan.runs if rid in wanted]


def cache_teachers(plan: Plan, store: RunStore, device: torch.device) -> list[tuple[str, int]]:
    """Fill the cache of every finished teacher of the plan; returns (run id, entries computed)."""
    from repro.data.teacher_cache import fill_cache
    from repro.pipelines import build_pipeline
    from repro.teacher_outputs import open_teacher_cache

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
        cache = open_teacher_cache(store.root, weights_key, recipe, data.dataset,
                                   students[0].config["model"]["num_classes"])
        bar = tqdm(total=len(data.dataset) * 162, desc=f"cache {run_id[:8]}", unit="view", mininterval=1.0)
        computed = fill_cache(cache, model, data.dataset, recipe.normalization.mean, recipe.normalization.std, device,
                              progress=lambda n, total: bar.update(n - bar.n))
        bar.close()
        cache.close()
        done.append((run_id, computed))
    return done
