"""Many runs as jobs: Slurm parameters, `repro status` across executors, and submitit local jobs that are
preempted or killed mid-run, requeued, and finish with the uninterrupted result."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from repro.train.distributed import ScaleOptions
from repro.core.errors import ReproError
from repro.harness.executors import (JobScheduler, add_scaleout_arguments, local_submitter, run_state, run_states,
                             slurm_parameters)
from repro.harness.locks import RunLock
from repro.harness.plan import make_plan
from repro.harness.spec import load_spec
from repro.harness.store import RunStore
from tests.conftest import TESTS

RESUME_SPEC = str(TESTS / "specs" / "tiny_resume.yaml")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_scaleout_arguments(parser)
    return parser.parse_args(list(argv))


# -- Slurm parameters ---------------------------------------------------------------------------------------------
def test_slurm_parameters_come_from_the_config_file_then_the_command_line(tmp_path):
    config = tmp_path / "slurm.yaml"
    config.write_text("partition: gpu\naccount: proj1\ntime: 240\ncpus: 8\nsetup: ['module load cuda']\n"
                      "additional: {mail-type: END}\nmax_requeue: 4\n")
    params, max_requeue = slurm_parameters(_args("--slurm-config", str(config), "--slurm-partition", "long",
                                                 "--nproc", "4"))
    assert params == {"partition": "long", "account": "proj1", "time": 240, "cpus_per_task": 8,
                      "setup": ["module load cuda"], "additional_parameters": {"mail-type": "END"},
                      "gpus_per_node": 4, "ntasks_per_node": 4, "job_name": "repro"}
    assert max_requeue == 4


def _fake_slurm(bin_dir: Path, record: Path) -> None:
    """``srun`` and ``sbatch`` stand-ins: sbatch keeps the script it is given and answers like Slurm."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {record}\necho 'Submitted batch job 4242'\n")
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)


def test_slurm_executor_submits_one_requeueable_job_per_run(tmp_path, monkeypatch):
    from repro.harness.executors import RunJob, make_submitter

    script = tmp_path / "submitted.sh"
    _fake_slurm(tmp_path / "bin", script)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    args = _args("--executor", "slurm", "--slurm-partition", "gpu", "--slurm-account", "proj1", "--slurm-time",
                 "90", "--slurm-cpus", "6", "--nproc", "2", "--slurm-config", str(_empty_config(tmp_path)))
    store = RunStore(tmp_path / "runs")
    submitter = make_submitter(args, store, torch.device("cuda"))
    run = make_plan(load_spec(RESUME_SPEC), "smoke").ordered()[0]
    job = submitter.submit(RunJob(str(store.root), run, "cuda", ScaleOptions()), [])
    assert job.job_id == "4242" and submitter.kind == "slurm" and not submitter.cancel_on_interrupt
    text = script.read_text()
    for line in ("--partition=gpu", "--account=proj1", "--time=90", "--cpus-per-task=6", "--gpus-per-node=2",
                 "--ntasks-per-node=2", "--signal=USR2@"):  # USR2 before the time limit: checkpoint + requeue
        assert f"#SBATCH {line}" in text, line


def _empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return path


def test_slurm_without_slurm_is_one_clear_error(tmp_path, monkeypatch):
    from repro.harness.executors import make_submitter

    monkeypatch.setenv("PATH", str(tmp_path))  # no srun anywhere
    with pytest.raises(ReproError, match="--executor slurm: .*srun"):
        make_submitter(_args("--executor", "slurm", "--slurm-config", str(_empty_config(tmp_path))),
                       RunStore(tmp_path / "runs"), torch.device("cpu"))


def test_slurm_config_errors_name_the_problem(tmp_path, monkeypatch):
    bad = tmp_path / "slurm.yaml"
    bad.write_text("partitoin: gpu\n")
    with pytest.raises(ReproError, match="unknown key 'partitoin'"):
        slurm_parameters(_args("--slurm-config", str(bad)))
    monkeypatch.setenv("REPRO_SLURM_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ReproError, match="missing.yaml does not exist"):
        slurm_parameters(_args())


# -- status -------------------------------------------------------------------------------------------------------
def test_status_tells_done_failed_running_interrupted_submitted_and_pending(tmp_path, capsys):
    from repro.harness.executors import print_status

    store = RunStore(tmp_path)
    for run_id in "abcdef":
        store.write_config(run_id, {"kind": "train"})
    store.write_result("a", {"status": "done", "label": "A"})
    store.write_result("b", {"status": "failed", "label": "B", "reason": "non-finite loss"})
    lock = store.lock("c")
    assert lock.try_acquire()  # a live trainer (this process)
    store.write_job("c", {"executor": "slurm", "job_id": "123"})
    store.checkpoint_path("d").write_bytes(b"x")  # no live holder: killed, resumes from its checkpoint
    store.write_job("e", {"executor": "slurm", "job_id": "124"})  # queued, not started
    states = {state.run_id: state for state in run_states(store)}
    assert {rid: st.state for rid, st in states.items()} == {"a": "done", "b": "failed", "c": "running",
                                                            "d": "interrupted", "e": "submitted", "f": "pending"}
    assert "slurm job 123" in states["c"].detail and states["b"].detail == "non-finite loss"
    print_status(store)
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "1 pending, 1 submitted, 1 running, 1 interrupted, 1 done, 1 failed"
    lock.release()
    assert run_state(store, "c").state == "submitted"


# -- local jobs through submitit: preempted or killed mid-run ------------------------------------------------------
def _clean_reference(root: Path, data: Path, threads: int) -> dict:
    env = {**os.environ, "REPRO_RUNS": str(root), "REPRO_DATA": str(data), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "repro", "run", RESUME_SPEC, "--tier", "smoke", "--no-progress",
                    "--no-estimate"], env=env, check=True, capture_output=True, timeout=600)
    return _student(root)


def _student(root: Path) -> dict:
    results = [json.loads(p.read_text()) for p in root.glob("*/result.json")]
    return next(r for r in results if " KD " in r["label"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted result, with as many threads as each local job gets."""
    root = tmp_path_factory.mktemp("reference")
    threads = local_submitter(root / "probe", jobs=2).threads
    return root, _clean_reference(root / "runs", root / "data", threads)


def _interrupt_student(store: RunStore, run_id: str, how: int) -> str:
    """Wait until the student run has checkpointed an epoch, then signal the job process that trains it; return
    the id of the job that was running it."""
    lock = RunLock(store.lock_path(run_id))
    deadline = time.time() + 300
    while time.time() < deadline:
        holder = lock.holder()
        if holder and store.metrics(run_id) and store.result(run_id) is None:
            os.kill(int(holder["pid"]), how)
            return store.job(run_id)["job_id"]
        time.sleep(0.02)
    raise AssertionError("the student run never checkpointed inside a job")


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGUSR2, signal.SIGKILL], ids=["preempted", "killed"])
def test_interrupted_local_job_is_requeued_and_finishes_with_the_uninterrupted_result(reference, tmp_path,
                                                                                        monkeypatch, how):
    ref_root, expected = reference
    monkeypatch.setenv("REPRO_DATA", str(ref_root / "data"))  # the jobs inherit this environment
    plan = make_plan(load_spec(RESUME_SPEC), "smoke")
    store = RunStore(tmp_path / "runs")
    scheduler = JobScheduler(plan, store, local_submitter(store.root / ".jobs" / "%j", jobs=2), ScaleOptions(),
                             progress=False, poll_s=0.1)
    outcome: dict = {}
    driver = threading.Thread(target=lambda: outcome.update(summary=scheduler.run()))
    driver.start()
    student = next(r for r in plan.ordered() if " KD " in r.label).run_id
    interrupted_job = _interrupt_student(store, student, how)
    driver.join(timeout=600)
    summary = outcome["summary"]
    assert len(summary.done) == 2 and not summary.failed and not summary.blocked
    resumed = _student(store.root)
    assert resumed["best_top1"] == expected["best_top1"] and resumed["last_top1"] == expected["last_top1"]
    a = torch.load(ref_root / "runs" / expected["run_id"] / "model.pt", weights_only=True)
    b = torch.load(store.root / resumed["run_id"] / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = "".join(p.read_text() for p in (store.root / ".jobs").rglob("*_log.*"))
    if how == signal.SIGUSR2:  # preemption: submitit calls RunJob.checkpoint and requeues the same job
        assert "Requeued job" in logs and store.job(student)["job_id"] == interrupted_job
    else:  # killed outright: the job ends without a result and the driver submits a new one
        assert store.job(student)["job_id"] != interrupted_job


# -- how many runs at once by default ----------------------------------------------------------------------------
def test_default_jobs_is_one_per_core_on_cpu_capped_by_the_runs_left_and_one_on_a_gpu(monkeypatch):
    from repro.harness.executors import default_jobs

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    cpu = torch.device("cpu")
    assert [default_jobs(cpu, n) for n in (0, 1, 3, 4, 50)] == [1, 1, 3, 4, 4]
    assert default_jobs(torch.device("cuda"), 50) == 1  # a GPU machine: one run at a time, as before
    assert default_jobs(None, 50) == 1 and default_jobs(cpu, 50, nproc=2) == 1  # elsewhere; a run spans 2 procs
    monkeypatch.setenv("RANK", "0")
    assert default_jobs(cpu, 50) == 1  # inside a torchrun launch


def test_jobs_come_from_the_flag_then_repro_jobs(monkeypatch):
    from repro.harness.executors import requested_jobs

    monkeypatch.delenv("REPRO_JOBS")
    assert requested_jobs(_args()) is None  # the default: default_jobs decides
    monkeypatch.setenv("REPRO_JOBS", "3")
    assert requested_jobs(_args()) == 3 and requested_jobs(_args("--jobs", "1")) == 1
    for bad in ("two", "0"):
        monkeypatch.setenv("REPRO_JOBS", bad)
        with pytest.raises(ReproError, match="REPRO_JOBS must be|--jobs must be at least 1"):
            requested_jobs(_args())


def _route(monkeypatch) -> dict:
    """Which engine `repro run` picks: the in-process loop or the scheduler (whose workers are not started)."""
    from repro.harness import executors
    from repro.harness import execute as runner

    seen: dict = {}

    def in_process(plan, store, device, **kwargs):
        seen["engine"] = "in-process"
        return runner.ExecutionSummary(done=list(plan.runs))

    def scheduler_run(self):
        seen.update(engine=self.submitter.kind, slots=self.submitter.slots, threads=self.submitter.threads)
        return runner.ExecutionSummary(done=list(self.states.pending), workers=self.submitter.slots)

    monkeypatch.setattr(runner, "execute", in_process)
    monkeypatch.setattr(executors.JobScheduler, "run", scheduler_run)
    return seen


def test_a_cpu_machine_runs_a_plan_side_by_side_by_default_and_jobs_1_in_process(workdirs, monkeypatch, capsys):
    from repro.cli import main

    seen = _route(monkeypatch)
    monkeypatch.delenv("REPRO_JOBS")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    base = ["run", str(TESTS / "specs" / "tiny.yaml"), "--tier", "smoke", "--no-estimate", "--device", "cpu"]
    assert main(base) == 0
    assert seen == {"engine": "workers", "slots": 2, "threads": 1}  # 4 runs to train, 2 cores
    out = capsys.readouterr().out
    assert "running up to 2 runs side by side in worker processes (1 torch thread(s) each)" in out
    assert "4 trained, 0 cached, 0 failed, 0 blocked; 2 at once" in out
    assert main([*base, "--jobs", "1"]) == 0 and seen["engine"] == "in-process"
    monkeypatch.setenv("REPRO_JOBS", "1")  # what `make JOBS=1` amounts to without the flag
    seen.clear()
    assert main(base) == 0 and seen == {"engine": "in-process"}
    assert "1 at once" in capsys.readouterr().out


@pytest.mark.slow
def test_worker_processes_train_a_plan_with_the_in_process_result(tmp_path, monkeypatch, capsys):
    """Spawned workers, for real: every run trained once, the same numbers as one at a time in this process."""
    from repro.cli import main

    monkeypatch.setenv("REPRO_DATA", str(tmp_path / "data"))
    base = ["run", str(TESTS / "specs" / "tiny.yaml"), "--tier", "smoke", "--no-estimate", "--device", "cpu"]
    assert main([*base, "--runs", str(tmp_path / "one"), "--jobs", "1"]) == 0
    assert main([*base, "--runs", str(tmp_path / "two"), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 trained, 0 cached, 0 failed, 0 blocked; 2 at once" in out
    one, two = RunStore(tmp_path / "one"), RunStore(tmp_path / "two")
    for run_id in make_plan(load_spec(str(TESTS / "specs" / "tiny.yaml")), "smoke").runs:
        a, b = one.result(run_id), two.result(run_id)
        assert (a["workers"], b["workers"]) == (1, 2)
        assert (a["best_top1"], a["last_top1"]) == (b["best_top1"], b["last_top1"])
    assert not list((tmp_path / "two").glob("*/.lock*"))
