"""Where runs execute: in this process (the default), as concurrent local jobs, or as Slurm jobs.

- ``--executor local`` (default), ``--jobs 1``: runs one after another in this process; ``--nproc N`` re-launches
  the command under torchrun so that each run trains on N processes (``repro.distributed``).
- ``--executor local --jobs N``: up to N runs at once on this machine, each a submitit local job with its own
  device(s) (``--nproc`` each) or, on CPU, its share of the cores.
- ``--executor slurm``: each run a Slurm job submitted through submitit (partition, GPUs, CPUs, time limit,
  account from the command line or a YAML config file). A job that is preempted or reaches its time limit is
  requeued by submitit and resumes from the run's last checkpoint; a job that dies without a word (node failure,
  SIGKILL) is resubmitted by the driver a few times, and resumes the same way.

The driver submits a run once its dependencies are done, so dependants wait for their teachers. Every job claims its
run's lock before training (``repro.runner.run_claimed``): several drivers, or a driver and a plain ``repro run``,
on the same store never train a run twice.
"""
from __future__ import annotations

import argparse
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import submitit
import yaml
from submitit.core.utils import UncompletedJobError
from tqdm import tqdm

from repro.errors import ReproError

if TYPE_CHECKING:  # the command line imports this module for its flags: torch and the trainer load on use
    import torch

    from repro.distributed import ScaleOptions
    from repro.plan import Plan, PlannedRun
    from repro.runner import ExecutionSummary
    from repro.store import RunStore

SLURM_CONFIG_ENV = "REPRO_SLURM_CONFIG"
DEFAULT_SLURM_CONFIG = Path("~/.config/repro/slurm.yaml")
# Config-file keys -> SlurmExecutor parameters (command-line flags override them).
SLURM_KEYS = {"partition": "partition", "gpus": "gpus_per_node", "cpus": "cpus_per_task", "time": "time",
              "account": "account", "qos": "qos", "constraint": "constraint", "mem": "mem", "setup": "setup",
              "additional": "additional_parameters"}
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # local jobs have no time limit of their own
MAX_RESUBMITS = 3  # a job that died without a result (node failure, SIGKILL) is resubmitted this many times
SLURM_ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING",
               "SUSPENDED"}


# -- command line --------------------------------------------------------------------------------------------
def add_scaleout_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the commands that execute runs (run, table, smoke, teachers train)."""
    group = parser.add_argument_group("scale-out")
    group.add_argument("--nproc", type=int, default=1,
                       help="processes (devices) per run, under torchrun + DDP; the global batch is kept")
    group.add_argument("--bn", choices=["sync", "per-device"], default="sync",
                       help="BatchNorm statistics over the global batch (SyncBatchNorm, default) or per device")
    group.add_argument("--max-device-batch", type=int, default=None,
                       help="largest batch one process runs at once; above it gradients accumulate")
    group.add_argument("--rescale-batch", action="store_true",
                       help="allow a --nproc that does not divide the global batch (lr scaled, stamped as deviation)")
    group.add_argument("--executor", choices=["local", "slurm"], default="local",
                       help="local: this machine; slurm: one Slurm job per run (submitit)")
    group.add_argument("--jobs", type=int, default=None,
                       help="runs at once (local default 1; slurm default: every run that is ready)")
    group.add_argument("--slurm-config", default=None,
                       help=f"YAML with partition/gpus/cpus/time/account/... (default ${SLURM_CONFIG_ENV} or "
                            f"{DEFAULT_SLURM_CONFIG})")
    group.add_argument("--slurm-partition", default=None)
    group.add_argument("--slurm-gpus", type=int, default=None, help="GPUs per run (default: --nproc)")
    group.add_argument("--slurm-cpus", type=int, default=None, help="CPUs per task")
    group.add_argument("--slurm-time", type=int, default=None, help="time limit per job, minutes")
    group.add_argument("--slurm-account", default=None)
    group.add_argument("--slurm-max-requeue", type=int, default=None,
                       help="time-outs after which a job is not requeued again (default 10)")


def scale_options(args: argparse.Namespace) -> ScaleOptions:
    from repro.distributed import ScaleOptions

    return ScaleOptions(bn=getattr(args, "bn", "sync"), max_device_batch=getattr(args, "max_device_batch", None),
                        rescale_batch=getattr(args, "rescale_batch", False))


def _uses_torchrun(args: argparse.Namespace) -> bool:
    return getattr(args, "executor", "local") == "local" and (getattr(args, "jobs", None) or 1) == 1


def prepare(args: argparse.Namespace, argv: Sequence[str]) -> Optional[int]:
    """Call first in ``main``. With ``--nproc N > 1`` in this process, re-launch the command on N processes and
    return its exit code; inside such a launch, join the process group and return None."""
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        raise ReproError(f"--nproc must be at least 1, got {nproc}")
    jobs = getattr(args, "jobs", None)
    if jobs is not None and jobs < 1:
        raise ReproError(f"--jobs must be at least 1, got {jobs}")
    if nproc == 1 and "RANK" not in os.environ:
        return None  # neither launching nor launched: no need to load torch here
    from repro import distributed

    if distributed.launched_by_torchrun():
        distributed.init_from_env(want_cuda=getattr(args, "device", "auto") != "cpu")
        return None
    if nproc > 1 and _uses_torchrun(args):
        return distributed.launch(distributed.strip_option(argv, "--nproc"), nproc)
    return None


def runs_elsewhere(args: argparse.Namespace) -> bool:
    """The runs execute on other machines (Slurm nodes), whose devices this one cannot see or measure."""
    return getattr(args, "executor", "local") == "slurm"


def execute_with_args(plan: Plan, store: RunStore, device: Optional[torch.device],
                      args: argparse.Namespace) -> ExecutionSummary:
    """``repro run``'s execution: in this process (group), or through the chosen executor's jobs.

    ``device``: this machine's resolved ``--device`` (None when the runs execute elsewhere). Jobs get the
    unresolved ``--device`` and resolve it themselves: ``auto`` on a GPU node is its GPU, whatever the driver has.
    """
    from repro.runner import execute

    options = scale_options(args)
    progress = not getattr(args, "no_progress", False)
    retry = getattr(args, "retry_failed", False)
    if _uses_torchrun(args):
        assert device is not None
        return execute(plan, store, device, progress=progress, retry_failed=retry, options=options)
    submitter = make_submitter(args, store, device)
    return JobScheduler(plan, store, submitter, options, device_spec=getattr(args, "device", "auto"),
                        retry_failed=retry, progress=progress).run()


# -- the job -------------------------------------------------------------------------------------------------
class RunJob(submitit.helpers.Checkpointable):
    """One run as a submitit job. Preempted or timed out, submitit calls ``checkpoint`` and requeues the same job:
    the trainer's own epoch checkpoint is the state, so the requeued job simply claims the run again and resumes."""

    def __init__(self, store_root: str, run: PlannedRun, device_spec: str, options: ScaleOptions,
                 threads: Optional[int] = None, retry_failed: bool = False) -> None:
        self.store_root, self.run, self.device_spec = store_root, run, device_spec
        self.options, self.threads, self.retry_failed = options, threads, retry_failed

    def __call__(self) -> dict[str, Any]:
        from repro.numerics import set_cublas_workspace

        set_cublas_workspace()  # before this job's first CUDA call
        import torch

        from repro import distributed
        from repro.runner import run_claimed
        from repro.store import RunStore

        if submitit.JobEnvironment().num_tasks > 1:  # one task per process of the run
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            distributed.init_from_env(want_cuda=self.device_spec != "cpu", quiet_workers=False)
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            status = run_claimed(self.run, RunStore(Path(self.store_root)), self._device(), progress=False,
                                 options=self.options, retry_failed=self.retry_failed)
            return {"status": status}
        except ReproError as err:  # bad input: reported by the driver, which then stops submitting
            return {"status": "error", "message": str(err)}
        finally:
            distributed.shutdown()

    def _device(self) -> torch.device:
        """The job's own device, resolved here (on the node that runs it) from the unresolved ``--device``."""
        import torch

        from repro import distributed

        if self.device_spec.startswith("cuda") and not torch.cuda.is_available():
            raise ReproError(f"run {self.run.run_id}: its job sees no GPU (ask for some with --slurm-gpus)")
        device = distributed.resolve_device(self.device_spec)
        if device.type != "cuda":
            return device
        # The job sees only the devices it was given, all of them or (one task per GPU) just its own.
        return distributed.visible_cuda_device(distributed.current().local_rank)


# -- submitting ------------------------------------------------------------------------------------------------
@dataclass
class Submitter:
    """Makes one submitit job per run: ``submit(job, gpu_ids)``; ``slots``: runs at once; ``gpus``: devices to
    share out (empty: the executor's own business, or CPU)."""

    kind: str
    submit: Callable[[RunJob, list[int]], Any]
    slots: Optional[int]
    gpus: list[int] = field(default_factory=list)
    gpus_per_run: int = 0
    threads: Optional[int] = None
    cancel_on_interrupt: bool = True


def make_submitter(args: argparse.Namespace, store: RunStore, device: Optional[torch.device]) -> Submitter:
    folder = store.root / ".jobs" / "%j"
    nproc = getattr(args, "nproc", 1)
    if args.executor == "slurm":
        return _slurm_submitter(args, folder, nproc)
    return local_submitter(folder, jobs=args.jobs or 1, nproc=nproc,
                           use_cuda=device is not None and device.type == "cuda")


def local_submitter(folder: Path, jobs: int, nproc: int = 1, use_cuda: bool = False) -> Submitter:
    """Up to ``jobs`` submitit local jobs at once, each with ``nproc`` processes and, on GPUs, its own devices."""
    import torch

    executor = submitit.LocalExecutor(folder=folder)
    gpus = list(range(torch.cuda.device_count())) if use_cuda else []
    if gpus and len(gpus) < nproc:
        raise ReproError(f"--nproc {nproc} needs {nproc} GPUs; this machine has {len(gpus)}")
    slots = min(jobs, len(gpus) // nproc) if gpus else jobs
    threads = None if gpus else max(1, (os.cpu_count() or 1) // (slots * nproc))

    def submit(job: RunJob, gpu_ids: list[int]) -> Any:
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, tasks_per_node=nproc,
                                   gpus_per_node=len(gpu_ids), visible_gpus=gpu_ids)
        return executor.submit(job)

    return Submitter("local", submit, slots, gpus, nproc if gpus else 0, threads)


def load_slurm_config(path: Optional[str]) -> dict[str, Any]:
    """The user's Slurm defaults: ``--slurm-config``, else ``$REPRO_SLURM_CONFIG``, else the default file if any."""
    explicit = path or os.environ.get(SLURM_CONFIG_ENV)
    config_path = Path(explicit or DEFAULT_SLURM_CONFIG).expanduser()
    if not config_path.is_file():
        if explicit:
            raise ReproError(f"Slurm config {config_path} does not exist")
        return {}
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ReproError(f"Slurm config {config_path}: YAML syntax error: {err}") from None
    if not isinstance(raw, dict):
        raise ReproError(f"Slurm config {config_path}: expected a mapping")
    unknown = sorted(set(raw) - set(SLURM_KEYS) - {"max_requeue"})
    if unknown:
        raise ReproError(f"Slurm config {config_path}: unknown key {unknown[0]!r}; known keys: "
                         f"{', '.join(sorted([*SLURM_KEYS, 'max_requeue']))}")
    return raw


def slurm_parameters(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """SlurmExecutor parameters (config file, then command-line flags) and the max number of requeues."""
    config = load_slurm_config(getattr(args, "slurm_config", None))
    nproc = getattr(args, "nproc", 1)
    flags = {"partition": args.slurm_partition, "gpus": args.slurm_gpus, "cpus": args.slurm_cpus,
             "time": args.slurm_time, "account": args.slurm_account}
    merged = {**config, **{k: v for k, v in flags.items() if v is not None}}
    params = {SLURM_KEYS[k]: v for k, v in merged.items() if k in SLURM_KEYS}
    params.setdefault("gpus_per_node", nproc)
    params.setdefault("time", 60 * 24)
    params["ntasks_per_node"] = nproc  # one task per process of the run; submitit exports the DDP environment
    params["job_name"] = "repro"
    if not params["gpus_per_node"]:
        params.pop("gpus_per_node")
    max_requeue = args.slurm_max_requeue if args.slurm_max_requeue is not None else config.get("max_requeue", 10)
    return params, int(max_requeue)


def _slurm_submitter(args: argparse.Namespace, folder: Path, nproc: int) -> Submitter:
    params, max_requeue = slurm_parameters(args)
    try:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeue)
    except RuntimeError as err:  # no srun on this machine
        raise ReproError(f"--executor slurm: {err}") from None
    try:
        executor.update_parameters(**params)
    except ValueError as err:
        raise ReproError(f"Slurm parameters: {err}") from None

    def submit(job: RunJob, gpu_ids: list[int]) -> Any:
        return executor.submit(job)

    return Submitter("slurm", submit, args.jobs, cancel_on_interrupt=False)


# -- the driver ------------------------------------------------------------------------------------------------
@dataclass
class _Active:
    run: PlannedRun
    job: Any
    gpus: list[int]
    resubmits: int = 0


class JobScheduler:
    """Submits every pending run of a plan as a job once its dependencies are done, and collects the outcomes."""

    def __init__(self, plan: Plan, store: RunStore, submitter: Submitter, options: ScaleOptions,
                 device_spec: str = "cpu", retry_failed: bool = False, progress: bool = True,
                 poll_s: float = 1.0) -> None:
        from repro.runner import ExecutionSummary

        self.plan, self.store, self.submitter, self.options = plan, store, submitter, options
        self.device_spec, self.progress, self.poll_s = device_spec, progress, poll_s
        self.pending = plan.ordered()
        self.active: dict[str, _Active] = {}
        self.free_gpus = list(submitter.gpus)
        self.summary = ExecutionSummary()
        self.done: set[str] = set()
        self.bad: set[str] = set()
        self.errors: list[str] = []
        self.retry = {r.run_id: result for r in self.pending if retry_failed
                      and (result := store.result(r.run_id)) is not None and result.get("status") == "failed"}
        self.announced: set[str] = set()

    def run(self) -> ExecutionSummary:
        bar = tqdm(total=len(self.plan.runs), desc=f"{self.plan.spec.id} [{self.plan.tier}] ({self.submitter.kind})",
                   unit="run", disable=not self.progress, mininterval=1.0)
        try:
            while self.pending or self.active:
                self._collect()
                if not self.errors:
                    self._submit_ready()
                elif not self.active:
                    break
                bar.n = len(self.plan.runs) - len(self.pending) - len(self.active)
                bar.refresh()
                if self.pending or self.active:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        finally:
            bar.close()
        if self.errors:
            raise ReproError(self.errors[0])
        return self.summary

    # -- submitting ----------------------------------------------------------------------------------------------
    def _submit_ready(self) -> None:
        for run in list(self.pending):
            if self._settle_if_finished(run):
                continue
            if any(dep in self.bad for dep in run.deps):
                self._settle(run, self.summary.blocked, bad=True)
                continue
            if not all(dep in self.done for dep in run.deps):
                continue
            lock = self.store.lock(run.run_id)
            if lock.is_held_live():
                self._announce_wait(run, lock.describe())
                continue
            queued = self._queued_elsewhere(run)
            if queued:
                self._announce_wait(run, queued)
                continue
            if not self._has_slot():
                return
            self._submit(run)

    def _queued_elsewhere(self, run: PlannedRun) -> Optional[str]:
        """A Slurm job another driver submitted for this run that is still queued or running: waiting for it
        beats queueing a twin (which would find the run taken anyway)."""
        record = self.store.job(run.run_id)
        if self.submitter.kind != "slurm" or not record or record.get("executor") != "slurm":
            return None
        try:
            state = submitit.SlurmJob(folder=self.store.root / ".jobs" / "%j", job_id=record["job_id"]).state
        except Exception:  # noqa: BLE001 - sacct unavailable or unaware: submit our own
            return None
        return f"slurm job {record['job_id']} ({state})" if state.upper() in SLURM_ALIVE else None

    def _has_slot(self) -> bool:
        slots = self.submitter.slots
        if slots is not None and len(self.active) >= slots:
            return False
        return not self.submitter.gpus or len(self.free_gpus) >= self.submitter.gpus_per_run

    def _submit(self, run: PlannedRun, resubmits: int = 0) -> None:
        gpus = [self.free_gpus.pop(0) for _ in range(self.submitter.gpus_per_run)] if self.submitter.gpus else []
        job = self.submitter.submit(RunJob(str(self.store.root), run, self.device_spec, self.options,
                                           self.submitter.threads, retry_failed=run.run_id in self.retry), gpus)
        self.store.write_job(run.run_id, {"executor": self.submitter.kind, "job_id": str(job.job_id),
                                          "submitted_at": time.time(), "driver": socket.gethostname()})
        if run in self.pending:
            self.pending.remove(run)
        self.active[run.run_id] = _Active(run, job, gpus, resubmits)

    # -- collecting ----------------------------------------------------------------------------------------------
    def _collect(self) -> None:
        for run_id, active in list(self.active.items()):
            if not active.job.done():
                continue
            del self.active[run_id]
            self.free_gpus += active.gpus
            try:
                if self.submitter.kind == "local" and not active.job.task(0).paths.result_pickle.exists():
                    # A finished local job wrote its result before exiting; no need for submitit's grace wait.
                    raise UncompletedJobError(f"local job {active.job.job_id} ended without a result")
                outcome = active.job.results()[0]  # rank 0's outcome (the tasks of one run agree)
            except UncompletedJobError:  # died without a result: killed, node failure
                if active.resubmits < MAX_RESUBMITS:
                    tqdm.write(f"job for run {run_id} ended without a result; resubmitting (resumes from checkpoint)")
                    self._submit(active.run, active.resubmits + 1)
                    continue
                outcome = {"status": "error", "message": f"run {run_id}: its job died {MAX_RESUBMITS + 1} times "
                                                         f"without a result; see {self.store.root / '.jobs'}"}
            except Exception as err:  # noqa: BLE001 - a crash inside the job: report it, stop submitting
                outcome = {"status": "error", "message": f"run {run_id} ({active.run.label}) crashed in its job: "
                                                         f"{str(err).strip().splitlines()[-1]}"}
            self._record(active.run, outcome)

    def _record(self, run: PlannedRun, outcome: dict[str, Any]) -> None:
        status = outcome.get("status")
        if status == "done":
            self._settle(run, self.summary.done, done=True)
        elif status == "cached":
            self._settle(run, self.summary.cached, done=True)
        elif status == "failed":
            self._settle(run, self.summary.failed, bad=True)
            tqdm.write(f"run {run.run_id} failed: {(self.store.result(run.run_id) or {}).get('reason')}")
        elif status == "busy":  # another process trains it: back to waiting for its result, in plan order
            waiting = {r.run_id for r in self.pending} | {run.run_id}
            self.pending = [r for r in self.plan.ordered() if r.run_id in waiting]
        else:
            self.bad.add(run.run_id)
            self.errors.append(outcome.get("message", f"run {run.run_id}: job error"))

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
        if run in self.pending:
            self.pending.remove(run)
        self.retry.pop(run.run_id, None)
        if done:
            self.done.add(run.run_id)
        if bad:
            self.bad.add(run.run_id)

    def _announce_wait(self, run: PlannedRun, holder: str) -> None:
        if run.run_id not in self.announced:
            self.announced.add(run.run_id)
            tqdm.write(f"run {run.run_id} ({run.label}) is being trained by {holder}; waiting for it")

    def _interrupted(self) -> None:
        if self.submitter.cancel_on_interrupt:
            for active in self.active.values():
                active.job.cancel(check=False)
        elif self.active:
            ids = ", ".join(str(a.job.job_id) for a in self.active.values())
            print(f"interrupted; {len(self.active)} {self.submitter.kind} jobs keep running ({ids}); run the same "
                  f"command again to collect their results")


# -- status ----------------------------------------------------------------------------------------------------
@dataclass
class RunState:
    run_id: str
    state: str  # done, failed, running, interrupted, submitted, pending
    label: str
    detail: str = ""


def run_state(store: RunStore, run_id: str, label: str = "") -> RunState:
    """What a run is doing, across executors: its result, a live lock, a checkpoint, a submitted job."""
    result = store.result(run_id)
    if result is not None:
        return RunState(run_id, result.get("status", "?"), label or result.get("label", ""),
                        result.get("reason", "") or "")
    lock = store.lock(run_id)
    job = store.job(run_id)
    if lock.is_held_live():
        where = f"{job['executor']} job {job['job_id']}, " if job else ""
        return RunState(run_id, "running", label, f"{where}{lock.describe()}")
    checkpoint = store.checkpoint_path(run_id)
    if checkpoint.exists():
        epochs = sum(1 for row in store.metrics(run_id) if row.get("stage") != "init")  # not init-stage rows
        return RunState(run_id, "interrupted", label, f"resumes after epoch {epochs}")
    if job:
        return RunState(run_id, "submitted", label, f"{job['executor']} job {job['job_id']}")
    return RunState(run_id, "pending", label)


def run_states(store: RunStore, plan: Optional[Plan] = None) -> list[RunState]:
    """Every run of ``plan`` (in plan order), or every run the store knows."""
    if plan is not None:
        return [run_state(store, run.run_id, run.label) for run in plan.ordered()]
    return [run_state(store, run_id) for run_id in store.run_ids()]


def print_status(store: RunStore, plan: Optional[Plan] = None, verbose: bool = False) -> None:
    """``repro status``: one line per run with ``verbose``, then the counts per state."""
    states = run_states(store, plan)
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
        if verbose or s.state in ("running", "interrupted", "submitted"):
            print(f"{s.run_id}  {s.state:11s} {s.label}{f'  ({s.detail})' if s.detail else ''}")
    order = ("pending", "submitted", "running", "interrupted", "done", "failed")
    parts = [f"{counts.pop(k)} {k}" for k in order if k in counts] + [f"{n} {k}" for k, n in sorted(counts.items())]
    print(", ".join(parts) or f"no runs in {store.root}")
