"""Shared test setup: never reach a model hub, keep runs and data in temporary folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# One run at a time in the test's own process unless a test asks for more (--jobs, or its own $REPRO_JOBS): loss
# terms and monkeypatches a test installs exist only there, not in spawned worker processes.
os.environ["REPRO_JOBS"] = "1"

TESTS = Path(__file__).parent
TINY_SPEC = str(TESTS / "specs" / "tiny.yaml")


@pytest.fixture
def workdirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A private run store, data folder and tables folder for one test."""
    dirs = {name: tmp_path / name for name in ("runs", "data", "tables")}
    for path in dirs.values():
        path.mkdir()
    monkeypatch.setenv("REPRO_RUNS", str(dirs["runs"]))
    monkeypatch.setenv("REPRO_DATA", str(dirs["data"]))
    return dirs


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny models: on a shared 2-core machine two threads wait on each
    other (oversubscription) and run slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
