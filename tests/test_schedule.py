"""The lr schedule equals the official `adjust_learning_rate` (wttm.md 2.1, pitfall 8)."""
import torch

from repro.optim import SCHEDULES
from repro.spec import ScheduleConfig


def official_lr(epoch: int, base: float = 0.05, milestones=(150, 180, 210), rate: float = 0.1) -> float:
    steps = sum(epoch > m for m in milestones)  # epochs numbered from 1, decay once epoch > milestone
    return base * rate**steps


def test_multistep_matches_official_for_every_epoch():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    sched = SCHEDULES.get("multistep")(opt, ScheduleConfig(milestones=[150, 180, 210]), 240)
    for epoch in range(1, 241):
        sched.step(epoch - 1)
        assert abs(opt.param_groups[0]["lr"] - official_lr(epoch)) < 1e-12, epoch
    sched.step(150)
    assert abs(opt.param_groups[0]["lr"] - 0.005) < 1e-12  # epoch 151 is the first at base/10


def test_cosine_warms_up_then_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = SCHEDULES.get("cosine")(opt, ScheduleConfig(name="cosine", warmup_epochs=5, warmup_lr=1e-6,
                                                        min_lr=1e-5), 300)
    lrs = []
    for t in range(300):
        sched.step(t)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 1e-6 and max(lrs) <= 1e-3 + 1e-12 and lrs[-1] < 2e-5
    assert all(a <= b for a, b in zip(lrs[:5], lrs[1:6]))
