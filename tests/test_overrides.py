"""``--set KEY=VALUE``: exactly the addressed value changes, and with it exactly the run ids it reaches; the
override is recorded in result.json and stamped on the table; a bad override exits 2 with one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from repro.cli import main
from repro.harness.compare import compare_plan
from repro.harness.overrides import parse_override
from repro.harness.plan import plan_spec
from repro.harness.render.tables import render_output
from repro.harness.spec import load_spec
from repro.harness.store import RunStore
from tests.conftest import TESTS, TINY_SPEC

pytestmark = pytest.mark.usefixtures("one_thread")

WTTM_GAMMA = "cells[resnet14->resnet8/WTTM].params.wttm.gamma=0.3"
QUIET = ["--no-progress", "--no-estimate", "--device", "cpu"]


def _diff(a, b, path=""):
    """Every path where two plain structures differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


@pytest.mark.parametrize("text, changed, value", [
    (WTTM_GAMMA, ".cells[3].params.wttm.gamma", 0.3),
    ("cells[3].params.wttm.gamma=0.3", ".cells[3].params.wttm.gamma", 0.3),
    ("cells[*/KD].params.kd.temperature=2", ".cells[2].params.kd", {"temperature": 2}),
    ("methods.KD.losses.kd.temperature=2", ".methods.KD.losses.kd.temperature", 2),
    ("tiers.smoke.epochs=2", ".tiers.smoke.epochs", 2),
    ("recipe.schedule.milestones=[1, 2]", ".recipe.schedule.milestones", [1, 2]),
])
def test_override_changes_exactly_the_addressed_value(text, changed, value):
    base = load_spec(TINY_SPEC).model_dump()
    overridden = load_spec(TINY_SPEC, overrides=[parse_override(text)]).model_dump()
    assert _diff(base, overridden) == [changed]
    node = overridden
    for part in changed.strip(".").replace("[", ".").replace("]", "").split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    assert node == value


def test_a_bare_weight_term_takes_parameters():
    spec = load_spec(TINY_SPEC, overrides=[parse_override("methods.Student.losses.ce.label_smoothing=0.1")])
    assert spec.methods["Student"].losses["ce"].model_dump() == {"weight": 1.0, "label_smoothing": 0.1}


def test_override_moves_exactly_the_run_ids_it_reaches():
    base = plan_spec(TINY_SPEC, "smoke")
    plan = plan_spec(TINY_SPEC, "smoke", overrides=[WTTM_GAMMA, "cells[*/KD].params.kd.temperature=2"])
    moved = {c.cell.method: (b.run_ids, c.run_ids) for b, c in zip(base.cells, plan.cells) if b.run_ids != c.run_ids}
    assert sorted(moved) == ["KD", "WTTM"]
    assert plan.runs[plan.cells[3].run_ids[0]].overrides == [WTTM_GAMMA]  # leave-one-out: not the KD override
    assert plan.runs[plan.cells[2].run_ids[0]].overrides == ["cells[*/KD].params.kd.temperature=2"]
    assert plan.runs[plan.cells[1].run_ids[0]].overrides == []
    assert plan.runs[plan.cells[3].run_ids[0]].config["losses"]["wttm"]["gamma"] == 0.3


def test_override_reaching_no_run_is_said(capsys, workdirs):
    assert main(["plan", TINY_SPEC, "--tier", "smoke", "--no-estimate", "--set", "recipe.epochs=100"]) == 0
    out = capsys.readouterr().out
    assert "changes no run at tier smoke" in out and "tiers.smoke.epochs" in out


@pytest.mark.parametrize("text, message", [
    ("recipe.epochz=3", "unknown key 'epochz'"),
    ("recipe.epochs=-1", "recipe.epochs"),
    ("cells[resnet14->resnet8/WTTM].params.wttm.gamma=-1", "gamma = -1"),
    ("cells[resnet14->resnet8/WTTM].params.wttm.gammma=1", "gammma"),
    ("cells[nope/WTTM].params.wttm.gamma=1", "no cell matches [nope/WTTM]"),
    ("cells[17].seeds=2", "cells has 5 entries"),
    ("methods.KDD.losses.kd.weight=1", "no method 'KDD'"),
    ("recipe.epochs", "expected KEY=VALUE"),
    ("recipe.epochs=[1", "not YAML"),
    ("recipe.optimizer.name=adamm", "adamm"),
])
def test_bad_override_exits_2_with_one_line(text, message, capsys, workdirs):
    before = Path(TINY_SPEC).read_bytes()
    code = main(["plan", TINY_SPEC, "--tier", "smoke", "--no-estimate", "--set", text])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert Path(TINY_SPEC).read_bytes() == before  # the spec file is never written


def test_cell_index_is_refused_on_an_output_of_several_specs(capsys, workdirs):
    code = main(["report", "wttm-cifar100", "--tier", "smoke", "--set", "cells[0].seeds=2"])
    err = capsys.readouterr().err
    assert code == 2 and "ambiguous" in err


def test_override_is_stamped_on_the_table(workdirs):
    store = RunStore(workdirs["runs"])
    plan = plan_spec(TINY_SPEC, "smoke", overrides=[WTTM_GAMMA])
    md, _ = render_output("test-tiny", "smoke", [(plan, compare_plan(plan, store))], workdirs["tables"], "test")
    text = md.read_text()
    assert f"--set {WTTM_GAMMA}" in text and "set on the command line" in text
    base = plan_spec(TINY_SPEC, "smoke")
    md, _ = render_output("test-tiny", "smoke", [(base, compare_plan(base, store))], workdirs["tables"], "test")
    assert "--set" not in md.read_text()


def test_overridden_run_records_its_override(workdirs):
    spec = str(TESTS / "specs" / "tiny_ddp.yaml")
    assert main(["run", spec, "--tier", "smoke", *QUIET, "--log", "none", "--set", "tiers.smoke.epochs=1"]) == 0
    plan = plan_spec(spec, "smoke", overrides=["tiers.smoke.epochs=1"])
    (run_id,) = plan.runs
    assert run_id not in plan_spec(spec, "smoke").runs
    result = json.loads((workdirs["runs"] / run_id / "result.json").read_text())
    assert result["overrides"] == ["tiers.smoke.epochs=1"] and result["epochs"] == 1
    store = RunStore(workdirs["runs"])
    md, _ = render_output("test-ddp", "smoke", [(plan, compare_plan(plan, store))], workdirs["tables"], "test")
    assert "`--set tiers.smoke.epochs=1`" in md.read_text()


def test_api_plan_records_overrides_like_the_cli():
    from repro import api

    planned = api.plan(api.load_spec(TINY_SPEC, overrides=[WTTM_GAMMA]), "smoke")
    direct = plan_spec(TINY_SPEC, "smoke", overrides=[WTTM_GAMMA])
    assert list(planned.runs) == list(direct.runs)
    assert [r.overrides for r in planned.ordered()] == [r.overrides for r in direct.ordered()]


def test_cell_override_on_an_output_of_several_specs_reaches_the_specs_holding_the_cell(workdirs):
    from repro import api
    from repro.core.errors import ReproError

    text = "cells[resnet56->resnet20/WTTM].params.wttm.gamma=0.2"
    plans = api.output_plans("wttm-cifar100", "smoke", overrides=[text])
    reached = [p.spec.id for p in plans if p.overrides]
    holding = [p.spec.id for p in plans if any(c.teacher == "resnet56" and c.student == "resnet20"
                                               and c.method == "WTTM" for c in p.spec.cells)]
    assert reached == holding and reached
    with pytest.raises(ReproError, match="matches no cell"):
        api.output_plans("wttm-cifar100", "smoke", overrides=["cells[resnet56->resnet20/NOPE].seeds=2"])
