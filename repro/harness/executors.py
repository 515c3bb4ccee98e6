"""Where runs execute: in this process (the default), as concurrent local jobs, or as Slurm jobs.

- ``--executor local`` (default) without ``--jobs``: on a CPU, independent runs side by side, one per core (never
  more than there are runs left to train), in worker processes of this machine; on a GPU (or with ``--nproc N``),
  one run at a time as below. ``$REPRO_JOBS`` stands in for a missing ``--jobs``.
- ``--jobs 1``: runs one after another in this process; ``--nproc N`` re-launches the command under torchrun so
  that each run trains on N processes (``repro.train.distributed``).
- ``--jobs N``: up to N runs at once on this machine: on a CPU in worker processes with their share of the cores
  (each process imports torch once and trains run after run), on GPUs (or with ``--nproc``) each run a submitit
  local job with its own device(s).
- ``--executor slurm``: each run a Slurm job submitted through submitit (partition, GPUs, CPUs, time limit,
  account from the command line or a YAML config file). A job that is preempted or reaches its time limit is
  requeued by submitit and resumes from the run's last checkpoint; a job that dies without a word (node failure,
  SIGKILL) is resubmitted by the driver a few times, and resumes the same way.

The driver (``JobScheduler``) submits a run once its dependencies are done, so dependants wait for their teachers;
its bookkeeping is ``repro.harness.execute.RunStates``, the same state machine the in-process loop drives. Every job claims
its run's lock before training (``repro.harness.execute.run_claimed``): several drivers, or a driver and a plain
``repro run``, on the same store never train a run twice.
"""
# Longer than ~400 lines on purpose: the executors share one scheduler over RunStates; the worker pool (about 120 lines) is the part to split next.
from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import time
import concurrent.futures
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import submitit
import yaml
from submitit.core.utils import UncompletedJobError

from repro.core.errors import ReproError

if TYPE_CHECKING:  # the command line imports this module for its flags: torch and the trainer load on use
    import torch

    from repro.train.distributed import ScaleOptions
    from repro.harness.plan import Plan, PlannedRun
    from repro.harness.execute import ExecutionSummary, RunStates
    from repro.harness.store import RunStore

SLURM_CONFIG_ENV = "REPRO_SLURM_CONFIG"
JOBS_ENV = "REPRO_JOBS"  # --jobs when the flag is not given
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
                       help=f"runs at once (default ${JOBS_ENV}, else: on a CPU one per core, on a GPU 1; "
                            f"slurm: every run that is ready); 1: one after another in this process")
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
    from repro.train.distributed import ScaleOptions

    return ScaleOptions(bn=getattr(args, "bn", "sync"), max_device_batch=getattr(args, "max_device_batch", None),
                        rescale_batch=getattr(args, "rescale_batch", False))


def requested_jobs(args: argparse.Namespace) -> Optional[int]:
    """``--jobs``, else ``$REPRO_JOBS``, else None (the default: ``default_jobs``)."""
    jobs = getattr(args, "jobs", None)
    if jobs is None and os.environ.get(JOBS_ENV, "").strip():
        text = os.environ[JOBS_ENV].strip()
        if not text.isdigit():
            raise ReproError(f"${JOBS_ENV} must be a number of runs at once, got {text!r}")
        jobs = int(text)
    if jobs is not None and jobs < 1:
        raise ReproError(f"--jobs must be at least 1, got {jobs}")
    return jobs


def default_jobs(device: Optional[torch.device], unfinished: int, nproc: int = 1) -> int:
    """Runs side by side when none is asked for. On a CPU: one per core (each with one torch thread; more threads
    per process were measured slower than more processes), never more than the runs left to train. On a GPU: one
    at a time, as before (``--jobs N`` gives N runs their own devices); likewise with ``--nproc`` (a run already
    spans N processes) and inside a torchrun launch."""
    if device is None or device.type != "cpu" or nproc > 1 or "RANK" in os.environ:
        return 1
    return max(1, min(os.cpu_count() or 1, unfinished))


def _uses_torchrun(args: argparse.Namespace) -> bool:
    return getattr(args, "executor", "local") == "local" and (requested_jobs(args) or 1) == 1


def prepare(args: argparse.Namespace, argv: Sequence[str]) -> Optional[int]:
    """Call first in ``main``. With ``--nproc N > 1`` in this process, re-launch the command on N processes and
    return its exit code; inside such a launch, join the process group and return None."""
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        raise ReproError(f"--nproc must be at least 1, got {nproc}")
    requested_jobs(args)  # a bad --jobs / $REPRO_JOBS is refused before anything starts
    if nproc == 1 and "RANK" not in os.environ:
        return None  # neither launching nor launched: no need to load torch here
    from repro.train import distributed

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
    """``repro run``'s execution: in this process (group), in worker processes, or through the chosen executor's
    jobs (``--jobs``, ``default_jobs``); says which, and the summary says how many runs ran at once.

    ``device``: this machine's resolved ``--device`` (None when the runs execute elsewhere). Jobs get the
    unresolved ``--device`` and resolve it themselves: ``auto`` on a GPU node is its GPU, whatever the driver has.
    """
    from repro.harness.execute import RunStates, execute

    options = scale_options(args)
    progress = not getattr(args, "no_progress", False)
    retry = getattr(args, "retry_failed", False)
    jobs = requested_jobs(args)
    if jobs is None and not runs_elsewhere(args):
        jobs = default_jobs(device, RunStates(plan.ordered(), store, retry).unfinished(), getattr(args, "nproc", 1))
    if getattr(args, "executor", "local") == "local" and jobs == 1:
        assert device is not None
        return execute(plan, store, device, progress=progress, retry_failed=retry, options=options)
    submitter = make_submitter(argparse.Namespace(**{**vars(args), "jobs": jobs}), store, device)
    if submitter.kind == "workers":
        print(f"running up to {submitter.slots} runs side by side in worker processes ({submitter.threads} torch "
              f"thread(s) each); --jobs 1 (make JOBS=1): one at a time in this process")
    return JobScheduler(plan, store, submitter, options, device_spec=getattr(args, "device", "auto"),
                        retry_failed=retry, progress=progress).run()


# -- the job -------------------------------------------------------------------------------------------------
class RunJob(submitit.helpers.Checkpointable):
    """One run as a submitit job. Preempted or timed out, submitit calls ``checkpoint`` and requeues the same job:
    the trainer's own epoch checkpoint is the state, so the requeued job simply claims the run again and resumes."""

    def __init__(self, store_root: str, run: PlannedRun, device_spec: str, options: ScaleOptions,
                 threads: Optional[int] = None, retry_failed: bool = False, workers: Optional[int] = None) -> None:
        self.store_root, self.run, self.device_spec = store_root, run, device_spec
        self.options, self.threads, self.retry_failed, self.workers = options, threads, retry_failed, workers

    def __call__(self) -> dict[str, Any]:
        from repro.core.numerics import set_cublas_workspace

        set_cublas_workspace()  # before this job's first CUDA call
        import torch

        from repro.train import distributed
        from repro.harness.execute import run_claimed
        from repro.harness.store import RunStore

        if _job_tasks() > 1:  # one task per process of the run
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            distributed.init_from_env(want_cuda=self.device_spec != "cpu", quiet_workers=False)
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            status = run_claimed(self.run, RunStore(Path(self.store_root)), self._device(), progress=False,
                                 options=self.options, retry_failed=self.retry_failed, workers=self.workers)
            return {"status": status}
        except ReproError as err:  # bad input: reported by the driver, which then stops submitting
            return {"status": "error", "message": str(err)}
        finally:
            distributed.shutdown()

    def _device(self) -> torch.device:
        """The job's own device, resolved here (on the node that runs it) from the unresolved ``--device``."""
        import torch

        from repro.train import distributed

        if self.device_spec.startswith("cuda") and not torch.cuda.is_available():
            raise ReproError(f"run {self.run.run_id}: its job sees no GPU (ask for some with --slurm-gpus)")
        device = distributed.resolve_device(self.device_spec)
        if device.type != "cuda":
            return device
        # The job sees only the devices it was given, all of them or (one task per GPU) just its own.
        return distributed.visible_cuda_device(distributed.current().local_rank)


def _job_tasks() -> int:
    """Processes of this run: its submitit job's tasks; 1 in a worker process of this machine (no submitit job)."""
    try:
        return submitit.JobEnvironment().num_tasks
    except RuntimeError:  # not inside a submitit job
        return 1


# -- submitting ------------------------------------------------------------------------------------------------
@dataclass
class Submitter:
    """Makes one job per run: ``submit(job, gpu_ids)``; ``kind``: workers, local or slurm; ``slots``: runs at
    once; ``gpus``: devices to share out (empty: the executor's own business, or CPU)."""

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
    use_cuda = device is not None and device.type == "cuda"
    if not use_cuda and nproc == 1:
        return worker_submitter(args.jobs or 1)
    return local_submitter(folder, jobs=args.jobs or 1, nproc=nproc, use_cuda=use_cuda)


def worker_submitter(jobs: int) -> Submitter:
    """Up to ``jobs`` runs at once in worker processes of this machine (CPU), the cores shared out between them.

    A worker imports torch once and trains run after run (a submitit job per run would pay that, seconds of CPU,
    for every run). Workers are spawned, never forked: a fork after torch's OpenMP pool has run hangs the child."""
    threads = max(1, (os.cpu_count() or 1) // jobs)

    def submit(job: RunJob, gpu_ids: list[int]) -> Any:
        return _WorkerJob(_worker_pool(jobs).submit(job))

    return Submitter("workers", submit, jobs, threads=threads)


_POOL: dict[str, Any] = {}


def _worker_pool(jobs: int) -> ProcessPoolExecutor:
    """The worker processes of this command, shared by its plans (``repro table`` runs several). A worker copies
    the environment and working folder it was started in, so a change of either (tests, or library use that
    calls ``repro.cli.main`` more than once) gets fresh workers; so does a request for more of them."""
    key = (tuple(sorted(os.environ.items())), os.getcwd())
    pool = _POOL.get("pool")
    if pool is None or _POOL["key"] != key or _POOL["size"] < jobs:
        if pool is not None:
            pool.shutdown(wait=True)
        size = max(jobs, os.cpu_count() or 1)  # processes start on demand: only as many as run at once
        pool = ProcessPoolExecutor(size, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_exit_with_driver, initargs=(os.getpid(),))
        _POOL.update(pool=pool, key=key, size=size)
    return pool


def _exit_with_driver(driver_pid: int) -> None:
    """In each worker: end with the driver, as an in-process run would. A killed driver's workers would otherwise
    finish their runs and wait forever; ending mid-run leaves a checkpoint and a lock whose holder is dead, so the
    next command resumes the run."""
    import threading

    def watch() -> None:
        while os.getppid() == driver_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-driver", daemon=True).start()


class _WorkerJob:
    """A worker process's run, as the scheduler sees a job."""

    job_id = "worker"

    def __init__(self, future: Future) -> None:
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def results(self) -> list[Any]:
        return [self.future.result()]

    def cancel(self, check: bool = False) -> None:
        self.future.cancel()  # a run in progress stops with the Ctrl-C its worker received too


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
    """Submits every pending run of a plan as a job once its dependencies are done, and collects the outcomes;
    ``RunStates`` keeps the books (which runs are ready, waited for, done, failed, blocked)."""

    def __init__(self, plan: Plan, store: RunStore, submitter: Submitter, options: ScaleOptions,
                 device_spec: str = "cpu", retry_failed: bool = False, progress: bool = True,
                 poll_s: float = 1.0) -> None:
        from repro.harness.execute import PlanProgress, RunStates

        self.plan, self.store, self.submitter, self.options = plan, store, submitter, options
        self.device_spec, self.poll_s = device_spec, poll_s
        desc = f"{plan.spec.id} [{plan.tier}] ({submitter.kind})"
        self.states: RunStates = RunStates(plan.ordered(), store, retry_failed,
                                           PlanProgress(desc, len(plan.runs), progress))
        self.active: dict[str, _Active] = {}
        self.free_gpus = list(submitter.gpus)
        self.errors: list[str] = []
        self.most_at_once = 0

    def run(self) -> ExecutionSummary:
        try:
            while self.states.pending:
                self._collect()
                if not self.errors:
                    self._submit_ready()
                elif not self.active:
                    break
                if self.states.pending:
                    self._wait()
        except KeyboardInterrupt:
            self._interrupted()
            raise
        finally:
            self.states.close()
        if self.errors:
            raise ReproError(self.errors[0])
        summary = self.states.summary
        summary.workers = self.most_at_once
        return summary

    def _wait(self) -> None:
        """Until a job may have ended, at most ``poll_s``. Worker jobs are futures of this process: waiting on them
        returns the moment one ends (a smoke run lasts 1-4 s, so a fixed 1 s poll left a core idle ~20% of the
        time); submitit and Slurm jobs, and runs locked by other processes, are polled."""
        futures = [active.job.future for active in self.active.values() if isinstance(active.job, _WorkerJob)]
        if futures and len(futures) == len(self.active):
            concurrent.futures.wait(futures, timeout=self.poll_s, return_when=concurrent.futures.FIRST_COMPLETED)
        else:
            time.sleep(self.poll_s)

    # -- submitting ----------------------------------------------------------------------------------------------
    def _submit_ready(self) -> None:
        for run in self.states.ready():
            lock = self.store.lock(run.run_id)
            holder = lock.describe() if lock.is_held_live() else self._queued_elsewhere(run)
            if holder:
                self.states.wait_for(run, holder)
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
        here = self.submitter.kind != "slurm"  # a Slurm job's node runs it alone, as far as this driver knows
        job = self.submitter.submit(RunJob(str(self.store.root), run, self.device_spec, self.options,
                                           self.submitter.threads, retry_failed=run.run_id in self.states.retry,
                                           workers=self.submitter.slots if here else None), gpus)
        if self.submitter.kind != "workers":  # a worker process leaves nothing to find again; a job has its folder
            self.store.write_job(run.run_id, {"executor": self.submitter.kind, "job_id": str(job.job_id),
                                              "submitted_at": time.time(), "driver": socket.gethostname()})
        self.states.start(run)
        self.active[run.run_id] = _Active(run, job, gpus, resubmits)
        self.most_at_once = max(self.most_at_once, len(self.active))

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
                    self.states.say(f"job for run {run_id} ended without a result; resubmitting (resumes from "
                                    f"checkpoint)")
                    self._submit(active.run, active.resubmits + 1)
                    continue
                outcome = {"status": "error", "message": f"run {run_id}: its job died {MAX_RESUBMITS + 1} times "
                                                         f"without a result; see {self.store.root / '.jobs'}"}
            except Exception as err:  # noqa: BLE001 - a crash inside the job: report it, stop submitting
                lines = str(err).strip().splitlines() or [type(err).__name__]
                outcome = {"status": "error", "message": f"run {run_id} ({active.run.label}) crashed in its job: "
                                                         f"{lines[-1]}"}
            self._record(active.run, outcome)

    def _record(self, run: PlannedRun, outcome: dict[str, Any]) -> None:
        status = outcome.get("status")
        if status in ("done", "cached", "failed", "busy"):
            self.states.record(run, status)
        else:  # bad input or a crash: reported, and nothing more is submitted
            self.states.record(run, "busy")  # not settled: it has no result
            self.errors.append(outcome.get("message", f"run {run.run_id}: job error"))

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
