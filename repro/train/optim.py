"""Optimizers and learning-rate schedules by name (registries, so recipes stay data).

Every schedule is a timm ``Scheduler``. The runner calls ``step(t)`` with the 0-based epoch ``t`` at the start of
each epoch and ``step_update(u)`` with the 0-based optimizer-step count ``u`` before each optimizer step; a
schedule reacts to the calls its stepping rule uses (timm's epoch schedules ignore ``step_update``).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, List, Optional

import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler

from repro.core.errors import ReproError
from repro.core.registry import Registry
from repro.train.config import OptimizerConfig, ScheduleConfig

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
SCHEDULES: Registry[Callable[..., Scheduler]] = Registry("lr schedule")


def effective_lr(cfg: OptimizerConfig, global_batch: int) -> float:
    """The base lr after the recipe's linear scaling rule (DeiT: lr * global_batch / 512)."""
    if cfg.lr_scale_base_batch:
        return cfg.lr * global_batch / cfg.lr_scale_base_batch
    return cfg.lr


@OPTIMIZERS.register("sgd")
def _sgd(modules: Iterable[nn.Module], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    # RepDistiller applies weight decay to every trainable parameter (BN and biases included).
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


def timm_param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """timm ``create_optimizer``'s parameter groups, module by module: no weight decay on 1-d parameters (biases,
    norm weights), on names ending in ``.bias`` and on the module's ``no_weight_decay()`` set (a ViT's pos/cls
    tokens)."""
    from timm.optim import param_groups_weight_decay

    groups = []
    for module in modules:
        skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else set()
        groups += param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip)
    return groups


@OPTIMIZERS.register("adamw")
def _adamw(modules: Iterable[nn.Module], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    # DeiT (timm create_optimizer): no weight decay on biases, norms and the model's no_weight_decay() set.
    return torch.optim.AdamW(timm_param_groups(modules, cfg.weight_decay), lr=lr, eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("timm_sgd")
def _timm_sgd(modules: Iterable[nn.Module], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    # DeiT main.py's `--opt sgd` through timm's own factory: torch SGD with timm's parameter groups; timm's "sgd"
    # is Nesterov by default, the spec's `nesterov` is passed explicitly so the config says what runs.
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(timm_param_groups(modules, cfg.weight_decay), opt="sgd", lr=lr,
                               weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov)


@SCHEDULES.register("multistep")
def _multistep(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> Scheduler:
    # Official `adjust_learning_rate`: at 1-based epoch e, lr = base * gamma^#(milestones < e), so epoch 151 is
    # the first at base/10. We step with t = e - 1 and timm counts bisect_right(decay_t, t + 1) = #(decay_t <= e),
    # hence decay_t = milestone + 1 (tests/test_schedule.py pins this against the official formula).
    return MultiStepLRScheduler(optimizer, decay_t=[m + 1 for m in cfg.milestones], decay_rate=cfg.gamma,
                                warmup_t=cfg.warmup_epochs, warmup_lr_init=cfg.warmup_lr, t_in_epochs=True)


@SCHEDULES.register("cosine")
def _cosine(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> Scheduler:
    # timm's cosine f(t) stepped at the start of 1-based epoch e with t = e - 1: epoch e runs at f(e - 1).
    return CosineLRScheduler(optimizer, t_initial=epochs, lr_min=cfg.min_lr, warmup_t=cfg.warmup_epochs,
                             warmup_lr_init=cfg.warmup_lr, t_in_epochs=True)


@SCHEDULES.register("cosine_per_step")
def _cosine_per_step(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int,
                     steps_per_epoch: int) -> Scheduler:
    # timm's cosine counted in optimizer steps (t_in_epochs=False: the runner's step_update(u) before step u sets
    # f(u); its epoch calls are ignored), so a run of a few dozen steps still anneals smoothly to min_lr instead
    # of jumping once per epoch; warm-up in epochs, converted to steps.
    return CosineLRScheduler(optimizer, t_initial=epochs * steps_per_epoch, lr_min=cfg.min_lr,
                             warmup_t=cfg.warmup_epochs * steps_per_epoch, warmup_lr_init=cfg.warmup_lr,
                             t_in_epochs=False)


class _SteppedAfterEpoch(CosineLRScheduler):
    """timm's cosine as a loop that calls ``step(epoch)`` after each 0-based epoch runs it (deit main.py): the
    first epoch runs at the value set at construction (f(0)), 0-based epoch k >= 1 at f(k - 1). Our runner steps
    at the start of each epoch with t = k, so the schedule answers with f(max(t - 1, 0))."""

    def step(self, epoch: int, metric: Optional[float] = None) -> None:
        super().step(max(epoch - 1, 0), metric)


@SCHEDULES.register("cosine_stepped_after_epoch")
def _cosine_after_epoch(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int,
                        steps_per_epoch: int) -> Scheduler:
    return _SteppedAfterEpoch(optimizer, t_initial=epochs, lr_min=cfg.min_lr, warmup_t=cfg.warmup_epochs,
                              warmup_lr_init=cfg.warmup_lr, t_in_epochs=True)


class IterWarmupCosine(Scheduler):
    """Linear warm-up over ``warmup_epochs`` updated every optimizer step, then cosine annealing updated every
    epoch from the end of the warm-up to the last epoch (mmengine's ``LinearLR(by_epoch, end=W,
    convert_to_iter_based)`` followed by ``CosineAnnealingLR(by_epoch, begin=W)``, whose ``end`` defaults to the
    last epoch):

    * optimizer step u < W * steps_per_epoch: lr = warmup_lr + (base - warmup_lr) * u / (W * steps_per_epoch - 1)
      (mmengine's LinearLR reaches its end factor on its last step: total_iters = end - begin - 1);
    * 0-based epoch k >= W: lr = min_lr + (base - min_lr) * (1 + cos(pi * (k - W) / (epochs - W))) / 2.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: int,
                 warmup_lr: float, min_lr: float) -> None:
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=True)
        if warmup_epochs >= epochs:
            raise ReproError(f"schedule: warmup_epochs {warmup_epochs} must be below the {epochs} epochs")
        self.epochs, self.warmup_epochs, self.min_lr = epochs, warmup_epochs, min_lr
        self.warmup_updates = warmup_epochs * steps_per_epoch
        self.warmup_lr = warmup_lr
        if self.warmup_updates:
            self.update_groups(self._warmup(0))

    def _warmup(self, update: int) -> List[float]:
        span = max(self.warmup_updates - 1, 1)
        return [self.warmup_lr + (base - self.warmup_lr) * update / span for base in self.base_values]

    def _get_lr(self, t: int) -> List[float]:
        progress = (t - self.warmup_epochs) / (self.epochs - self.warmup_epochs)
        return [self.min_lr + (base - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2
                for base in self.base_values]

    def step(self, epoch: int, metric: Optional[float] = None) -> None:
        if epoch >= self.warmup_epochs:
            self.update_groups(self._get_lr(epoch))

    def step_update(self, num_updates: int, metric: Optional[float] = None) -> None:
        if num_updates < self.warmup_updates:
            self.update_groups(self._warmup(num_updates))


@SCHEDULES.register("cosine_iter_warmup")
def _cosine_iter_warmup(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int,
                        steps_per_epoch: int) -> Scheduler:
    return IterWarmupCosine(optimizer, epochs, steps_per_epoch, cfg.warmup_epochs, cfg.warmup_lr, cfg.min_lr)
