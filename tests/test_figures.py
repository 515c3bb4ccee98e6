"""Figures: each one is a non-empty PNG with a title and axis labels, drawn from small fake store contents;
plus the ingredient of WTTM Figure 1 that is new code (WTTM's loss divided by the teacher's mean U)."""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import pytest
import torch
import torch.nn as nn

import repro.harness.render.figures as figures
from repro.harness.compare import compare_plan
from repro.analyses.spec_models import analysis_models
from repro.cli.figures import add_figures_parser, run_figures
from repro.papers.ssta.figures import top10_pair
from repro.papers.wttm.figures import ENTROPY_FIGURE
from repro.losses import wttm_loss, wttm_weight
from repro.methods.base import Outputs, TermContext
from repro.methods.wttm import WTTM
from repro.harness.plan import make_plan
from repro.harness.render.analysis_plots import plot_imagenet_c, plot_shape_bias, plot_top10
from repro.harness.render.tables import CSV_COLUMNS
from repro.harness.spec import load_spec
from repro.harness.store import RunStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def drawn(monkeypatch):
    """Titles and axis labels of every figure saved through repro.harness.render.figures (the text a reader sees)."""
    seen: list[dict] = []
    original = figures.save_stamped

    def spy(figure, path, stamp, **corner):
        seen.append({
            "suptitle": figure._suptitle.get_text() if figure._suptitle else "",
            "titles": [ax.get_title() for ax in figure.axes],
            "xlabels": [ax.get_xlabel() for ax in figure.axes],
            "ylabels": [ax.get_ylabel() for ax in figure.axes],
            "stamp": stamp,
        })
        return original(figure, path, stamp, **corner)

    monkeypatch.setattr(figures, "save_stamped", spy)
    return seen


def assert_png(path) -> None:
    data = open(path, "rb").read()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def assert_labelled(entry: dict, title: str, xlabel: str, ylabel: str) -> None:
    assert title in entry["suptitle"] + " ".join(entry["titles"])
    assert xlabel in entry["xlabels"] and ylabel in entry["ylabels"]
    assert "tier=smoke" in entry["stamp"] and "commit=" in entry["stamp"]


# ----------------------------------------------------------------------------------------------- reported vs reproduced

def test_reported_vs_reproduced_from_a_table_csv(tmp_path, drawn):
    rows = [
        {"method": "KD", "reported_mean": 74.9, "reported_std": 0.3, "reproduced_mean": 74.5, "reproduced_std": 0.2},
        {"method": "WTTM", "reported_mean": 76.4, "reported_std": None, "reproduced_mean": 76.0,
         "reproduced_std": None},
        {"method": "FitNet", "reported_mean": 73.6, "reported_std": 0.3, "reproduced_mean": None},  # not run
        {"method": "TTM", "reported_mean": None, "reproduced_mean": 70.0},  # n/a in the paper
    ]
    csv = tmp_path / "wttm-cifar100.csv"
    table = pd.DataFrame([{**{c: None for c in CSV_COLUMNS}, "tier": "smoke", **r} for r in rows], columns=CSV_COLUMNS)
    table.to_csv(csv, index=False)
    frame = figures.read_table_csv(csv)
    path = figures.plot_reported_vs_reproduced(frame, tmp_path / "reported-vs-reproduced-wttm-cifar100.png",
                                               figures.figure_stamp("smoke"), "wttm-cifar100: reported vs reproduced")
    assert_png(path)
    assert_labelled(drawn[0], "reported vs reproduced", "Reported top-1 (%)", "Reproduced top-1 (%)")
    assert frame.dropna(subset=["reported_mean", "reproduced_mean"])["method"].tolist() == ["KD", "WTTM"]


# ----------------------------------------------------------------------------------------------- WTTM Figure 1

@pytest.fixture(scope="module")
def figure1_plan():
    return make_plan(load_spec("wttm/figure1-entropy"), "smoke")


def test_figure1_spec_matches_the_paper(figure1_plan):
    losses = {c.cell.method: figure1_plan.runs[c.run_ids[0]].config["losses"] for c in figure1_plan.cells}
    assert losses["KD"] == {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4}}
    assert losses["TTM"]["ttm"] == {"weight": 36, "gamma": 0.25}  # beta = lambda T / (1 - lambda), gamma = 1/T
    assert losses["WTTM"]["wttm"] == {"weight": 36, "gamma": 0.25, "weight_by_mean_u": True}
    assert len({(c.cell.teacher, c.cell.student) for c in figure1_plan.cells}) == 3


def test_entropy_figure_from_metrics(tmp_path, figure1_plan, drawn):
    store = RunStore(tmp_path / "runs")
    for i, cell_runs in enumerate(figure1_plan.cells):
        store.write_metrics(cell_runs.run_ids[0], [{"epoch": e, "entropy": 2.0 / e + 0.1 * i} for e in (1, 2, 3)])
    curves = figures.gather_entropy_curves(figure1_plan, store)
    assert len(curves) == 3 and all(set(per_pair) == {"KD", "TTM", "WTTM"} for per_pair in curves.values())
    assert curves["resnet56 → resnet20"]["KD"] == [(1, 2.0, 0.0), (2, 1.0, 0.0), (3, 2.0 / 3, 0.0)]
    path = figures.plot_entropy_curves(curves, tmp_path / ENTROPY_FIGURE, figures.figure_stamp("smoke"))
    assert_png(path)
    assert_labelled(drawn[0], "entropy", "Epoch", "Mean predictive entropy H(q) (nats)")


class FixedTeacher(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[: images.shape[0]]


def test_wttm_weight_by_mean_u_divides_by_the_teachers_mean_u():
    torch.manual_seed(0)
    teacher_logits = torch.randn(6, 10) * 3
    batches = [argparse.Namespace(images=torch.zeros(3, 3, 4, 4)), argparse.Namespace(images=torch.zeros(3, 3, 4, 4))]
    ctx = TermContext(student=nn.Identity(), teacher=FixedTeacher(teacher_logits), num_classes=10,
                      train_labels=torch.zeros(6, dtype=torch.long), device=torch.device("cpu"), epochs=1,
                      sample_batches=lambda n: iter(batches[:n]))
    term = WTTM(ctx, gamma=0.25, weight_by_mean_u=True)
    mean_u = float(wttm_weight(teacher_logits[:3], 0.25).mean())  # the fixed teacher returns rows 0..2 per batch
    assert float(term.mean_u) == pytest.approx(mean_u, rel=1e-6)
    student = torch.randn(5, 10)
    out = Outputs(logits=student, teacher_logits=teacher_logits[:5])
    plain = WTTM(ctx, gamma=0.25)
    assert float(term(out, None)) == pytest.approx(float(wttm_loss(student, teacher_logits[:5], 0.25)) / mean_u)
    assert float(plain(out, None)) == pytest.approx(float(wttm_loss(student, teacher_logits[:5], 0.25)))
    assert "mean_u" not in plain.state_dict() and "mean_u" in term.state_dict()  # resumes carry U_bar


# ----------------------------------------------------------------------------------------------- SSTA transfer

@pytest.fixture(scope="module")
def transfer_plan():
    return make_plan(load_spec("ssta/transfer"), "smoke")


def _finish(store: RunStore, plan, run_id: str, top1: float) -> None:
    store.write_config(run_id, plan.runs[run_id].config)
    store.write_result(run_id, {"status": "done", "best_top1": top1, "last_top1": top1 - 1, "label": run_id})


def test_transfer_figure_from_results(tmp_path, transfer_plan, drawn):
    store = RunStore(tmp_path / "runs")
    for i, run_id in enumerate(transfer_plan.runs):
        _finish(store, transfer_plan, run_id, 50.0 + i)
    names = {key: transfer_plan.spec.model_def(key).arch or key for key in transfer_plan.spec.models}
    frame = figures.gather_transfer(compare_plan(transfer_plan, store), store, names)
    assert set(frame["dataset"]) == {"cifar10", "cifar100"}  # read from each run's own config
    assert "deit_tiny_patch16_224" in set(frame["model"])
    # the SSTA student fine-tuned from ssta/imagenet-main's run is its own bar, on both datasets
    assert set(frame[frame["model"] == "deit_tiny_patch16_224 from ssta/imagenet-main"]["dataset"]) == \
        {"cifar10", "cifar100"}
    path = figures.plot_transfer(frame, tmp_path / figures.TRANSFER_FIGURE, figures.figure_stamp("smoke"))
    assert_png(path)
    assert_labelled(drawn[0], "Transfer", "Model (fine-tuned from its ImageNet weights)", "Top-1 (%), best epoch")


# ----------------------------------------------------------------------------------------------- SSTA analyses

def _record(suites: dict) -> dict:
    return {"suites": suites}


def test_ssta_analysis_figures_from_eval_records(tmp_path):
    records = {
        "teacher": _record({
            "shape-bias": {"per_class": {"cat": 0.2, "dog": 0.4}, "shape_bias": 0.3},
            "imagenet-c": {"ce": {"gaussian_noise": 80.0, "contrast": 70.0}},
            "top10": {"table": [
                {"group": "teacher > TA", "rank": 1, "class_index": 3, "class_name": "n03", "model": m,
                 "correct": c, "total": 5, "accuracy": 20.0 * c, "difference": 2}
                for m, c in (("teacher", 4), ("TA", 2))]},
        }),
        "TA": _record({"shape-bias": {"per_class": {"cat": 0.6, "dog": 0.5}, "shape_bias": 0.55},
                       "imagenet-c": {"ce": {"gaussian_noise": 90.0, "contrast": 60.0}}}),
    }
    per_class, overall = figures.gather_shape_bias(records)
    assert overall == {"teacher": 0.3, "TA": 0.55}
    stamp = figures.figure_stamp("smoke")
    for path in (plot_shape_bias(per_class, tmp_path / figures.SHAPE_BIAS_FIGURE, stamp, overall),
                 plot_imagenet_c(figures.gather_imagenet_c(records), tmp_path / figures.IMAGENET_C_FIGURE, stamp),
                 plot_top10(figures.gather_top10(records), tmp_path / figures.TOP10_FIGURE, stamp)):
        assert_png(path)


def test_analysis_models_come_from_the_spec_cells(tmp_path, transfer_plan):
    store = RunStore(tmp_path / "runs")
    first, second, *_ = transfer_plan.runs
    _finish(store, transfer_plan, first, 60.0)
    _finish(store, transfer_plan, second, 55.0)
    models = analysis_models(transfer_plan, store)
    assert [m.run_id for m in models] == [first, second]  # finished runs only, each once
    assert all(m.role == "student" for m in models) and top10_pair(models) == (models[0], models[1])


# ----------------------------------------------------------------------------------------------- the command

def test_figures_command_writes_named_pngs_without_running(tmp_path, figure1_plan, transfer_plan):
    store = RunStore(tmp_path / "runs")
    for cell_runs in figure1_plan.cells:
        store.write_metrics(cell_runs.run_ids[0], [{"epoch": 1, "entropy": 1.0}, {"epoch": 2, "entropy": 0.5}])
    for run_id in transfer_plan.runs:
        _finish(store, transfer_plan, run_id, 42.0)
    parser = argparse.ArgumentParser()
    add_figures_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["figures", "--tier", "smoke", "--no-run",
                              "--only", "reported-vs-reproduced,entropy,transfer",
                              "--outputs", "wttm-figure1,ssta-transfer",
                              "--runs", str(store.root), "--figures", str(tmp_path / "figures"),
                              "--tables", str(tmp_path / "tables"), "--device", "cpu", "--no-progress"])
    assert run_figures(args) == 0
    names = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {ENTROPY_FIGURE, figures.TRANSFER_FIGURE, "reported-vs-reproduced-wttm-figure1.png",
            "reported-vs-reproduced-ssta-transfer.png"} <= names
    for name in names:
        assert_png(tmp_path / "figures" / name)


def test_every_figure_group_runs_by_default():
    from repro.harness.render.figure_steps import figure_steps

    steps = list(figure_steps())
    # Every paper's figures are discovered, and the shared reported-vs-reproduced figure is drawn last.
    assert {"entropy", "transfer", "ssta-analyses"} <= set(steps) and steps[-1] == "reported-vs-reproduced"
