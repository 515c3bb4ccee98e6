"""The CUDA paths, on a CPU-only machine: resume, per-rank RNG states, one GPU per task, Slurm device resolution,
determinism and TF32 (issue 17, items 1-6).

No GPU is needed: ``torch.cuda`` is replaced by a fake with per-device RNG states, the meta device stands in for
a GPU's memory, and process groups are faked where a collective would run.
"""
from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repro.train import distributed
from repro.cli import main
from repro.train.distributed import Parallel, ScaleOptions, map_batch
from repro.core.errors import ReproError
from repro.methods.base import LOSS_TERMS, LossTerm
from repro.harness.spec import Recipe, load_spec
from repro.harness.store import RunStore
from repro.train.loop import Trainer, configure_numerics
from tests.conftest import TINY_SPEC

QUIET = ["--no-progress", "--no-estimate"]


# -- a fake torch.cuda ---------------------------------------------------------------------------------------------
class FakeCuda:
    """The RNG side of ``torch.cuda`` for ``count`` visible devices, each with its own generator state."""

    def __init__(self, count: int, base: int = 0) -> None:
        self.states = [torch.full((8,), base + i, dtype=torch.uint8) for i in range(count)]
        self.current = 0

    def _index(self, device: Any = "cuda") -> int:
        if isinstance(device, int):
            index = device
        else:
            device = torch.device(device)
            index = self.current if device.index is None else device.index
        if not 0 <= index < len(self.states):
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        return index

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "FakeCuda":
        for name in ("is_available", "device_count", "current_device", "get_rng_state", "set_rng_state",
                     "get_rng_state_all", "set_rng_state_all", "set_device"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        return self

    def is_available(self) -> bool:
        return bool(self.states)

    def device_count(self) -> int:
        return len(self.states)

    def current_device(self) -> int:
        return self.current

    def set_device(self, device: Any) -> None:
        self.current = self._index(device)

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device: Any = "cuda") -> None:
        if state.dtype != torch.uint8 or state.device.type != "cpu":  # what torch.cuda.set_rng_state demands
            raise TypeError("RNG state must be a torch.ByteTensor")
        self.states[self._index(device)] = state.clone()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [s.clone() for s in self.states]

    def set_rng_state_all(self, states: list[torch.Tensor]) -> None:
        for index, state in enumerate(states):
            self.set_rng_state(state, index)


def _bare_trainer(root: Path, device: torch.device, par: Parallel = Parallel(),
                  on: Optional[torch.device] = None) -> Trainer:
    """A Trainer holding just what checkpointing touches; ``on``: where its tensors live (default the CPU)."""
    trainer = Trainer.__new__(Trainer)
    torch.manual_seed(0)
    student = nn.Linear(4, 3).to(on or "cpu")
    optimizer = torch.optim.Adam(student.parameters(), lr=0.1)
    trainer.__dict__.update(store=RunStore(root), run_id="run", device=device, par=par, student=student,
                            distiller=SimpleNamespace(terms=nn.ModuleDict()), optimizer=optimizer,
                            scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1), mapping=map_batch(8, 1),
                            deviations=[], kernels=[])
    return trainer


def _train_one_step(trainer: Trainer) -> None:
    trainer.student(torch.randn(2, 4)).sum().backward()
    trainer.optimizer.step()


# -- 1. resume on CUDA -----------------------------------------------------------------------------------------
def test_resume_on_cuda_restores_the_rng_as_a_cpu_bytetensor_and_keeps_adam_steps_on_the_cpu(tmp_path,
                                                                                              monkeypatch):
    saver = _bare_trainer(tmp_path, torch.device("cpu"))
    _train_one_step(saver)
    saver.kernels.append("non-deterministic kernel ran: some_kernel")  # seen before the kill
    saver._save_checkpoint(1, {"top1": 1.0, "epoch": 1}, [{"epoch": 1}])
    saved_rng = torch.get_rng_state()
    torch.rand(100)  # move the generator on

    real_load = torch.load

    def load_as_cuda_would(path: Any, map_location: Any = None, **kwargs: Any) -> Any:
        """torch.load that puts every tensor on the map_location device; meta stands in for the GPU."""
        state = real_load(path, map_location="cpu", **kwargs)
        if map_location is not None and torch.device(map_location).type != "cpu":
            state = _map_tensors(state, lambda t: t.to("meta"))
        return state

    monkeypatch.setattr(torch, "load", load_as_cuda_would)
    # The resumed run's model and optimizer live on the "GPU" (meta); its device is cuda.
    resumed = _bare_trainer(tmp_path, torch.device("cuda", 0), on=torch.device("meta"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta parameters is a no-op, and torch says so
        epoch, best, history = resumed._load_checkpoint()
    assert epoch == 1 and history == [{"epoch": 1}]
    state = torch.get_rng_state()
    assert state.dtype == torch.uint8 and state.device.type == "cpu" and torch.equal(state, saved_rng)
    for param_state in resumed.optimizer.state.values():
        assert param_state["step"].device.type == "cpu"  # Adam (not capturable, not fused) keeps it there
        assert param_state["exp_avg"].device.type == "meta"  # moments go with their parameters
    assert any("without CUDA RNG states" in d for d in resumed.deviations)
    assert resumed.kernels == ["non-deterministic kernel ran: some_kernel"]  # the result still lists it


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


# -- 2. per-rank CUDA RNG states -----------------------------------------------------------------------------
def _rank_state(seed: int, cuda: torch.Tensor) -> dict[str, Any]:
    return {"python": random.Random(seed).getstate(), "numpy": np.random.RandomState(seed).get_state(),
            "torch": torch.Generator().manual_seed(seed).get_state(), "cuda": cuda}


@pytest.fixture
def two_rank_checkpoint(tmp_path):
    """A checkpoint saved by rank 0 of a 2-process run on a 2-GPU node: rank 1's states come through a faked
    all_gather. Returns (root, rank 0's states, rank 1's states)."""
    with pytest.MonkeyPatch.context() as monkeypatch:  # undone before the test resumes in its own process
        return _save_on_two_ranks(tmp_path, monkeypatch)


def _save_on_two_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict, dict]:
    node = FakeCuda(2, base=10).install(monkeypatch)  # rank 0's process sees both GPUs
    rank1 = _rank_state(1, torch.full((8,), 77, dtype=torch.uint8))  # rank 1 moved its own GPU's generator

    def all_gather_object(box: list[Any], obj: Any, group: Any = None) -> None:
        box[0], box[1] = obj, rank1

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    monkeypatch.setattr(torch.distributed, "gather_object",
                        lambda obj, box=None, dst=0, group=None: all_gather_object(box, obj))
    saver = _bare_trainer(tmp_path, torch.device("cuda", 0), Parallel(rank=0, local_rank=0, world_size=2))
    random.seed(5)
    rank0 = {"python": random.getstate(), "cuda": node.get_rng_state(0)}
    saver._save_checkpoint(1, {"top1": 1.0, "epoch": 1}, [{"epoch": 1}])
    return tmp_path, rank0, rank1


def _resume(root: Path, monkeypatch: pytest.MonkeyPatch, gpus: int, rank: int, world: int) -> tuple[FakeCuda, Trainer]:
    cuda = FakeCuda(gpus, base=100).install(monkeypatch)
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda path, map_location=None, **kw: real_load(path, map_location="cpu", **kw))
    device = torch.device("cuda", rank if rank < gpus else 0)
    trainer = _bare_trainer(root, device, Parallel(rank=rank, local_rank=rank, world_size=world))
    trainer._load_checkpoint()
    return cuda, trainer


def test_each_rank_gets_its_own_cuda_rng_state_back(two_rank_checkpoint, monkeypatch):
    root, rank0, rank1 = two_rank_checkpoint
    cuda, _ = _resume(root, monkeypatch, gpus=2, rank=1, world=2)
    assert torch.equal(cuda.states[1], rank1["cuda"])  # its own GPU's state, not rank 0's view of that GPU
    assert random.getstate() == rank1["python"]


def test_a_run_saved_on_two_gpus_resumes_in_a_one_gpu_job(two_rank_checkpoint, monkeypatch):
    root, rank0, _ = two_rank_checkpoint
    cuda, trainer = _resume(root, monkeypatch, gpus=1, rank=0, world=1)
    assert torch.equal(cuda.states[0], rank0["cuda"]) and random.getstate() == rank0["python"]
    assert trainer.deviations == []  # exact: rank 0 of the new run is rank 0 of the old


def test_a_rank_without_saved_state_takes_rank_0s_and_the_result_says_so(two_rank_checkpoint, monkeypatch):
    root, rank0, _ = two_rank_checkpoint
    cuda, trainer = _resume(root, monkeypatch, gpus=3, rank=2, world=3)
    assert torch.equal(cuda.states[2], rank0["cuda"])
    assert any("checkpoint of 2: rank 2 had no saved RNG state and took rank 0's" in d for d in trainer.deviations)


# -- 3. one GPU per task ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("visible, local_rank, expected", [(4, 1, 1), (1, 3, 0), (2, 1, 1)])
def test_each_process_takes_a_gpu_it_can_see(monkeypatch, visible, local_rank, expected):
    FakeCuda(visible).install(monkeypatch)
    par = Parallel(rank=local_rank, local_rank=local_rank, world_size=4)
    assert distributed.device_for_rank(torch.device("cuda"), par) == torch.device("cuda", expected)


def test_a_task_that_cannot_tell_its_gpu_is_one_clear_error(monkeypatch):
    FakeCuda(2).install(monkeypatch)
    with pytest.raises(ReproError, match="local rank 3 sees 2 GPUs"):
        distributed.device_for_rank(torch.device("cuda"), Parallel(rank=3, local_rank=3, world_size=4))


def test_joining_the_process_group_selects_the_visible_gpu(monkeypatch):
    cuda = FakeCuda(1).install(monkeypatch)
    cuda.current = None  # type: ignore[assignment]  # not chosen yet
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: None)
    distributed.init_from_env(quiet_workers=False)
    assert cuda.current == 0  # the task's only visible GPU, not the invalid ordinal 1


def test_a_slurm_job_resolves_its_device_on_its_node(monkeypatch, tmp_path):
    from repro.harness.executors import RunJob

    run = SimpleNamespace(run_id="r")
    FakeCuda(1).install(monkeypatch)  # a task bound to one GPU, rank 1 of 2
    monkeypatch.setattr(distributed, "current", lambda: Parallel(rank=1, local_rank=1, world_size=2))
    assert RunJob(str(tmp_path), run, "auto", ScaleOptions())._device() == torch.device("cuda", 0)
    assert RunJob(str(tmp_path), run, "cuda", ScaleOptions())._device() == torch.device("cuda", 0)
    FakeCuda(0).install(monkeypatch)  # a CPU node
    assert RunJob(str(tmp_path), run, "auto", ScaleOptions())._device() == torch.device("cpu")
    with pytest.raises(ReproError, match="sees no GPU"):
        RunJob(str(tmp_path), run, "cuda", ScaleOptions())._device()


# -- 4. Slurm driven from a login node without a GPU -----------------------------------------------------------
class _FakeJob:
    job_id = "1"

    def done(self) -> bool:
        return True

    def results(self) -> list[dict[str, str]]:
        return [{"status": "done"}]


@pytest.fixture
def slurm_jobs(monkeypatch):
    """The Slurm submitter replaced by one that records the jobs it is given (each 'finishes' at once)."""
    from repro.harness import executors

    jobs: list[Any] = []

    def make_submitter(args: Any, store: Any, device: Any) -> executors.Submitter:
        return executors.Submitter("slurm", lambda job, gpus: jobs.append(job) or _FakeJob(), None,
                                   cancel_on_interrupt=False)

    monkeypatch.setattr(executors, "make_submitter", make_submitter)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the login node
    return jobs


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_slurm_jobs_get_the_unresolved_device(workdirs, slurm_jobs, capsys, device):
    assert main(["run", TINY_SPEC, "--tier", "smoke", "--executor", "slurm", "--device", device,
                 "--no-progress"]) == 0
    assert slurm_jobs and {job.device_spec for job in slurm_jobs} == {device}
    assert "no time estimate: the runs execute on the Slurm nodes' devices" in capsys.readouterr().out


def _fill_throughput(store: RunStore, device_key: str, rate: float, monkeypatch) -> None:
    from repro.harness.cost import CostModel
    from repro.harness.plan import make_plan

    model = CostModel(store, torch.device("cpu"), device_key)
    monkeypatch.setattr(CostModel, "_measure", lambda self, *a, **k: rate)
    plan = make_plan(load_spec(TINY_SPEC), "smoke")
    for run in plan.ordered():
        model.estimate_seconds(plan, run)

    def no_measuring(self, *a, **k):
        raise AssertionError("the driver measured on its own device")

    monkeypatch.setattr(CostModel, "_measure", no_measuring)


def test_slurm_budget_is_checked_on_the_target_devices_throughput(workdirs, slurm_jobs, capsys, monkeypatch):
    store = RunStore(workdirs["runs"])
    _fill_throughput(store, "Fake GPU", 1.0, monkeypatch)  # 1 image/s: the tiny plan takes minutes there
    base = ["run", TINY_SPEC, "--tier", "smoke", "--executor", "slurm", "--no-progress"]
    assert main([*base, "--budget-hours", "1"]) == 2  # no target device named: refused, and why
    assert "--budget-hours needs an estimate" in capsys.readouterr().err
    assert main([*base, "--estimate-device", "Fake GPU", "--budget-hours", "0.001"]) == 2
    assert "on Fake GPU, over --budget-hours" in capsys.readouterr().err
    assert main([*base, "--estimate-device", "Other GPU", "--budget-hours", "1"]) == 2
    assert "measured on 'Other GPU'" in capsys.readouterr().out
    assert not slurm_jobs
    assert main([*base, "--estimate-device", "Fake GPU", "--budget-hours", "10"]) == 0
    assert "estimated time for pending runs on Fake GPU" in capsys.readouterr().out and slurm_jobs


# -- 5. determinism ------------------------------------------------------------------------------------------------
def test_the_command_line_sets_the_cublas_workspace_before_any_command(monkeypatch):
    from repro import cli

    seen = {}
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "specs", lambda args: seen.setdefault("env", os.environ.get(
        "CUBLAS_WORKSPACE_CONFIG")) and 0)
    main(["specs"])
    assert seen["env"] == ":4096:8"


def test_a_job_sets_the_cublas_workspace_before_it_trains(monkeypatch, tmp_path):
    import submitit

    from repro.harness import executors
    from repro.harness import execute as runner

    seen = {}
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: SimpleNamespace(num_tasks=1))
    monkeypatch.setattr(runner, "run_claimed",
                        lambda *a, **k: seen.setdefault("env", os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
    executors.RunJob(str(tmp_path), SimpleNamespace(run_id="r"), "cpu", ScaleOptions())()
    assert seen["env"] == ":4096:8"


def _recipe(**fields: Any) -> Recipe:
    base = load_spec(TINY_SPEC).recipe_for("smoke").model_dump()
    return Recipe.model_validate({**base, **fields})


def test_determinism_is_an_explicit_choice_and_every_switch_is_reset_per_run():
    assert _recipe().deterministic == "warn"  # the default: what `true` did
    assert _recipe(deterministic=True).deterministic == "warn" and _recipe(deterministic=False).deterministic == "off"
    cpu = torch.device("cpu")
    try:
        configure_numerics(_recipe(deterministic="strict"), cpu, 0)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        notes = configure_numerics(_recipe(deterministic="off"), cpu, 0)  # a later run of the same process
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
        assert any("deterministic algorithms off" in n for n in notes)
        configure_numerics(_recipe(deterministic="warn"), cpu, 0)
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


@LOSS_TERMS.register("test_unpool")
class Unpool(LossTerm):
    """A loss term that runs a kernel without a deterministic implementation on the CPU (max_unpool)."""

    needs_teacher = False

    def forward(self, out, batch):
        pooled, index = F.max_pool1d(out.logits.float().unsqueeze(1), 2, return_indices=True)
        return F.max_unpool1d(pooled, index, 2).mean() * 0


def test_every_non_deterministic_kernel_that_ran_is_a_deviation_in_the_result(workdirs, tmp_path):
    text = Path(TINY_SPEC).read_text().replace("Student: {losses: {ce: 1.0}}",
                                              "Student: {losses: {ce: 1.0, test_unpool: 1.0}}")
    spec = tmp_path / "unpool.yaml"
    spec.write_text(text)
    try:
        assert main(["run", str(spec), "--tier", "smoke", *QUIET]) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    store = RunStore(workdirs["runs"])
    results = [store.result(r) for r in store.run_ids()]
    student = next(r for r in results if " Student " in r["label"])
    assert student["status"] == "done"
    assert "non-deterministic kernel ran: max_unpooling2d_forward_out" in student["deviations"]
    others = [r for r in results if r is not student and r["kind"] == "train"]
    assert others and not any("non-deterministic" in d for r in others for d in r["deviations"])
    assert student["deterministic_algorithms"] == "warn"


# -- 6. TF32 -------------------------------------------------------------------------------------------------------
def test_tf32_switches_come_from_the_recipe_never_from_torchs_defaults():
    cpu = torch.device("cpu")
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = True  # torch's own default: "fp32" convolutions in TF32 on Ampere+
        configure_numerics(_recipe(), cpu, 0)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        configure_numerics(_recipe(tf32=True), cpu, 0)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("capability, tf32", [((8, 0), True), ((7, 0), None)])
def test_every_result_stamps_tf32_and_the_cuda_versions(monkeypatch, capability, tf32):
    from repro.core.env import environment

    on_cpu = environment(torch.device("cpu"))
    assert on_cpu["cuda_version"] is None and on_cpu["cudnn_version"] is None
    assert on_cpu["tf32_matmul"] is None and on_cpu["tf32_cudnn"] is None  # no TF32 on a CPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        on_gpu = environment(torch.device("cuda", 0))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert on_gpu["cuda_version"] == "12.4" and on_gpu["cudnn_version"] == 90100
    assert on_gpu["tf32_matmul"] is tf32 and on_gpu["tf32_cudnn"] is tf32  # Volta has no TF32 to run
    json.dumps(on_gpu)  # lands in result.json as it is
