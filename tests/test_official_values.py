"""Spec values taken from the official code equal that code, and each cites its file (issue 11, section 1).

``tests/data/official_values.csv`` holds one row per (spec, tier, cell selector, field): the value the official
configuration sets, a string the spec's provenance must contain (``cite``: the official file, so the record says
where the value comes from) and the source in words. Fields are dotted paths into a planned run's config
(``losses.dkd.beta``, ``recipe.schedule.name``, ``model.arch``), into the cell's reported value
(``reported.protocol``), or ``runs`` (how many runs the cell plans at that tier). ``*`` selects every cell.
"""
from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from repro.harness.plan import Plan, make_plan
from repro.harness.spec import Spec, load_spec

TABLE = Path(__file__).parent / "data" / "official_values.csv"
ROWS = list(csv.DictReader(TABLE.open()))


@lru_cache(maxsize=None)
def _spec(spec_id: str) -> Spec:
    return load_spec(spec_id)


@lru_cache(maxsize=None)
def _plan(spec_id: str, tier: str) -> Plan:
    return make_plan(_spec(spec_id), tier)


def _dig(node: Any, path: str) -> Any:
    for key in path.split("."):
        node = node[key]
    return node


def _provenance_text(spec: Spec, cell_runs: Any) -> str:
    cell, method = cell_runs.cell, cell_runs.method
    parts = [p.note for p in cell.provenance.values()] + [p.note for p in spec.recipe_provenance.values()]
    parts += [method.note, cell.reported.source, cell.reported.note, *spec.notes]
    return " ".join(parts)


def _selected(row: dict[str, str]) -> list[Any]:
    plan = _plan(row["spec"], row["tier"])
    chosen = [c for c in plan.cells
              if all(row[k] in ("*", getattr(c.cell, k) or "") for k in ("teacher", "student", "method"))
              and c.run_ids]
    assert chosen, f"no planned cell matches {row}"
    return chosen


def _value(row: dict[str, str], cell_runs: Any) -> Any:
    field = row["field"]
    if field == "runs":
        return len(cell_runs.run_ids)
    if field.startswith("reported."):
        return getattr(cell_runs.cell.reported, field.split(".", 1)[1])
    config = _plan(row["spec"], row["tier"]).runs[cell_runs.run_ids[0]].config
    return _dig(config, field)


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['spec']}[{r['tier']}] {r['teacher']}->{r['student']} {r['method']} "
                                           f"{r['field']}" for r in ROWS])
def test_spec_value_equals_the_official_configuration(row):
    expected = yaml.safe_load(row["value"])
    spec = _spec(row["spec"])
    for cell_runs in _selected(row):
        got = _value(row, cell_runs)
        assert got == expected and type(got) is type(expected), (cell_runs.cell.student, got, row["source"])
        if row["cite"]:
            assert row["cite"] in _provenance_text(spec, cell_runs), (cell_runs.cell.student, row["source"])


def test_proxy_dkd_warmup_scales_like_the_milestones():
    """The proxy tier's rule, from its own numbers: every epoch count is round-half-up(x * proxy / full)."""
    spec = _spec("wttm/cifar100-table1")
    full, proxy = spec.recipe_for("full"), spec.recipe_for("proxy")

    def scaled(x: int) -> int:
        return int(x * proxy.epochs / full.epochs + 0.5)

    assert proxy.schedule.milestones == [scaled(m) for m in full.schedule.milestones]
    dkd_full = [_plan(spec.id, "full").runs[c.run_ids[0]].config["losses"]["dkd"]["warmup"]
                for c in _plan(spec.id, "full").cells if c.cell.method == "DKD"]
    dkd_proxy = [_plan(spec.id, "proxy").runs[c.run_ids[0]].config["losses"]["dkd"]["warmup"]
                 for c in _plan(spec.id, "proxy").cells if c.cell.method == "DKD"]
    assert dkd_full and dkd_proxy == [scaled(w) for w in dkd_full]


def test_table6_rescales_table1s_beta_from_table1s_gamma():
    """WTTM w/o CE keeps the pair's Table 1 WTTM beta and names the Table 1 gamma it was chosen at; the run
    measures U_bar at both gammas (the rule, footnoted as our assumption)."""
    table1 = {(c.teacher, c.student): c.params["wttm"] for c in _spec("wttm/cifar100-table1").cells
              if c.method == "WTTM"}
    cells = [c for c in _spec("wttm/cifar100-table6").cells if c.method == "WTTM w/o CE"]
    assert len(cells) == 7
    for cell in cells:
        wttm = cell.params["wttm"]
        assert wttm["weight"] == table1[(cell.teacher, cell.student)]["weight"]
        assert wttm["rescale_from_gamma"] == table1[(cell.teacher, cell.student)]["gamma"]
        assert wttm["gamma"] != wttm["rescale_from_gamma"]
        assert cell.provenance["params.wttm.rescale_from_gamma"].source == "assumption"


def test_dist_cells_say_whose_run_they_are():
    """DIST_KD's README lists 6 CIFAR pairs (DIST's own runs); the other 7 DIST cells are the WTTM authors'."""
    notes = [c.reported.note for spec_id in ("wttm/cifar100-table1", "wttm/cifar100-table3")
             for c in _spec(spec_id).cells if c.method == "DIST"]
    assert len(notes) == 13
    assert sum("DIST's own run" in n for n in notes) == 6
    assert sum("The WTTM authors' re-run" in n for n in notes) == 7
    wrn = next(c for c in _spec("wttm/cifar100-table1").cells if c.method == "DIST" and c.student == "wrn_40_1")
    assert wrn.reported.mean == 74.73 and "74.43±0.24" in wrn.reported.note


ITRD_README = {("resnet32x4", "resnet8x4"): ("76.19", "76.69"), ("ResNet50", "MobileNetV2"): ("71.41", "71.34"),
               ("ResNet50", "vgg8"): ("75.71", "75.49"), ("resnet32x4", "ShuffleV1"): ("76.91", "76.69"),
               ("wrn_40_2", "ShuffleV1"): ("77.35", "77.09")}


def test_itrd_cells_footnote_the_readme_where_it_differs():
    cells = {(c.teacher, c.student): c for spec_id in ("wttm/cifar100-table2", "wttm/cifar100-table4")
             for c in _spec(spec_id).cells if c.method == "ITRD"}
    for pair, cell in cells.items():
        if pair in ITRD_README:
            paper, readme = ITRD_README[pair]
            assert f"{cell.reported.mean:.2f}" == paper and readme in cell.reported.note, pair
        else:
            assert cell.reported.note == "", pair


def test_ledger_facts_are_footnoted_in_the_rendered_table(tmp_path):
    from repro.harness.compare import compare_plan
    from repro.harness.render.tables import csv_rows, section_markdown
    from repro.harness.store import RunStore

    plan = _plan("wttm/cifar100-table1", "full")
    results = compare_plan(plan, RunStore(tmp_path))
    text = section_markdown(plan.spec, "full", results)
    wrn = next(r for r in results if r.cell.method == "DIST" and r.cell.student == "wrn_40_1")
    row = next(line for line in text.splitlines() if "wrn_40_2 → wrn_40_1" in line and "| DIST" in line)
    number = text.splitlines().index(next(line for line in text.splitlines() if wrn.cell.reported.note in line))
    mark = text.splitlines()[number].split(".")[0]
    assert f"[{mark}]" in row.split("|")[3]  # the footnote is on the reported value
    assert "dist_cifar.yaml" in text and "DKD" in text and "wrn40_2_wrn_16_2.yaml" in text
    assert any(r["reported_note"] == wrn.cell.reported.note for r in csv_rows(results))
