"""Execute a plan: every pending run in dependency order, each written to the run store.

A finished run (done or failed) is never run again; a run killed half-way resumes from its last checkpoint.
Bad input (missing data, missing checkpoint) stops the whole plan with one message and writes no result, so it
runs once the input is fixed. A failed run (non-finite loss, failed teacher gate) is recorded as failed and its
dependants are skipped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from repro.errors import ReproError
from repro.models import create_model
from repro.plan import Plan, PlannedRun, file_sha256
from repro.store import RunStore
from repro.train import Resolved, RunFailed, evaluate_model, stamp, train_run


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
        model = create_model(model_cfg["arch"], num_classes=model_cfg["num_classes"], **model_cfg.get("args", {}))
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        key = file_sha256(path)
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
    from repro.teachers import load_teacher, verify_teacher

    model_cfg = config["model"]
    if not config.get("checkpoint"):
        model = create_model(model_cfg["arch"], num_classes=model_cfg["num_classes"], **model_cfg.get("args", {}))
        return model, canonical_model_key(model_cfg)
    path = Path(config["checkpoint"]["path"])
    if not path.is_file():
        raise ReproError(f"teacher checkpoint {path} is missing: run `repro teachers fetch` (or put the file there), "
                         f"or use TIER=smoke, whose teachers are trained")
    verify_teacher(model_cfg["arch"], path)
    return load_teacher(model_cfg["arch"], path, num_classes=model_cfg["num_classes"]), file_sha256(path)


def evaluate_checkpoint(config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A checkpoint teacher's run: verify its weights, measure its accuracy, apply the accuracy gate."""
    arch = config["model"]["arch"]
    model, _ = load_eval_model(config)
    scores = evaluate_model(model, config["recipe"], device)
    result = {"best_top1": scores["top1"], "last_top1": scores["top1"], "best_top5": scores["top5"],
              "last_top5": scores["top5"], "best_epoch": None, "world_size": 1,
              "expected_top1": config.get("expected_top1"), "gate_tolerance": config.get("gate_tolerance")}
    expected, tolerance = config.get("expected_top1"), config.get("gate_tolerance")
    if expected is not None and tolerance is not None and abs(scores["top1"] - expected) > tolerance:
        raise RunFailed(f"teacher-accuracy gate: {arch} measured {scores['top1']:.2f} vs expected {expected:.2f} "
                        f"(tolerance {tolerance}); pass --no-teacher-gate to use it anyway", **result)
    return result


def execute_run(run: PlannedRun, store: RunStore, device: torch.device, progress: bool) -> dict[str, Any]:
    store.write_config(run.run_id, run.config)
    started = time.time()
    try:
        if run.config["kind"] == "eval":
            fields = evaluate_checkpoint(run.config, device)
        else:
            resolved = resolve_dependencies(run.config, store, device)
            fields = train_run(run.config, store, run.run_id, device, resolved, progress)
        status, extra = "done", {}
    except RunFailed as failure:
        fields, status, extra = failure.details, "failed", {"reason": failure.reason}
    result = stamp({"run_id": run.run_id, "label": run.label, "status": status, "kind": run.config["kind"],
                    "tier": run.config["tier"], "seed": run.config.get("seed"), **fields, **extra,
                    "wall_time_s": time.time() - started}, device)
    store.write_result(run.run_id, result)
    return result


def execute(plan: Plan, store: RunStore, device: torch.device, progress: bool = True,
            retry_failed: bool = False) -> ExecutionSummary:
    summary = ExecutionSummary()
    runs = plan.ordered()
    bad: set[str] = set()
    bar = tqdm(total=len(runs), desc=f"{plan.spec.id} [{plan.tier}]", unit="run", disable=not progress,
               mininterval=1.0)
    for run in runs:
        previous = store.result(run.run_id)
        if previous is not None and not (retry_failed and previous.get("status") == "failed"):
            (summary.cached if previous.get("status") == "done" else summary.failed).append(run.run_id)
            if previous.get("status") != "done":
                bad.add(run.run_id)
        elif any(dep in bad for dep in run.deps):
            summary.blocked.append(run.run_id)
            bad.add(run.run_id)
        else:
            if previous is not None:
                store.clear_result(run.run_id)
            bar.set_postfix_str(run.label, refresh=True)
            result = execute_run(run, store, device, progress)
            if result["status"] == "done":
                summary.done.append(run.run_id)
            else:
                summary.failed.append(run.run_id)
                bad.add(run.run_id)
                tqdm.write(f"run {run.run_id} failed: {result.get('reason')}")
        bar.update(1)
    bar.close()
    return summary
