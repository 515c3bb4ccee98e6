"""Host reads in the hot loops: an epoch of training and an evaluation read the device a constant number of times,
whatever the number of steps (on a GPU every read waits for the whole queue; small CIFAR models are launch-bound).

A CPU has no queue to wait for, so the tests count the Python-level reads of tensors (``item``, ``float()``,
``bool()``, ``tolist``, ...) that would each be a device synchronisation on a GPU.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import torch
import torch.nn as nn

from repro.train import distributed
from repro.losses.crd import sample_contrast_indices
from repro.models import create_model
from repro.harness.plan import make_plan
from repro.harness.spec import load_spec
from repro.methods.attention_readings import AttentionCapture
from repro.harness.store import RunStore
from repro.train.loop import Resolved, Trainer, evaluate
from tests.conftest import TINY_SPEC
from tests.support import non_finite_term

READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def counting_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    counts = {name: 0 for name in READS}
    with monkeypatch.context() as patch:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(self: torch.Tensor, *args: Any, _name: str = name, _original: Any = original,
                        **kwargs: Any) -> Any:
                counts[_name] += 1
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        yield counts


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def _trainer(workdirs: dict, batch_size: int, losses: dict) -> Trainer:
    plan = make_plan(load_spec(TINY_SPEC), "smoke")
    run = next(r for r in plan.ordered() if r.config["kind"] == "train" and r.config["teacher"]
               and "kd" in r.config["losses"])
    config = copy.deepcopy(run.config)
    config["recipe"]["batch_size"] = batch_size
    config["losses"] = losses
    config["recipe"]["teacher_cache"] = False  # a cold cache writes what it computes: see the cache's own test
    teacher_cfg = plan.runs[config["teacher"]["run"]].config["model"]
    torch.manual_seed(5)
    teacher = create_model(teacher_cfg["arch"], num_classes=teacher_cfg["num_classes"]).eval()
    trainer = Trainer(config, RunStore(workdirs["runs"]), "test-run", torch.device("cpu"),
                      Resolved(teacher=teacher, teacher_key="t"), progress=False)
    trainer._build()
    trainer.train_step = distributed.wrap_train_step(trainer.distiller, trainer.par, trainer.device,
                                                     trainer.options)
    return trainer


def _reads_per_epoch(monkeypatch: pytest.MonkeyPatch, trainer: Trainer) -> tuple[int, int, int]:
    """(train reads, eval reads, steps) of epoch 1."""
    trainer.scheduler.step(0)
    with counting_reads(monkeypatch) as train_counts:
        trainer._train_epoch(1, _NoBar())
    with counting_reads(monkeypatch) as eval_counts:
        evaluate(trainer.student, trainer.test_loader)
    return sum(train_counts.values()), sum(eval_counts.values()), len(trainer.train_loader)


@pytest.mark.parametrize("losses", [{"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4}},
                                    {"ce": {"weight": 1.0}, "wttm": {"weight": 2.0, "gamma": 0.2}}])
def test_an_epoch_reads_the_device_a_constant_number_of_times(workdirs, monkeypatch, losses):
    few = _reads_per_epoch(monkeypatch, _trainer(workdirs, 16, losses))
    many = _reads_per_epoch(monkeypatch, _trainer(workdirs, 4, losses))
    assert many[2] == 4 * few[2] >= 8  # four times the steps (and the evaluation batches)
    assert many[0] == few[0] <= 2, (few, many)  # the epoch's sums: one read (plus none per step)
    assert many[1] == few[1] <= 2, (few, many)  # the evaluation counts: one read


def test_a_non_finite_step_is_still_reported_with_its_epoch_step_and_values(workdirs, monkeypatch):
    from repro.methods.base import LOSS_TERMS
    from repro.train.loop import RunFailed

    monkeypatch.setitem(LOSS_TERMS._entries, "test_inf_at_step_3", non_finite_term(at_step=3, value=float("inf")))
    trainer = _trainer(workdirs, 4, {"ce": {"weight": 1.0}, "test_inf_at_step_3": {"weight": 1.0}})
    trainer.scheduler.step(0)
    with pytest.raises(RunFailed) as failure:
        trainer._train_epoch(2, _NoBar())
    assert failure.value.details["epoch"] == 2 and failure.value.details["step"] == 3
    values = failure.value.details["losses"]
    assert values["test_inf_at_step_3"] == float("inf") and 0 < values["ce"] < 100
    assert "non-finite loss at epoch 2, step 3" in failure.value.reason


def test_crd_draws_without_reading_the_device_when_class_sizes_decide(monkeypatch):
    labels = torch.arange(40) % 4  # 10 per class: 30 negatives for every sample
    indices = torch.tensor([0, 5, 10, 15])
    for k, sizes in ((16, (10, 10)), (35, (10, 10))):  # all rows without / all rows with replacement
        expected = sample_contrast_indices(labels, indices, k, generator=torch.Generator().manual_seed(0))
        with counting_reads(monkeypatch) as counts:
            drawn = sample_contrast_indices(labels, indices, k, generator=torch.Generator().manual_seed(0),
                                            class_sizes=sizes)
        assert sum(counts.values()) == 0 and torch.equal(drawn, expected)


def test_attention_hooks_build_no_index_tensor_per_forward(monkeypatch):
    vit = create_model("vit_smoke_tiny_distilled", num_classes=5)  # a dist token: the hook drops it too
    capture = AttentionCapture(vit, layer=-1, heads=[0, 2])
    x = torch.randn(2, 3, 32, 32)
    vit.eval()
    with torch.no_grad():
        vit(x)
        first = capture.pop()
        made = []
        original = torch.tensor
        monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or original(*a, **k))
        vit(x)
        assert torch.equal(capture.pop(), first) and not made


def test_a_warm_teacher_cache_reads_nothing_from_the_device(tmp_path):
    """The warm pass runs with every device tensor on the ``meta`` device, where any read-back raises: lookups
    must use the batch's host copies of indices and views, and move only logits to the device."""
    from repro.data import ImageTensorDataset
    from repro.data.loader import TensorLoader
    from repro.data.teacher_cache import TeacherCache, cached_teacher_fn

    generator = torch.Generator().manual_seed(0)
    data = ImageTensorDataset(images=torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=generator),
                              labels=torch.arange(12) % 3, num_classes=3, name="tiny", fingerprint="d")
    stats = ((0.5,) * 3, (0.2,) * 3)
    cache = TeacherCache.open(tmp_path, teacher_key="t", data_fingerprint="d", normalization=stats,
                              num_images=12, num_classes=3)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)).eval()
    fill = cached_teacher_fn(cache, teacher, "cpu")
    for batch in TensorLoader(data, 4, *stats, train=True, augment=True, seed=0, device="cpu"):
        fill(batch, False, False)  # cold: every view computed and stored
    warm = cached_teacher_fn(cache, teacher.to("meta"), "meta")
    for batch in TensorLoader(data, 4, *stats, train=True, augment=True, seed=0, device="meta"):
        logits, _ = warm(batch, False, False)
        assert logits.device.type == "meta" and logits.shape == (4, 3)
    assert warm.hits == 12 and warm.misses == 0
