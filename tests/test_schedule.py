"""The lr schedules equal the official ones: RepDistiller's `adjust_learning_rate` (wttm.md 2.1, pitfall 8), DeiT
main.py's timm cosine stepped after each epoch, and mmengine's per-iteration linear warm-up + per-epoch cosine
(cls_KD's imagenet_bs1024_adamw_swin.py), each written out here from its definition."""
import math
import pytest
import torch

from repro.train.optim import SCHEDULES
from repro.train.config import ScheduleConfig


def official_lr(epoch: int, base: float = 0.05, milestones=(150, 180, 210), rate: float = 0.1) -> float:
    steps = sum(epoch > m for m in milestones)  # epochs numbered from 1, decay once epoch > milestone
    return base * rate**steps


def test_multistep_matches_official_for_every_epoch():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    sched = SCHEDULES.get("multistep")(opt, ScheduleConfig(milestones=[150, 180, 210]), 240, 782)
    for epoch in range(1, 241):
        sched.step(epoch - 1)
        assert abs(opt.param_groups[0]["lr"] - official_lr(epoch)) < 1e-12, epoch
    sched.step(150)
    assert abs(opt.param_groups[0]["lr"] - 0.005) < 1e-12  # epoch 151 is the first at base/10


def test_cosine_warms_up_then_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = SCHEDULES.get("cosine")(opt, ScheduleConfig(name="cosine", warmup_epochs=5, warmup_lr=1e-6,
                                                        min_lr=1e-5), 300, 1251)
    lrs = []
    for t in range(300):
        sched.step(t)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 1e-6 and max(lrs) <= 1e-3 + 1e-12 and lrs[-1] < 2e-5
    assert all(a <= b for a, b in zip(lrs[:5], lrs[1:6]))


def _drive(name: str, cfg: ScheduleConfig, epochs: int, steps: int, base: float) -> list[list[float]]:
    """The lr of every optimizer step, called as repro.train.loop.Trainer calls a schedule: step(t) at the start of
    0-based epoch t, step_update(u) before the u-th optimizer step."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = SCHEDULES.get(name)(opt, cfg, epochs, steps)
    lrs = []
    for epoch in range(epochs):
        sched.step(epoch)
        row = []
        for step in range(steps):
            sched.step_update(epoch * steps + step)
            row.append(opt.param_groups[0]["lr"])
        lrs.append(row)
    return lrs


def timm_cosine(t: int, base: float, epochs: int, warmup: int, warmup_lr: float, min_lr: float) -> float:
    """timm (0.3.2, deit's pin) CosineLRScheduler._get_lr with t_in_epochs, one cycle, no warm-up prefix."""
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / epochs))


@pytest.mark.parametrize("warmup", [5, 0])
def test_deit_stepping_runs_epoch_k_at_f_of_k_minus_1(warmup):
    """deit main.py: the scheduler sets f(0) at construction and lr_scheduler.step(epoch) runs after each 0-based
    epoch, so epochs 0 and 1 both run at f(0) and epoch k >= 1 at f(k - 1)."""
    base, epochs = 1e-3, 30
    cfg = ScheduleConfig(name="cosine_stepped_after_epoch", warmup_epochs=warmup, warmup_lr=1e-6, min_lr=1e-5)
    lrs = _drive("cosine_stepped_after_epoch", cfg, epochs, 3, base)
    for k in range(epochs):
        official = timm_cosine(max(k - 1, 0), base, epochs, warmup, 1e-6, 1e-5)
        assert all(lr == pytest.approx(official, rel=1e-12, abs=0) for lr in lrs[k]), k
    assert lrs[0][0] == lrs[1][0]  # the two first epochs share the start value


@pytest.mark.parametrize("warmup", [0, 1])
def test_cosine_per_step_anneals_every_optimizer_step(warmup):
    """The smoke tier's schedule: the cosine formula above counted in optimizer steps (step u of a run of E epochs
    of S steps runs at f(u) with E * S steps in the cycle and warmup * S of linear warm-up); epoch calls move nothing."""
    base, epochs, steps = 0.1, 2, 10
    cfg = ScheduleConfig(name="cosine_per_step", warmup_epochs=warmup, warmup_lr=1e-4, min_lr=0.0)
    lrs = [lr for row in _drive("cosine_per_step", cfg, epochs, steps, base) for lr in row]
    for u, lr in enumerate(lrs):
        assert lr == pytest.approx(timm_cosine(u, base, epochs * steps, warmup * steps, 1e-4, 0.0), rel=1e-12), u
    assert len(set(lrs)) == len(lrs)  # a new lr every step, not once per epoch
    assert lrs[-1] < 0.01 * base


class _MMState:
    lr: float


class _MMLinear:
    """mmengine LinearParamScheduler (chained form), iter-based after convert_to_iter_based."""

    def __init__(self, state: _MMState, start: float, begin: int, end: int) -> None:
        self.state, self.start, self.begin, self.end = state, start, begin, end
        self.total = end - begin - 1
        self.global_step, self.last_step = -1, -1
        self.step()  # mmengine steps once at construction

    def step(self) -> None:
        self.global_step += 1
        if self.begin <= self.global_step < self.end:
            self.last_step += 1
            if self.last_step == 0:
                self.state.lr *= self.start
            else:
                slope = 1 - self.start
                self.state.lr *= 1 + slope / (self.total * self.start + (self.last_step - 1) * slope)


class _MMCosine:
    """mmengine CosineAnnealingParamScheduler (chained form), epoch-based; T_max = end - begin."""

    def __init__(self, state: _MMState, base: float, eta_min: float, begin: int, end: int) -> None:
        self.state, self.base, self.eta_min, self.begin, self.end = state, base, eta_min, begin, end
        self.t_max = end - begin
        self.global_step, self.last_step = -1, -1
        self.step()

    def step(self) -> None:
        self.global_step += 1
        if self.begin <= self.global_step < self.end:
            self.last_step += 1
            if self.last_step > 0:
                k, t = self.last_step, self.t_max
                self.state.lr = ((1 + math.cos(math.pi * k / t)) / (1 + math.cos(math.pi * (k - 1) / t))
                                 * (self.state.lr - self.eta_min) + self.eta_min)


def mmengine_lrs(base: float, start: float, warmup: int, epochs: int, steps: int, eta_min: float) -> list[list[float]]:
    """What cls_KD's schedule file does under mmengine's runner: LinearLR(start_factor, by_epoch, end=warmup,
    convert_to_iter_based) stepped after every iteration, CosineAnnealingLR(eta_min, by_epoch, begin=warmup, end
    defaulting to max_epochs) stepped after every epoch; the lr each iteration runs at."""
    state = _MMState()
    state.lr = base
    linear = _MMLinear(state, start, 0, warmup * steps)
    cosine = _MMCosine(state, base, eta_min, warmup, epochs)
    out = []
    for _ in range(epochs):
        row = []
        for _ in range(steps):
            row.append(state.lr)
            linear.step()  # ParamSchedulerHook.after_train_iter
        cosine.step()  # ParamSchedulerHook.after_train_epoch
        out.append(row)
    return out


@pytest.mark.parametrize("warmup,epochs,steps", [(20, 300, 4), (2, 30, 7), (3, 10, 1)])
def test_iter_warmup_cosine_equals_mmengines_schedule(warmup, epochs, steps):
    base = 5e-4 * 1024 / 512
    cfg = ScheduleConfig(name="cosine_iter_warmup", warmup_epochs=warmup, warmup_lr=base * 1e-3, min_lr=1e-5)
    ours = _drive("cosine_iter_warmup", cfg, epochs, steps, base)
    official = mmengine_lrs(base, 1e-3, warmup, epochs, steps, 1e-5)
    for epoch in range(epochs):
        assert ours[epoch] == pytest.approx(official[epoch], rel=1e-9, abs=1e-15), epoch
    assert ours[0][0] == pytest.approx(1e-6) and ours[warmup][0] == pytest.approx(base)
    assert ours[warmup - 1][-1] == pytest.approx(base)  # the warm-up reaches the base lr on its last iteration
    if steps > 1:
        assert ours[0][0] < ours[0][1]  # warm-up moves within an epoch


def test_trainer_steps_the_schedule_per_iteration(workdirs):
    """A real run: the lr logged at the end of each epoch (its last optimizer step) follows mmengine's schedule."""
    from repro.harness.plan import make_plan
    from repro.harness.spec import load_spec
    from repro.harness.store import RunStore
    from repro.train.loop import Resolved, train_run

    from conftest import TINY_SPEC

    plan = make_plan(load_spec(TINY_SPEC), "smoke")
    run = next(r for r in plan.ordered() if r.config["kind"] == "train" and r.config["teacher"] is None
               and r.config["losses"] == {"ce": {"weight": 1.0}} and "teacher" not in r.label)
    config = dict(run.config)
    config["recipe"] = {**config["recipe"], "epochs": 3,
                        "schedule": {**config["recipe"]["schedule"], "name": "cosine_iter_warmup",
                                     "warmup_epochs": 1, "warmup_lr": 1e-4, "min_lr": 1e-5}}
    store = RunStore(workdirs["runs"])
    result = train_run(config, store, "sched-test", torch.device("cpu"), Resolved(), progress=False)
    steps = 32 // 8  # the tiny spec: 4 classes x 8 images, batch 8
    base = config["recipe"]["optimizer"]["lr"]
    official = mmengine_lrs(base, 1e-4 / base, 1, 3, steps, 1e-5)
    logged = [row["lr"] for row in store.metrics("sched-test")]
    assert logged == pytest.approx([epoch[-1] for epoch in official], rel=1e-9)
    assert result["term_reports"] == {}
