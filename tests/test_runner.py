"""The runner end to end on a tiny spec: plan, train, cache, compare, render; failures; exact resume."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from repro.cli import main
from repro.methods.base import LOSS_TERMS
from repro.harness.plan import make_plan
from repro.harness.spec import load_spec
from repro.harness.store import RunStore
from tests.conftest import TESTS, TINY_SPEC
from tests.support import non_finite_term

RESUME_SPEC = str(TESTS / "specs" / "tiny_resume.yaml")
QUIET = ["--no-progress", "--no-estimate"]


def test_plan_dedupes_and_orders_dependencies(workdirs):
    plan = make_plan(load_spec(TINY_SPEC), "smoke")
    ids = list(plan.runs)
    # teacher, Student, KD, WTTM; FitNet is reported only
    assert len(ids) == 4
    for run in plan.ordered():
        assert all(ids.index(dep) < ids.index(run.run_id) for dep in run.deps)
    again = make_plan(load_spec(TINY_SPEC), "smoke")
    assert list(again.runs) == ids  # ids are a pure function of the resolved configs
    full = make_plan(load_spec(TINY_SPEC), "full")
    assert full.cells[2].run_ids and len(full.cells[2].run_ids) == 2  # paper seeds at full tier
    assert set(full.runs).isdisjoint(ids)


def test_tiny_table_end_to_end(workdirs, capsys):
    args = ["table", TINY_SPEC.replace(".yaml", ""), "--tier", "smoke"]
    # `repro table` takes an output name; run + report the tiny spec through `run` and `report`.
    assert main(["run", TINY_SPEC, "--tier", "smoke", *QUIET]) == 0
    out = capsys.readouterr().out
    assert "4 trained, 0 cached" in out
    store = RunStore(workdirs["runs"])
    results = [store.result(r) for r in store.run_ids()]
    assert all(r["status"] == "done" for r in results)
    for r in results:
        for key in ("best_top1", "last_top1", "world_size", "wall_time_s", "device", "versions", "commit"):
            assert key in r, key
    # metrics lines: one per epoch with the promised fields
    kd = next(r for r in results if " KD " in r["label"])
    rows = store.metrics(kd["run_id"])
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert {"lr", "loss_ce", "loss_kd", "test_top1", "test_top5", "entropy", "wall_time_s"} <= set(rows[0])
    # a second invocation trains nothing
    assert main(["run", TINY_SPEC, "--tier", "smoke", *QUIET]) == 0
    assert "0 trained, 4 cached" in capsys.readouterr().out
    del args


def test_report_renders_every_cell_with_verdicts(workdirs, monkeypatch):
    from repro.harness.compare import compare_plan
    from repro.harness.render.tables import CSV_COLUMNS, render_output

    assert main(["run", TINY_SPEC, "--tier", "smoke", *QUIET]) == 0
    plan = make_plan(load_spec(TINY_SPEC), "smoke")
    results = compare_plan(plan, RunStore(workdirs["runs"]))
    md, csv = render_output("test-tiny", "smoke", [(plan, results)], workdirs["tables"], "test")
    text = md.read_text()
    assert "Tier: smoke" in text and "not compared (smoke tier)" in text and "reported only" in text
    assert "params.wttm: assumption, test value" in text
    frame = pd.read_csv(csv)
    assert list(frame.columns) == CSV_COLUMNS
    assert len(frame) == 5 and set(frame["tier"]) == {"smoke"}
    assert frame.loc[frame.method == "FitNet", "verdict"].item() == "reported only"


LOSS_TERMS.register("test_nan_at_step_2")(non_finite_term(at_step=2, value=float("nan")))


def test_non_finite_loss_fails_the_run_and_the_table_says_failed(workdirs, tmp_path, capsys):
    text = Path(TINY_SPEC).read_text().replace("Student: {losses: {ce: 1.0}}",
                                              "Student: {losses: {ce: 1.0, test_nan_at_step_2: 1.0}}")
    spec = tmp_path / "nan.yaml"
    spec.write_text(text)
    assert main(["run", str(spec), "--tier", "smoke", *QUIET]) == 0
    store = RunStore(workdirs["runs"])
    failed = [store.result(r) for r in store.run_ids() if store.result(r)["status"] == "failed"]
    assert len(failed) == 1
    assert failed[0]["epoch"] == 1 and failed[0]["step"] == 2 and "non-finite loss" in failed[0]["reason"]
    assert "best_top1" not in failed[0]
    from repro.harness.compare import compare_plan

    plan = make_plan(load_spec(str(spec)), "smoke")
    student = next(r for r in compare_plan(plan, store) if r.cell.method == "Student")
    assert student.verdict == "failed" and student.mean is None


def _run_repro(store: Path, data: Path) -> subprocess.Popen:
    env = {**os.environ, "REPRO_RUNS": str(store), "REPRO_DATA": str(data), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "repro", "run", RESUME_SPEC, "--tier", "smoke", *QUIET],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _student_result(store: Path) -> dict:
    results = [json.loads(p.read_text()) for p in store.glob("*/result.json")]
    return next(r for r in results if " KD " in r["label"])


@pytest.mark.slow  # three `repro run` processes, one killed mid-epoch: the heaviest of the fast suite, so `make test-all` only
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    data = tmp_path / "data"
    clean = tmp_path / "clean"
    assert _run_repro(clean, data).wait(timeout=600) == 0
    expected = _student_result(clean)

    killed = tmp_path / "killed"
    proc = _run_repro(killed, data)
    deadline = time.time() + 600
    victim = None
    while time.time() < deadline and victim is None:
        for run_dir in killed.glob("*"):
            metrics = run_dir / "metrics.jsonl"
            config = run_dir / "config.json"
            if metrics.exists() and config.exists() and json.loads(config.read_text())["teacher"] \
                    and not (run_dir / "result.json").exists():
                victim = run_dir
        time.sleep(0.05)
    assert victim is not None, "the student run never checkpointed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (victim / "result.json").exists()
    epochs_done = len((victim / "metrics.jsonl").read_text().splitlines())
    assert 1 <= epochs_done < 4
    assert _run_repro(killed, data).wait(timeout=600) == 0
    resumed = _student_result(killed)
    assert resumed["best_top1"] == expected["best_top1"]
    assert resumed["last_top1"] == expected["last_top1"]
    a = torch.load(clean / expected["run_id"] / "model.pt", weights_only=True)
    b = torch.load(killed / resumed["run_id"] / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- the one claim/settle state machine (RunStates), driven by every engine ----------------------------------------
def _tiny_runs() -> dict:
    plan = make_plan(load_spec(TINY_SPEC), "smoke")
    by_method = {run.label.split()[-3] if "<-" in run.label else run.label.split()[1]: run for run in plan.ordered()}
    assert set(by_method) == {"teacher", "Student", "KD", "WTTM"}
    return plan, by_method


def _hold_in_another_process(store: RunStore, run_id: str) -> subprocess.Popen:
    """A live process of this host holding ``run_id``'s lock (as `repro run` elsewhere would)."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    path = store.lock_path(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "token": "other"}))
    return holder


def test_run_states_claims_waits_settles_and_retries_a_snapshot_of_failed_runs(tmp_path, capsys):
    from repro.harness.execute import PlanProgress, RunStates

    plan, run = _tiny_runs()
    store = RunStore(tmp_path / "runs")
    store.write_result(run["Student"].run_id, {"status": "failed", "reason": "before"})
    holder = _hold_in_another_process(store, run["teacher"].run_id)
    try:
        states = RunStates(plan.ordered(), store, retry_failed=True,
                           progress=PlanProgress("tiny", len(plan.runs), bar=False))
        assert set(states.retry) == {run["Student"].run_id} and states.unfinished() == 4
        got, lock = states.claim_next()  # the teacher is held elsewhere: the failed Student is retried
        assert got is run["Student"] and lock is not None and store.result(got.run_id) is None
        assert states.claim_next() == (None, None) and states.pending  # KD and WTTM need the teacher: wait
        states.claim_next()
        store.write_result(got.run_id, {"status": "done", "label": got.label, "last_top1": 50.0,
                                        "best_top1": 60.0, "wall_time_s": 3.0})
        lock.release()
        states.record(got, "done")
        # The other process finishes the teacher: taken as it is (cached), and its students become claimable.
        store.write_result(run["teacher"].run_id, {"status": "done"})
        store.lock_path(run["teacher"].run_id).unlink()
        got, lock = states.claim_next()
        assert got is run["KD"]
        lock.release()
        states.record(got, "busy")  # its job found it taken after all: waited for again, in plan order
        store.write_result(run["WTTM"].run_id, {"status": "done"})  # finished by another between look and lock
        assert states.claim(run["WTTM"]) is None and states.settled[run["WTTM"].run_id] == "cached"
        store.write_result(run["KD"].run_id, {"status": "failed", "reason": "non-finite loss"})
        states.record(run["KD"], "failed")
    finally:
        holder.kill()
        holder.wait()
    assert states.summary.done == [run["Student"].run_id] and states.summary.failed == [run["KD"].run_id]
    assert states.summary.cached == [run["teacher"].run_id, run["WTTM"].run_id] and not states.pending
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "waiting" in line] == [  # once, however often it was looked at
        f"run {run['teacher'].run_id} ({run['teacher'].label}) is being trained by {socket.gethostname()}:"
        f"{holder.pid}; waiting for it"]
    assert f"done    {run['Student'].run_id}  {run['Student'].label}  top-1 50.00 (best 60.00)  3 s" in lines[1]
    assert lines[-1].endswith(f"failed  {run['KD'].run_id}  {run['KD'].label}: non-finite loss")
    assert len(lines) == 3  # cached runs get no line: they did not run now


def test_run_states_retries_only_the_failed_result_it_saw_and_blocks_dependants(tmp_path):
    from repro.harness.execute import RunStates

    plan, run = _tiny_runs()
    store = RunStore(tmp_path / "runs")
    store.write_result(run["teacher"].run_id, {"status": "failed", "reason": "gate"})
    states = RunStates(plan.ordered(), store, retry_failed=True)
    assert states.finished(run["teacher"]) is None  # the failed result it saw: to be trained again
    store.write_result(run["teacher"].run_id, {"status": "failed", "reason": "re-run elsewhere, failed again"})
    assert states.finished(run["teacher"]) == "failed"  # another process retried it: taken as it is
    assert [r.label for r in states.ready()] == [run["Student"].label]
    assert states.settled == {run["teacher"].run_id: "failed", run["KD"].run_id: "blocked",
                              run["WTTM"].run_id: "blocked"}


def _fake_training(monkeypatch) -> list:
    """``execute_run`` that writes a result at once, and a record of every RunStates.record call."""
    from repro.harness import execute as runner

    recorded = []

    def execute_run(run, store, device, progress, options=None, workers=1):
        result = {"run_id": run.run_id, "label": run.label, "status": "done", "last_top1": 1.0, "best_top1": 1.0,
                  "wall_time_s": 0.0, "workers": workers}
        store.write_result(run.run_id, result)
        return result

    original = runner.RunStates.record
    monkeypatch.setattr(runner, "execute_run", execute_run)
    monkeypatch.setattr(runner.RunStates, "record",
                        lambda self, run, status: recorded.append((run.run_id, status)) or original(self, run, status))
    return recorded


class _InlineJob:
    """A job run to completion on submission, in this process."""

    job_id = "inline"

    def __init__(self, job) -> None:
        self.outcome = job()

    def done(self) -> bool:
        return True

    def results(self) -> list:
        return [self.outcome]


def test_the_in_process_loop_and_the_job_scheduler_both_drive_run_states(tmp_path, monkeypatch):
    from repro.train.distributed import ScaleOptions
    from repro.harness.executors import JobScheduler, Submitter
    from repro.harness.execute import execute

    recorded = _fake_training(monkeypatch)
    plan = make_plan(load_spec(TINY_SPEC), "smoke")
    order = [r.run_id for r in plan.ordered()]
    summary = execute(plan, RunStore(tmp_path / "a"), torch.device("cpu"), progress=False, poll_s=0)
    assert summary.done == order and recorded == [(run_id, "done") for run_id in order] and summary.workers == 1
    recorded.clear()
    store = RunStore(tmp_path / "b")
    submitter = Submitter("workers", lambda job, gpus: _InlineJob(job), slots=2, threads=1)
    summary = JobScheduler(plan, store, submitter, ScaleOptions(), progress=False, poll_s=0).run()
    assert summary.done == order and recorded == [(run_id, "done") for run_id in order]
    assert {store.result(run_id)["workers"] for run_id in order} == {2}  # the stamp says how many ran at once
    recorded.clear()
    summary = JobScheduler(plan, store, submitter, ScaleOptions(), progress=False, poll_s=0).run()
    assert summary.cached == order and not recorded  # settled by the machine before any job was submitted


def test_plan_output_is_one_line_per_run_and_no_redrawn_bars_when_not_a_terminal(workdirs, capsys, monkeypatch):
    from repro.harness import execute as runner

    bars = []
    original = runner.execute_run
    monkeypatch.setattr(runner, "execute_run",
                        lambda run, store, device, progress, *a, **k: bars.append(progress)
                        or original(run, store, device, progress, *a, **k))
    assert main(["run", TINY_SPEC, "--tier", "smoke", "--no-estimate", "--jobs", "1"]) == 0  # progress on
    captured = capsys.readouterr()
    assert bars == [False] * 4  # several runs planned: no per-step bar from any of them
    assert "\r" not in captured.out + captured.err
    plan = make_plan(load_spec(TINY_SPEC), "smoke")
    lines = [line for line in captured.out.splitlines() if line.startswith("[")]
    assert len(lines) == 4
    for n, (line, run) in enumerate(zip(lines, plan.ordered()), 1):
        assert line.startswith(f"[{n}/4] done    {run.run_id}  {run.label}  top-1 ") and line.endswith(" s"), line
    assert "4 trained, 0 cached, 0 failed, 0 blocked; 1 at once" in captured.out
