"""Run logging: TensorBoard events readable by tensorboard's own reader with the expected tags; W&B through a
fake module; a log never changes a run id or a result."""
from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest

from repro.cli import main
from repro.harness.plan import plan_spec
from tests.conftest import TESTS

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = str(TESTS / "specs" / "tiny_ddp.yaml")  # one CE run, 2 epochs
QUIET = ["--no-progress", "--no-estimate", "--device", "cpu"]
TAGS = {"lr", "loss/ce", "loss/total", "train/top1", "train/top5", "test/top1", "test/top5", "student/mean_entropy",
        "throughput/images_per_s"}
WALL_TIME_FIELDS = {"wall_time_s", "images_per_s"}


def _run(runs: Path, log: str) -> tuple[str, dict]:
    assert main(["run", SPEC, "--tier", "smoke", "--runs", str(runs), *QUIET, "--log", log]) == 0
    (run_id,) = plan_spec(SPEC, "smoke").runs
    return run_id, json.loads((runs / run_id / "result.json").read_text())


def test_tensorboard_events_and_a_log_changes_nothing(tmp_path, workdirs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_id, logged = _run(tmp_path / "a", "tensorboard")
    run_dir = tmp_path / "a" / run_id
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert TAGS <= set(events.Tags()["scalars"])
    assert any("config" in tag for tag in events.Tags()["tensors"])  # the resolved config, as text
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    top1 = events.Scalars("test/top1")
    assert [e.step for e in top1] == [1, 2]
    assert [e.value for e in top1] == pytest.approx([m["test_top1"] for m in metrics])
    assert [e.value for e in events.Scalars("train/top1")] == pytest.approx([m["train_top1"] for m in metrics])

    same_id, unlogged = _run(tmp_path / "b", "none")
    assert same_id == run_id
    assert not list((tmp_path / "b" / run_id).glob("events.out.tfevents.*"))
    strip = lambda r: {k: v for k, v in r.items() if k not in WALL_TIME_FIELDS}  # noqa: E731
    assert strip(logged) == strip(unlogged)


def test_wandb_logger_through_a_fake_module(tmp_path, workdirs, monkeypatch):
    calls: list[tuple] = []

    class FakeRun:
        def log(self, data, step=None):
            calls.append(("log", step, dict(data)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("REPRO_LOGGERS", raising=False)
    run_id, _ = _run(tmp_path / "a", "wandb")
    init = calls[0]
    assert init[0] == "init" and init[1]["id"] == run_id and init[1]["config"]["kind"] == "train"
    assert init[1]["mode"] == "offline" and Path(init[1]["dir"]) == tmp_path / "a" / run_id
    logs = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logs] == [1, 2] and TAGS <= set(logs[0][2])
    assert calls[-1] == ("finish",)


@pytest.mark.parametrize("names, message", [("nosuch", "unknown run logger 'nosuch'"),
                                             ("definitely_not_installed", "unknown run logger")])
def test_unknown_logger_exits_2(names, message, capsys, workdirs, monkeypatch):
    monkeypatch.delenv("REPRO_LOGGERS", raising=False)
    code = main(["run", SPEC, "--tier", "smoke", *QUIET, "--log", names])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_uninstalled_logger_exits_2(capsys, workdirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import (and find_spec) of wandb fail as if uninstalled
    monkeypatch.delenv("REPRO_LOGGERS", raising=False)
    from repro.core.errors import ReproError
    from repro.train.loggers import selected_loggers

    with pytest.raises(ReproError, match="pip install wandb"):
        selected_loggers("wandb")
