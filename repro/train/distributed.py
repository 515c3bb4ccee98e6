"""One run on several processes: torchrun + DistributedDataParallel, with the paper's single-device recipe kept.

A recipe fixes the GLOBAL batch. With ``world_size`` processes each process takes a contiguous slice of every
global batch (the slices' union is the single-process batch, in the same order), optionally split again into
``grad_accum_steps`` micro-batches. Each slice's loss is scaled by ``slice_size * world_size / global_size``
so that DDP's gradient average equals the gradient of the mean loss over the global batch, whatever the split.
BatchNorm statistics are those of the global batch by default (torch's ``SyncBatchNorm`` on CUDA, the same
computation over gloo on CPU: ``GlobalBatchNorm``), so a multi-process run computes what the single-device recipe
computes, up to float reduction order.

``repro run ... --nproc N`` re-launches the command line under torch's elastic launcher (what ``torchrun`` runs;
``torchrun --nproc-per-node N -m repro run ...`` works too); every rank then executes the plan, rank 0 decides which
run comes next and is the only one that writes.
"""
# Longer than ~400 lines on purpose: the whole multi-process contract (torchrun re-launch, process group, rank-0 writes, global-batch checks) read as one.
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from repro.data.batch import rank_bounds
from repro.core.errors import ReproError

# Environment variables torchrun (and submitit's TorchDistributedEnvironment) set for every worker.
_WORLD_ENV = "WORLD_SIZE"
_BN_MODES = ("sync", "per-device")


# -- the process group -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parallel:
    """Where this process sits in the run's process group (a single process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current() -> Parallel:
    """The initialised process group's view of this process, or the single-process default."""
    if not (dist.is_available() and dist.is_initialized()):
        return Parallel()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Parallel(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size())


def is_main_process() -> bool:
    return current().is_main


def launched_by_torchrun() -> bool:
    """Inside a worker started by torchrun / the elastic launcher / a multi-task submitit job."""
    return int(os.environ.get(_WORLD_ENV, "1")) > 1 and "RANK" in os.environ


def init_from_env(want_cuda: bool = True, quiet_workers: bool = True) -> Parallel:
    """Join the process group described by torchrun's environment (no-op outside one).

    NCCL when the run uses CUDA, gloo otherwise (so multi-process runs work and are tested on CPU). Workers other
    than rank 0 get a silent stdout: plans, summaries and progress bars are printed once.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return current()
    use_cuda = want_cuda and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(visible_cuda_device(int(os.environ.get("LOCAL_RANK", "0"))))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    atexit.register(shutdown)
    par = current()
    if quiet_workers and not par.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the worker
    return par


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(spec: str) -> torch.device:
    """``--device`` as this process sees it: ``auto`` is CUDA when a GPU is visible here, else the CPU.

    Resolved where the run executes (a Slurm job resolves its own, never the login node that submitted it)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ReproError(f"--device {spec!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ReproError(f"--device {spec}: CUDA is not available on this machine")
    return device


def visible_cuda_device(local_rank: int) -> torch.device:
    """This process's GPU among the visible ones: ``cuda:<local rank>`` when the node shows every task all its
    GPUs, ``cuda:0`` when it shows each task only its own (Slurm's per-task binding, CUDA_VISIBLE_DEVICES)."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return torch.device("cuda", local_rank)
    if count == 1:
        return torch.device("cuda", 0)
    if count == 0:
        raise ReproError(f"process with local rank {local_rank} sees no GPU")
    raise ReproError(f"process with local rank {local_rank} sees {count} GPUs, neither all of the node's nor only "
                     f"its own: cannot tell which is its own (give each task one GPU, or all of them)")


def device_for_rank(device: torch.device, par: Optional[Parallel] = None) -> torch.device:
    """One device per process: ``cuda`` becomes this rank's visible GPU inside a process group."""
    par = par or current()
    if device.type == "cuda" and par.distributed:
        return visible_cuda_device(par.local_rank)
    return device


def gather_object(obj: Any, par: Optional[Parallel] = None) -> Optional[list[Any]]:
    """Every rank's ``obj``, by rank, on rank 0 (None on the others); ``[obj]`` on one process."""
    par = par or current()
    if not par.distributed:
        return [obj]
    box: list[Any] = [None] * par.world_size
    dist.all_gather_object(box, obj)  # all_gather: supported by NCCL and gloo alike (the states are small)
    return box if par.is_main else None


def broadcast_object(obj: Any, par: Optional[Parallel] = None) -> Any:
    """Rank 0's ``obj`` on every rank (identity on one process)."""
    par = par or current()
    if not par.distributed:
        return obj
    box = [obj if par.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks (in place; the identity on one process)."""
    if current().distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (keeps decisions such as 'this run failed' in step)."""
    if not current().distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


# -- the batch mapping -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleOptions:
    """How a run is spread over its processes; chosen on the command line, never part of a run's identity."""

    bn: str = "sync"  # "sync": BatchNorm over the global batch; "per-device": each process's own slice
    max_device_batch: Optional[int] = None  # cap on one process's micro-batch (gradient accumulation above it)
    rescale_batch: bool = False  # allow a world size that cannot keep the global batch (stamped as a deviation)

    def __post_init__(self) -> None:
        if self.bn not in _BN_MODES:
            raise ReproError(f"--bn must be one of {', '.join(_BN_MODES)}, got {self.bn!r}")
        if self.max_device_batch is not None and self.max_device_batch < 1:
            raise ReproError(f"--max-device-batch must be positive, got {self.max_device_batch}")


@dataclass(frozen=True)
class BatchMapping:
    """The recipe's global batch on ``world_size`` processes, as recorded in every result."""

    world_size: int
    global_batch: int  # what is trained with (the recipe's, unless rescaled)
    per_device_batch: int  # one process's micro-batch
    grad_accum_steps: int
    recipe_batch: int  # the recipe's global batch

    @property
    def rescaled(self) -> bool:
        return self.global_batch != self.recipe_batch

    def fields(self) -> dict[str, int]:
        return {"world_size": self.world_size, "global_batch": self.global_batch,
                "per_device_batch": self.per_device_batch, "grad_accum_steps": self.grad_accum_steps}


def map_batch(recipe_batch: int, world_size: int, options: ScaleOptions = ScaleOptions()) -> BatchMapping:
    """Per-device batch and gradient accumulation that keep the recipe's global batch on ``world_size`` processes.

    Refuses (ReproError) a world size that does not divide the global batch, unless ``rescale_batch``: then the
    global batch becomes the nearest multiple that does (the caller scales the lr and stamps the deviation).
    """
    if world_size < 1:
        raise ReproError(f"--nproc must be at least 1, got {world_size}")
    global_batch = recipe_batch
    if recipe_batch % world_size:
        if not options.rescale_batch:
            raise ReproError(
                f"the recipe's global batch {recipe_batch} cannot be split evenly over {world_size} processes; "
                f"use a process count that divides it ({', '.join(map(str, _divisors(recipe_batch)[:8]))}, ...) "
                f"or pass --rescale-batch to train with another global batch (stamped as a deviation)")
        global_batch = max(1, round(recipe_batch / world_size)) * world_size
    per_rank = global_batch // world_size
    cap = options.max_device_batch or per_rank
    accum = next(a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= cap)
    return BatchMapping(world_size, global_batch, per_rank // accum, accum, recipe_batch)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tail(loader: Any, mapping: BatchMapping) -> None:
    """The epoch's last global batch (``loader.global_batch_size``) must still give every process at least one
    image per micro-batch: an empty slice has no mean loss, and SyncBatchNorm needs every process in every
    forward. (A loader that drops its last, partial batch never has such a tail.)"""
    if len(loader) == 0:
        return
    tail = loader.global_batch_size(len(loader) - 1)
    need = mapping.world_size * mapping.grad_accum_steps
    if tail < need:
        raise ReproError(f"the epoch's last batch holds {tail} of {loader.epoch_size()} images, fewer than the "
                         f"{mapping.world_size} processes x {mapping.grad_accum_steps} micro-steps; choose another "
                         f"--nproc or --max-device-batch")


def split_batch(batch: Any, parts: int) -> list[Any]:
    """A batch dataclass cut into ``parts`` consecutive micro-batches (every per-image tensor is cut alike)."""
    if parts == 1:
        return [batch]
    count = int(batch.labels.shape[0])
    pieces = []
    for part in range(parts):
        start, stop = rank_bounds(count, part, parts)
        cut = {f.name: getattr(batch, f.name)[start:stop] for f in dataclasses.fields(batch)
               if isinstance(getattr(batch, f.name), torch.Tensor) and getattr(batch, f.name).dim() > 0
               and getattr(batch, f.name).shape[0] == count}
        pieces.append(dataclasses.replace(batch, **cut))
    return pieces


def shard_loader(loader: Any, par: Parallel, what: str) -> tuple[Any, bool]:
    """This rank's view of a loader: ``(loader, sharded)``. Loaders that can split each batch across ranks have
    ``shard(rank, world_size)``; others are refused for training (``what`` names the pipeline in the error)."""
    if not par.distributed:
        return loader, False
    if hasattr(loader, "shard") and hasattr(loader, "global_batch_size"):
        return loader.shard(par.rank, par.world_size), True
    raise ReproError(f"data pipeline {what!r} cannot split its batches across processes yet; run it with --nproc 1")


# -- models ----------------------------------------------------------------------------------------------------
def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on any backend.

    torch's SyncBatchNorm (used on CUDA) refuses CPU tensors; this is the same computation for gloo: the per-rank
    channel sums and counts are all-reduced (then the centred squares, two passes for accuracy) through the
    differentiable ``_SumOverRanks``, so the backward pass sums the statistics' gradients over ranks exactly as a
    single process holding the whole batch would. Evaluation, and a single process, use plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        all_reduce = _SumOverRanks.apply
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        count = torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=x.dtype, device=x.device)
        totals = all_reduce(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._track(mean.detach(), var.detach(), float(n.detach()))
        return out.to(input.dtype)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """Running statistics as ``nn.BatchNorm`` keeps them (unbiased variance, momentum or cumulative mean)."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer of ``module`` as a ``GlobalBatchNorm`` sharing its parameters and buffers."""
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_global_batchnorm(child))
    return converted


def prepare_model(model: nn.Module, par: Parallel, options: ScaleOptions, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch for multi-process runs, unless per-device statistics were asked for:
    torch's SyncBatchNorm on CUDA, ``GlobalBatchNorm`` elsewhere. Parameters and buffers keep their names, so
    checkpoints load at any world size."""
    if not (par.distributed and options.bn == "sync"):
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert_global_batchnorm(model)


class TrainStep(nn.Module):
    """Puts the distiller's training forward behind ``forward`` so DDP sees (and syncs) student and loss terms."""

    def __init__(self, distiller: nn.Module) -> None:
        super().__init__()
        self.distiller = distiller

    def forward(self, batch: Any) -> Any:
        return self.distiller.forward_train(batch)


def wrap_train_step(distiller: nn.Module, par: Parallel, device: torch.device, options: ScaleOptions) -> nn.Module:
    """``TrainStep`` in DDP on several processes (plain on one). Loss terms with parameters may sit out some
    epochs (warm-ups, early stops), hence ``find_unused_parameters`` when they have any."""
    step = TrainStep(distiller)
    if not par.distributed:
        return step
    from torch.nn.parallel import DistributedDataParallel

    term_params = any(p.requires_grad for p in distiller.terms.parameters())
    # With global-batch BatchNorm every rank already holds the same running statistics; per-device BN keeps
    # rank 0's (so that evaluation, which each rank does on its share of the test set, sees one model).
    sync_buffers = options.bn == "per-device"
    buffer_flag = "forward_sync_buffers" if "forward_sync_buffers" in _ddp_parameters() else "broadcast_buffers"
    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=term_params, **{buffer_flag: sync_buffers})


def _ddp_parameters() -> set[str]:
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    return set(inspect.signature(DistributedDataParallel).parameters)


def stateful_terms(terms: nn.Module) -> list[str]:
    """Loss terms holding persistent buffers updated from the batch (CRD's memory bank): under DDP each process
    updates them from its own slice only, which the results must say."""
    names = []
    for name, term in terms.items():
        persistent = {k for k, _ in term.named_buffers() if _is_persistent(term, k)}
        if persistent:
            names.append(name)
    return names


def _is_persistent(module: nn.Module, dotted: str) -> bool:
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    return leaf not in module._non_persistent_buffers_set


# -- launching ---------------------------------------------------------------------------------------------------
def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--nproc 2`` and ``--nproc=2`` forms)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``python -m repro <argv>`` on ``nproc`` local processes under torch's elastic launcher (torchrun's
    engine, standalone rendezvous on a free local port) and return the exit code: 0, or the failing rank's."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ReproError(f"--nproc must be at least 1, got {nproc}")
    # torchrun's own default: without it each process would start one thread per core and they would fight.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"repro-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
                          start_method="spawn")
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)  # a failing worker prints its own one-line error
    try:
        elastic_launch(config, sys.executable)("-m", "repro", *argv)
        return 0
    except ChildFailedError as err:
        failures = err.failures
        first = failures.get(0) or failures[min(failures)]
        return int(first.exitcode) if first.exitcode and first.exitcode > 0 else 1
    except SignalException:  # Ctrl-C / SIGTERM: the agent has stopped the workers (each said so)
        return 130
    finally:
        elastic_log.setLevel(level)
