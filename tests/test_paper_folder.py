"""A paper is one folder: a throw-away paper (one spec on its own base, one figure) placed outside the tree and
named in $REPRO_PAPERS is found by spec discovery, `repro specs`, `repro plan` and `repro figures`, with no generic
module edited; the built-in papers keep their spec ids."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from repro.cli import main
from repro.core.errors import ReproError
from repro.papers import ENV, spec_files
from repro.harness.spec import all_outputs, all_spec_ids, load_spec, specs_for_output

SPEC = """\
base: toy/_base
id: toy/table
paper: toy
title: a throw-away paper's table
table: Toy table
output: toy-table
seeds: 1
tiers:
  smoke:
    data: {synthetic: {classes_used: 4, train_per_class: 8, test_per_class: 4, seed: 0}}
    epochs: 1
    batch_size: 8
    teachers: {source: train, epochs: 1}
methods:
  Teacher: {role: teacher}
  KD: {losses: {ce: 0.1, kd: {weight: 0.9, temperature: 4}}}
cells:
  - {teacher: resnet14, student: resnet8, method: Teacher, reported: {mean: 70.0}}
  - {teacher: resnet14, student: resnet8, method: KD, reported: {mean: 65.0}}
"""

FIGURES = '''\
"""The toy paper's one figure: how many runs its table plans, as a bar (drawn without training anything)."""
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from repro.harness.render.figure_steps import figure


@figure("toy-figure")
def toy_figure(ctx) -> list[Path]:
    plan = ctx.plan("toy/table")
    fig = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.bar(["runs"], [len(plan.runs)])
    ax.set_title("Toy figure: runs planned")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.out_dir / "toy.png"
    fig.savefig(path)
    return [path]
'''


@pytest.fixture
def toy_paper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path/papers/toy/{specs/_base.yaml, specs/table.yaml, figures.py}, made discoverable via $REPRO_PAPERS.
    Its base is a copy of the WTTM CIFAR recipe: bases resolve inside the new paper."""
    folder = tmp_path / "papers" / "toy"
    (folder / "specs").mkdir(parents=True)
    (folder / "specs" / "_base.yaml").write_text(spec_files()["wttm/_cifar100"].read_text())
    (folder / "specs" / "table.yaml").write_text(SPEC)
    (folder / "figures.py").write_text(FIGURES)
    monkeypatch.setenv(ENV, str(tmp_path / "papers"))
    return folder


def test_builtin_spec_ids_are_unchanged():
    ids = all_spec_ids()
    assert {"wttm/cifar100-table1", "wttm/figure1-entropy", "ssta/transfer", "ssta/imagenet-main"} <= set(ids)
    assert not any(Path(i).name.startswith("_") for i in ids)  # bases are not specs
    assert spec_files()["wttm/cifar100-table1"].parts[-3:] == ("wttm", "specs", "cifar100-table1.yaml")


def test_a_paper_folder_outside_the_tree_is_discovered(toy_paper: Path, tmp_path: Path, capsys):
    assert "toy/table" in all_spec_ids() and "toy/_base" not in all_spec_ids()
    assert "toy-table" in all_outputs() and specs_for_output("toy-table") == ["toy/table"]
    spec = load_spec("toy/table")
    assert spec.recipe_for("smoke").epochs == 1  # the spec's tier over its own base

    assert main(["specs"]) == 0
    assert "toy/table" in capsys.readouterr().out
    runs = tmp_path / "runs"
    assert main(["plan", "toy/table", "--tier", "smoke", "--no-estimate", "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "plan toy/table [tier smoke]" in out and "pending" in out

    figures = tmp_path / "figures"
    assert main(["figures", "--tier", "smoke", "--no-run", "--only", "toy-figure", "--runs", str(runs),
                 "--figures", str(figures), "--device", "cpu", "--no-progress"]) == 0
    assert (figures / "toy.png").read_bytes().startswith(b"\x89PNG")


def test_figures_of_a_paper_no_longer_found_are_not_drawn(toy_paper: Path, monkeypatch: pytest.MonkeyPatch):
    from repro.harness.render.figure_steps import figure_steps

    steps = list(figure_steps())
    assert "toy-figure" in steps and steps[-1] == "reported-vs-reproduced"
    assert steps.index("toy-figure") > steps.index("transfer")  # papers in name order: ssta, toy, wttm
    monkeypatch.delenv(ENV)
    assert "toy-figure" not in figure_steps()
    with pytest.raises(ReproError, match="no spec 'toy/table'"):
        load_spec("toy/table")


def test_a_paper_name_in_two_roots_and_a_missing_root_are_refused(toy_paper: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "other" / "wttm" / "specs").mkdir(parents=True)
    monkeypatch.setenv(ENV, str(tmp_path / "other"))
    with pytest.raises(ReproError, match="paper 'wttm' is in two places"):
        all_spec_ids()
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ReproError, match="is not a folder"):
        all_spec_ids()
