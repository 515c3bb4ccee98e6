"""The runner end to end on a tiny spec: plan, train, cache, compare, render; failures; exact resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from repro.cli import main
from repro.methods.base import LOSS_TERMS, LossTerm
from repro.plan import make_plan
from repro.spec import load_spec
from repro.store import RunStore
from tests.conftest import TESTS, TINY_SPEC

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
    from repro.compare import compare_plan
    from repro.render.tables import CSV_COLUMNS, render_output

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


@LOSS_TERMS.register("test_nan_at_step_2")
class NanAtStep2(LossTerm):
    needs_teacher = False

    def __init__(self, ctx, **params):
        super().__init__(ctx, **params)
        self.calls = 0

    def forward(self, out, batch):
        self.calls += 1
        value = out.logits.float().mean() * 0
        return value + (float("nan") if self.calls == 2 else 0.0)


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
    from repro.compare import compare_plan

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
