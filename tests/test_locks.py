"""One trainer per run: the run lock (exclusive, stale-lock recovery, heartbeat), and two `repro run` processes on
the same spec at once, which must train every run exactly once and leave a complete table."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from repro.harness.locks import RunLock
from tests.conftest import TINY_SPEC

QUIET = ["--no-progress", "--no-estimate"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_holder(path: Path, **info) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"token": "someone-else", **info}))


def test_one_holder_at_a_time_and_release(tmp_path):
    path = tmp_path / "run" / ".lock"
    first, second = RunLock(path), RunLock(path)
    assert first.try_acquire() and path.is_file()
    assert not second.try_acquire()  # a live holder (this very process) keeps it
    assert second.is_held_live() and second.describe() == f"{socket.gethostname()}:{os.getpid()}"
    first.release()
    assert not path.exists()
    assert second.try_acquire()
    second.release()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    path = tmp_path / ".lock"
    _write_holder(path, host=socket.gethostname(), pid=_dead_pid())
    lock = RunLock(path)
    assert lock.is_stale() and lock.try_acquire()
    assert lock.holder()["pid"] == os.getpid()
    lock.release()


def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    path = tmp_path / ".lock"
    _write_holder(path, host=socket.gethostname(), pid=os.getpid(), pid_start="not-my-start-time")
    assert RunLock(path).try_acquire()


def test_other_host_lock_is_stale_only_once_its_heartbeat_stops(tmp_path):
    path = tmp_path / ".lock"
    _write_holder(path, host="another-node", pid=1)
    lock = RunLock(path, stale_after_s=60)
    assert not lock.try_acquire()  # fresh heartbeat: alive, whatever its pid means here
    old = time.time() - 120
    os.utime(path, (old, old))
    assert lock.try_acquire()
    lock.release()


def test_a_lock_being_written_counts_as_held(tmp_path):
    path = tmp_path / ".lock"
    path.write_text("")  # created with O_EXCL, content not yet written
    assert not RunLock(path).try_acquire()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    path = tmp_path / ".lock"
    lock = RunLock(path, heartbeat_s=0.05, stale_after_s=0.5)
    assert lock.try_acquire()
    old = time.time() - 100
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 1 and not RunLock(path, stale_after_s=0.5).is_stale()
    lock.release()


def test_release_never_removes_a_lock_someone_else_took_over(tmp_path):
    path = tmp_path / ".lock"
    lock = RunLock(path)
    assert lock.try_acquire()
    _write_holder(path, host="another-node", pid=1)  # e.g. our heartbeat stalled and it was judged stale
    lock.release()
    assert json.loads(path.read_text())["host"] == "another-node"


def test_racing_for_a_stale_lock_has_exactly_one_winner(tmp_path):
    path = tmp_path / ".lock"
    _write_holder(path, host=socket.gethostname(), pid=_dead_pid())
    start = threading.Barrier(8)
    winners = []

    def contender() -> None:
        lock = RunLock(path)
        start.wait()
        if lock.try_acquire():
            winners.append(lock)

    threads = [threading.Thread(target=contender) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    winners[0].release()


@pytest.mark.slow  # two `repro run` processes training a spec: the heaviest of the fast suite, so `make test-all` only
def test_two_repro_runs_on_one_spec_train_every_run_exactly_once(tmp_path):
    from repro.harness.compare import compare_plan
    from repro.harness.plan import make_plan
    from repro.harness.spec import load_spec
    from repro.harness.store import RunStore

    env = {**os.environ, "REPRO_RUNS": str(tmp_path / "runs"), "REPRO_DATA": str(tmp_path / "data"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "repro", "run", TINY_SPEC, "--tier", "smoke", *QUIET]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        outputs.append(out)
    counts = [re.search(r"(\d+) trained, (\d+) cached, (\d+) failed", out).groups() for out in outputs]
    trained = [int(c[0]) for c in counts]
    plan = make_plan(load_spec(TINY_SPEC), "smoke")
    assert sum(trained) == len(plan.runs) == 4  # each run trained by one of the two, never by both
    assert all(int(c[0]) + int(c[1]) == 4 and c[2] == "0" for c in counts)  # the rest came from the other
    store = RunStore(tmp_path / "runs")
    assert all(store.is_done(run_id) for run_id in plan.runs)
    assert not list((tmp_path / "runs").glob("*/.lock*"))  # every lock given back
    for run_id in plan.runs:
        epochs = json.loads((tmp_path / "runs" / run_id / "config.json").read_text())["recipe"]["epochs"]
        assert len(store.metrics(run_id)) == epochs  # one clean history per run
    rows = compare_plan(plan, store)
    assert all(row.mean is not None for row in rows if row.cell.method != "FitNet")  # the table is complete
