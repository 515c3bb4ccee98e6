"""WTTM's beta rescale (Table 6 "WTTM w/o CE", our assumption): the term is multiplied by U_bar(g0) / U_bar(gamma),
both measured on the teacher, and the run records them in result.json."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn as nn

from repro.core.errors import ReproError
from repro.losses import wttm_loss
from repro.methods import TermContext
from repro.methods.base import Outputs
from repro.methods.wttm import WTTM
from test_figures import FixedTeacher  # a teacher whose logits are given: one definition for both tests




def _mean_u(logits: torch.Tensor, gamma: float) -> float:
    """U = sum_j p_j^gamma with p = softmax(v), written out from the definition (wttm.md 1.3)."""
    p = torch.softmax(logits.double(), dim=1)
    return float((p ** gamma).sum(dim=1).mean())


def _ctx(teacher_logits: torch.Tensor) -> TermContext:
    batches = [argparse.Namespace(images=torch.zeros(4, 3, 4, 4))] * 3
    return TermContext(student=nn.Identity(), teacher=FixedTeacher(teacher_logits), num_classes=10,
                       train_labels=torch.zeros(4, dtype=torch.long), device=torch.device("cpu"), epochs=1,
                       sample_batches=lambda n: iter(batches[:n]))


def test_rescale_multiplies_by_the_ratio_of_mean_u():
    torch.manual_seed(0)
    teacher_logits = torch.randn(4, 10) * 4
    term = WTTM(_ctx(teacher_logits), gamma=0.5, rescale_from_gamma=0.1)  # U in float32, as training uses it
    factor = _mean_u(teacher_logits, 0.1) / _mean_u(teacher_logits, 0.5)
    assert term.rescale_factor() == pytest.approx(factor, rel=1e-6) and factor > 1
    student = torch.randn(4, 10)
    out = Outputs(logits=student, teacher_logits=teacher_logits)
    assert float(term(out, None)) == pytest.approx(float(wttm_loss(student, teacher_logits, 0.5)) * factor, rel=1e-6)
    record = term.report()["rescale"]
    assert record["from_gamma"] == 0.1 and record["gamma"] == 0.5 and record["factor"] == pytest.approx(factor)
    assert record["mean_u_from_gamma"] == pytest.approx(_mean_u(teacher_logits, 0.1), rel=1e-6)
    assert "rescale_mean_u" in term.state_dict()  # a resumed run keeps the measured values
    plain = WTTM(_ctx(teacher_logits), gamma=0.5)
    assert plain.report() == {} and "rescale_mean_u" not in plain.state_dict()
    with pytest.raises(ReproError, match="rescale_from_gamma must be > 0"):
        WTTM(_ctx(teacher_logits), gamma=0.5, rescale_from_gamma=0)


def test_a_run_with_the_rescale_records_it_in_its_result(workdirs):
    from conftest import TINY_SPEC
    from repro.models import create_model
    from repro.harness.plan import make_plan
    from repro.harness.spec import load_spec
    from repro.harness.store import RunStore
    from repro.train.loop import Resolved, train_run

    plan = make_plan(load_spec(TINY_SPEC), "smoke")
    run = next(r for r in plan.ordered() if "wttm" in r.config["losses"])
    config = {**run.config, "losses": {"wttm": {"weight": 2.0, "gamma": 0.5, "rescale_from_gamma": 0.1}},
              "recipe": {**run.config["recipe"], "epochs": 1}}
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=config["model"]["num_classes"])
    result = train_run(config, RunStore(workdirs["runs"]), "rescale-test", torch.device("cpu"),
                       Resolved(teacher=teacher, teacher_key="test"), progress=False)
    rescale = result["term_reports"]["wttm"]["rescale"]
    assert rescale["factor"] == pytest.approx(rescale["mean_u_from_gamma"] / rescale["mean_u_gamma"])
    assert rescale["factor"] > 1  # U shrinks as gamma grows
