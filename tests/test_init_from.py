"""A cell initialised from another spec's run (``init_from``): planned as one DAG, part of the run id, loaded
through the runner's one weights path, and refused with one message when it names something wrong."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from repro.cli import main
from repro.harness.plan import make_plan
from repro.harness.spec import load_spec, spec_path
from repro.harness.store import RunStore
from tests.conftest import TINY_SPEC

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["--no-progress", "--no-estimate"]
SSTA_SOURCE = "spec: ssta/imagenet-main"


def finetuned_cells(plan):
    return [c for c in plan.cells if c.cell.init_from is not None]


def ssta_source_ids(tier: str, main_spec: str = "ssta/imagenet-main") -> dict[str, str]:
    """Student key -> run id of the main table's 'SSTA, TA DINO ViT-S/16' cells, as that spec plans them."""
    plan = make_plan(load_spec(main_spec), tier)
    return {c.cell.student: c.run_ids[0] for c in plan.cells if c.cell.method == "SSTA, TA DINO ViT-S/16"}


# ------------------------------------------------------------------------------------------- SSTA transfer

@pytest.mark.parametrize("tier", ["smoke", "full"])
def test_finetuned_rows_are_planned_from_the_ssta_runs(tier):
    plan = make_plan(load_spec("ssta/transfer"), tier)
    sources = ssta_source_ids(tier)
    order = list(plan.runs)
    cells = finetuned_cells(plan)
    assert len(cells) == 4 and all(c.method.reported_only is None for c in cells)
    for cell_runs in cells:
        run = plan.runs[cell_runs.run_ids[0]]
        source = sources[cell_runs.cell.student.split("@")[0]]
        assert run.config["init"] == {"run": source}  # the source id is part of the config, so of the run id
        assert source in run.deps and source in plan.runs and order.index(source) < order.index(run.run_id)
        # the source's own dependencies (teacher, TA) are in the same DAG, before it
        assert all(dep in plan.runs and order.index(dep) < order.index(source) for dep in plan.runs[source].deps)
        assert "pretrained" not in run.config["model"]["args"]  # the weights are the source run's, not timm's
        assert run.config["model"]["num_classes"] in (10, 100)
        assert run.config["recipe"]["data"]["name"] == f"cifar{run.config['model']['num_classes']}"


def test_seeds_of_a_finetuned_row_start_from_the_same_seeds_of_the_source():
    plan = make_plan(load_spec("ssta/transfer"), "smoke", seeds=2)
    main_plan = make_plan(load_spec("ssta/imagenet-main"), "smoke", seeds=2)
    source = next(c for c in main_plan.cells if c.cell.student == "deit_tiny_patch16_224"
                  and c.cell.method == "SSTA, TA DINO ViT-S/16").run_ids
    tiny = next(c for c in finetuned_cells(plan) if c.cell.student == "deit_tiny_patch16_224@cifar10")
    assert [plan.runs[r].config["init"]["run"] for r in tiny.run_ids] == source and len(set(source)) == 2


def _copies(tmp_path: Path, main_replace: tuple[str, str] = ("", "")) -> tuple[str, str]:
    """ssta/imagenet-main and ssta/transfer copied into tmp_path, the copy of transfer naming the copy of main by
    a path relative to itself."""
    main_text = spec_path("ssta/imagenet-main").read_text()
    if main_replace[0]:
        assert main_replace[0] in main_text
        main_text = main_text.replace(*main_replace)
    (tmp_path / "imagenet-main.yaml").write_text(main_text)
    transfer_text = spec_path("ssta/transfer").read_text()
    assert transfer_text.count(SSTA_SOURCE) == 4
    (tmp_path / "transfer.yaml").write_text(transfer_text.replace(SSTA_SOURCE, "spec: imagenet-main.yaml"))
    return str(tmp_path / "imagenet-main.yaml"), str(tmp_path / "transfer.yaml")


def _cell_ids(plan) -> dict[str, list[str]]:
    return {f"{c.cell.student} {c.cell.method}": c.run_ids for c in plan.cells}


@pytest.mark.parametrize("tier", ["smoke", "full"])
def test_a_copy_of_the_source_spec_plans_the_same_ids(tmp_path, tier):
    # where the source spec lives is not part of any id: only its resolved run config is
    _, transfer = _copies(tmp_path)
    assert _cell_ids(make_plan(load_spec(transfer), tier)) == _cell_ids(make_plan(load_spec("ssta/transfer"), tier))


@pytest.mark.parametrize("change,tiers", [
    (("ssta_attn: {weight: 1.0, beta: 1.0, lam: 1.0, stop_epoch: 100",
      "ssta_attn: {weight: 1.0, beta: 0.5, lam: 1.0, stop_epoch: 100"), ("smoke", "full")),  # a loss weight
    (("seeds: 1\nmethods:", "seeds: 1\nrecipe: {epochs: 200}\nmethods:"), ("full",)),  # the source's epochs
])
def test_changing_the_source_run_moves_the_finetuned_ids_only(tmp_path, change, tiers):
    main_copy, transfer = _copies(tmp_path, change)
    for tier in tiers:
        before = make_plan(load_spec("ssta/transfer"), tier)
        after = make_plan(load_spec(transfer), tier)
        old_sources, new_sources = ssta_source_ids(tier), ssta_source_ids(tier, main_copy)
        assert set(old_sources.values()).isdisjoint(new_sources.values())  # the change reaches the source runs
        old, new = _cell_ids(before), _cell_ids(after)
        for cell_runs in after.cells:
            key = f"{cell_runs.cell.student} {cell_runs.cell.method}"
            if cell_runs.cell.init_from is None:
                assert new[key] == old[key], key  # rows that do not start from the source keep their ids
            else:
                assert set(new[key]).isdisjoint(old[key]), key
                assert after.runs[new[key][0]].config["init"]["run"] in new_sources.values()


# ------------------------------------------------------------------------------------------- tiny specs

def target_spec(tmp_path: Path, init_from: str, student: str = "resnet8@c10", name: str = "target.yaml",
                extra_cells: str = "") -> str:
    """A CIFAR-10 fine-tuning spec whose one cell starts from a cell of another spec (by default tests/specs/tiny)."""
    path = tmp_path / name
    path.write_text(f"""base: wttm/_cifar100
id: test/{Path(name).stem}
paper: test
title: init_from test
table: Test table
output: test-init
num_classes: 10
tier_seeds: {{smoke: 1}}
tiers:
  smoke:
    data: {{synthetic: {{num_classes: 10, classes_used: 4, train_per_class: 8, test_per_class: 4, seed: 0}}}}
    epochs: 1
    batch_size: 8
models:
  resnet8@c10: {{arch: resnet8, num_classes: 10}}
  resnet14@c10: {{arch: resnet14, num_classes: 10}}
methods:
  FT:
    losses: {{ce: 1.0}}
    # lr ~ 0: the fine-tuned weights stay the source's, so the test can see where they came from
    recipe: {{data: {{name: cifar10}}, optimizer: {{lr: 1.0e-12}}}}
cells:
  - {{student: {student}, method: FT, init_from: {init_from}}}
{extra_cells}""")
    return str(path)


def tiny_source(cell: str = "{method: Student}") -> str:
    return f"{{spec: {TINY_SPEC}, cell: {cell}}}"


def test_finetuning_run_loads_the_source_runs_final_weights_with_a_new_head(tmp_path, workdirs, capsys):
    spec = target_spec(tmp_path, tiny_source())
    assert main(["run", spec, "--tier", "smoke", *QUIET]) == 0
    assert "2 trained" in capsys.readouterr().out  # the source run (tiny's Student cell) first, then this one
    plan = make_plan(load_spec(spec), "smoke")
    source_id, finetuned_id = list(plan.runs)
    store = RunStore(workdirs["runs"])
    result = store.result(finetuned_id)
    assert result["status"] == "done" and store.result(source_id)["status"] == "done"
    note = next(d for d in result["deviations"] if d.startswith(f"initialised from run {source_id}"))
    assert "left at initialisation: fc.weight, fc.bias" in note  # the 100-way classifier replaced by a 10-way one
    source = torch.load(store.model_path(source_id), weights_only=True)
    tuned = torch.load(store.model_path(finetuned_id), weights_only=True)
    assert source["fc.weight"].shape[0] == 100 and tuned["fc.weight"].shape[0] == 10
    convs = [k for k in tuned if k.endswith("conv1.weight")]
    assert convs and all(torch.allclose(tuned[k], source[k], atol=1e-6) for k in convs)


def cli_error(args: list[str], capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    return err


@pytest.mark.parametrize("init_from,student,message", [
    ("{spec: test/no-such-spec, cell: {method: Student}}", "resnet8@c10", "no spec 'test/no-such-spec'"),
    (tiny_source("{method: Stduent}"), "resnet8@c10", "no cell of spec test/tiny matches {method: Stduent}"),
    (tiny_source("{student: resnet8}"), "resnet8@c10", "cells of spec test/tiny match {student: resnet8}"),
    (tiny_source("{method: FitNet}"), "resnet8@c10", "is reported only; it has no run to start from"),
    (tiny_source(), "resnet14@c10", "trains 'resnet8' at tier 'smoke', but this cell's student is 'resnet14'"),
])
def test_bad_init_from_is_one_message_and_exit_2(tmp_path, workdirs, capsys, init_from, student, message):
    err = cli_error(["plan", target_spec(tmp_path, init_from, student), "--no-estimate"], capsys)
    assert message in err and "cells[0] (FT, " in err and "init_from" in err


def test_a_cycle_of_sources_is_refused(tmp_path, workdirs, capsys):
    # a -> b -> a, and a cell that starts from itself
    a = target_spec(tmp_path, "{spec: b.yaml, cell: {method: FT}}", name="a.yaml")
    target_spec(tmp_path, "{spec: a.yaml, cell: {method: FT}}", name="b.yaml")
    err = cli_error(["plan", a, "--no-estimate"], capsys)
    assert "cycle of init_from sources: test/a cells[0] -> test/b cells[0] -> test/a cells[0]" in err
    itself = target_spec(tmp_path, "{spec: self.yaml, cell: {method: FT}}", name="self.yaml")
    assert "cycle of init_from sources" in cli_error(["plan", itself, "--no-estimate"], capsys)


def test_a_chain_of_sources_is_planned_in_order(tmp_path, workdirs):
    # c starts from b's cell, which starts from tiny's Student cell: three runs, sources first
    b = target_spec(tmp_path, tiny_source(), name="b.yaml")
    c = target_spec(tmp_path, "{spec: b.yaml, cell: {method: FT}}", name="c.yaml")
    plan = make_plan(load_spec(c), "smoke")
    first, second, third = plan.ordered()
    assert second.config["init"]["run"] == first.run_id and third.config["init"]["run"] == second.run_id
    assert list(make_plan(load_spec(b), "smoke").runs) == [first.run_id, second.run_id]
