"""Result bundles: export -> import into an empty store reproduces the table byte for byte (but its generation
stamp); a tampered bundle is refused with nothing imported; conflicts are listed, never merged; seeds of several
bundles pool into one cell."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from repro.cli import main
from repro.harness.compare import compare_plan
from repro.harness.plan import plan_spec
from repro.harness.render.tables import render_output
from repro.harness.store import RunStore
from tests.conftest import TESTS

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = str(TESTS / "specs" / "tiny_resume.yaml")  # a trained teacher (1 epoch) and one KD student (4 epochs)
QUIET = ["--no-progress", "--no-estimate", "--device", "cpu", "--log", "none"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A store with the spec's smoke runs, and its exported bundle (with weights)."""
    root = tmp_path_factory.mktemp("lab_a")
    runs = root / "runs"
    assert main(["run", SPEC, "--tier", "smoke", "--runs", str(runs), *QUIET]) == 0
    out = root / "bundle.tar.gz"
    assert main(["export", SPEC, "--tier", "smoke", "--runs", str(runs), "-o", str(out), "--with-weights"]) == 0
    return runs, out


def _table(runs: Path, tables: Path, seeds=None) -> str:
    plan = plan_spec(SPEC, "smoke", seeds)
    md, _ = render_output("test-resume", "smoke", [(plan, compare_plan(plan, RunStore(runs)))], tables, "test")
    return md.read_text()


def _without_generation_stamp(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("> **Tier:"))


def test_export_import_reproduces_the_table(bundle, tmp_path):
    runs, out = bundle
    assert main(["import", str(out), "--runs", str(tmp_path / "runs")]) == 0
    original = _table(runs, tmp_path / "t1")
    imported = _table(tmp_path / "runs", tmp_path / "t2")
    assert "pending" not in imported
    assert _without_generation_stamp(original) == _without_generation_stamp(imported)
    for run_id in plan_spec(SPEC, "smoke").runs:
        assert (tmp_path / "runs" / run_id / "result.json").read_bytes() == (runs / run_id / "result.json").read_bytes()
        assert json.loads((tmp_path / "runs" / run_id / "origin.json").read_text())["bundle"] == str(out)


def _rewrite(src: Path, dst: Path, change, fix_manifest: bool) -> None:
    """A copy of a bundle with ``change(name, data) -> data`` applied (the manifest's sha256s updated or not)."""
    with tarfile.open(src, "r:gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    manifest = json.loads(files.pop("manifest.json"))
    files = {name: change(name, data) for name, data in files.items()}
    if fix_manifest:
        import hashlib

        manifest["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    with tarfile.open(dst, "w:gz") as tar:
        for name, data in [("manifest.json", json.dumps(manifest).encode()), *files.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _one_byte_of_one_result(name: str, data: bytes) -> bytes:
    if name.endswith("result.json") and b'"best_top1": ' in data:
        i = data.index(b'"best_top1": ') + len(b'"best_top1": ')
        return data[:i] + (b"9" if data[i:i + 1] != b"9" else b"8") + data[i + 1:]
    return data


def _config_that_no_longer_hashes(name: str, data: bytes) -> bytes:
    if name.endswith("config.json"):
        config = json.loads(data)
        config["seed"] = 123
        return json.dumps(config).encode()
    return data


@pytest.mark.parametrize("change, fix_manifest, message", [
    (_one_byte_of_one_result, False, "does not match its sha256"),
    (_config_that_no_longer_hashes, True, "hashes to"),
])
def test_tampered_bundle_is_refused_with_nothing_imported(bundle, tmp_path, capsys, change, fix_manifest, message):
    _, out = bundle
    tampered = tmp_path / "tampered.tar.gz"
    _rewrite(out, tampered, change, fix_manifest)
    store = tmp_path / "runs"
    code = main(["import", str(tampered), "--runs", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not store.exists() or not any(store.iterdir())


def test_conflicting_result_is_kept_listed_and_not_merged(bundle, tmp_path, capsys):
    runs, out = bundle
    store = tmp_path / "runs"
    shutil.copytree(runs, store)
    student = plan_spec(SPEC, "smoke").cells[0].run_ids[0]
    path = store / student / "result.json"
    ours = json.loads(path.read_text())
    ours["best_top1"] = ours["best_top1"] + 1.0  # the same config trained elsewhere gave another number
    path.write_text(json.dumps(ours))
    assert main(["import", str(out), "--runs", str(store)]) == 0
    printed = capsys.readouterr().out
    assert "1 conflicts" in printed and f"conflict: run {student}" in printed and "kept the store's" in printed
    assert json.loads(path.read_text()) == ours
    (kept,) = (store / student / "conflicts").iterdir()
    assert json.loads(kept.read_text())["best_top1"] == ours["best_top1"] - 1.0


def test_seeds_of_two_bundles_pool_into_one_cell(bundle, tmp_path, capsys):
    runs_a, bundle_a = bundle
    runs_b = tmp_path / "lab_b"
    assert main(["import", str(bundle_a), "--runs", str(runs_b)]) == 0  # lab B trains seed 1 on lab A's teacher
    assert main(["run", SPEC, "--tier", "smoke", "--seeds", "2", "--runs", str(runs_b), *QUIET]) == 0
    seed1 = plan_spec(SPEC, "smoke", seeds=2).cells[0].run_ids[1]
    result = json.loads((runs_b / seed1 / "result.json").read_text())
    result["hostname"] = "lab-b-node"  # where lab B computed it (this test has one machine)
    (runs_b / seed1 / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    bundle_b = tmp_path / "b.tar.gz"
    assert main(["export", SPEC, "--tier", "smoke", "--seeds", "2", "--runs", str(runs_b), "-o", str(bundle_b)]) == 0

    pooled = tmp_path / "pooled"
    for b in (bundle_a, bundle_b):
        assert main(["import", str(b), "--runs", str(pooled)]) == 0
    capsys.readouterr()
    table = _table(pooled, tmp_path / "t", seeds=2)
    row = next(line for line in table.splitlines() if "| KD" in line)
    assert " ± " in row and "seeds)" not in row  # two seeds, one mean ± std, not partial
    assert "lab-b-node @" in table and "(1 run)" in table  # per-cell origin: the runs of two machines

    assert main(["runs", SPEC, "--tier", "smoke", "--seeds", "2", "--runs", str(pooled)]) == 0
    listing = capsys.readouterr().out
    assert seed1 in listing and "lab-b-node" in listing and "3 runs" in listing
