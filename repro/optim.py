"""Optimizers and learning-rate schedules by name (registries, so recipes stay data)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler

from repro.registry import Registry
from repro.spec import OptimizerConfig, ScheduleConfig

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


@OPTIMIZERS.register("adamw")
def _adamw(modules: Iterable[nn.Module], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    # DeiT (timm create_optimizer): no weight decay on biases, norms and the model's no_weight_decay() set.
    from timm.optim import param_groups_weight_decay

    groups = []
    for module in modules:
        skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else set()
        groups += param_groups_weight_decay(module, cfg.weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=lr, eps=cfg.eps, weight_decay=cfg.weight_decay)


@SCHEDULES.register("multistep")
def _multistep(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int) -> Scheduler:
    # Official `adjust_learning_rate`: at 1-based epoch e, lr = base * gamma^#(milestones < e), so epoch 151 is
    # the first at base/10. We step with t = e - 1 and timm counts bisect_right(decay_t, t + 1) = #(decay_t <= e),
    # hence decay_t = milestone + 1 (tests/test_schedule.py pins this against the official formula).
    return MultiStepLRScheduler(optimizer, decay_t=[m + 1 for m in cfg.milestones], decay_rate=cfg.gamma,
                                warmup_t=cfg.warmup_epochs, warmup_lr_init=cfg.warmup_lr, t_in_epochs=True)


@SCHEDULES.register("cosine")
def _cosine(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int) -> Scheduler:
    return CosineLRScheduler(optimizer, t_initial=epochs, lr_min=cfg.min_lr, warmup_t=cfg.warmup_epochs,
                             warmup_lr_init=cfg.warmup_lr, t_in_epochs=True)
