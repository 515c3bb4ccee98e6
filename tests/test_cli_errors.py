"""Bad input gets one clear message and exit code 2, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from repro.cli import main
from tests.conftest import TINY_SPEC


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


def tiny_with(replace: str, by: str) -> str:
    text = Path(TINY_SPEC).read_text()
    assert replace in text
    return text.replace(replace, by)


def test_empty_spec(tmp_path, capsys, workdirs):
    code, err = run_cli(["plan", write(tmp_path, ""), "--no-estimate"], capsys)
    assert code == 2 and "is empty" in err and "Traceback" not in err


def test_yaml_syntax_error(tmp_path, capsys, workdirs):
    code, err = run_cli(["plan", write(tmp_path, "id: [unclosed\n"), "--no-estimate"], capsys)
    assert code == 2 and "YAML syntax error" in err


def test_unknown_key_is_named(tmp_path, capsys, workdirs):
    spec = write(tmp_path, tiny_with("seeds: 2", "seeds: 2\nseedz: 3"))
    code, err = run_cli(["plan", spec, "--no-estimate"], capsys)
    assert code == 2 and "unknown key 'seedz'" in err


def test_unknown_key_in_tier_override_is_named(tmp_path, capsys, workdirs):
    spec = write(tmp_path, tiny_with("    epochs: 3\n", "    epochs: 3\n    epoch: 4\n"))
    code, err = run_cli(["plan", spec, "--tier", "smoke", "--no-estimate"], capsys)
    assert code == 2 and "unknown key 'epoch'" in err and "smoke" in err


def test_unknown_model_is_named(tmp_path, capsys, workdirs):
    spec = write(tmp_path, tiny_with("student: resnet8, method: KD", "student: resnet999, method: KD"))
    code, err = run_cli(["plan", spec, "--no-estimate"], capsys)
    assert code == 2 and "unknown model 'resnet999'" in err


def test_missing_spec_path(capsys, workdirs):
    code, err = run_cli(["plan", "/nonexistent/spec.yaml", "--no-estimate"], capsys)
    assert code == 2 and "/nonexistent/spec.yaml" in err and "does not exist" in err


def test_unknown_spec_id_lists_known_ids(capsys, workdirs):
    code, err = run_cli(["plan", "wttm/no-such-table", "--no-estimate"], capsys)
    assert code == 2 and "wttm/cifar100-table1" in err


def test_negative_lr(tmp_path, capsys, workdirs):
    spec = write(tmp_path, tiny_with("    batch_size: 8\n", "    batch_size: 8\n    optimizer: {lr: -0.1}\n"))
    code, err = run_cli(["plan", spec, "--tier", "smoke", "--no-estimate"], capsys)
    assert code == 2 and "optimizer.lr" in err and "greater than 0" in err


def test_unknown_method_in_cell(tmp_path, capsys, workdirs):
    spec = write(tmp_path, tiny_with("method: FitNet", "method: FitNett"))
    code, err = run_cli(["plan", spec, "--no-estimate"], capsys)
    assert code == 2 and "FitNett" in err


def test_missing_dataset_names_folder_and_smoke_tier(capsys, workdirs):
    # Full tier, no CIFAR-100 files and no network: one message naming the folder and TIER=smoke.
    code, err = run_cli(["run", TINY_SPEC, "--tier", "full", "--no-estimate", "--no-progress"], capsys)
    assert code == 2
    assert "Traceback" not in err and err.count("\n") == 1


def test_no_traceback_in_a_real_process(tmp_path, workdirs):
    proc = subprocess.run([sys.executable, "-m", "repro", "plan", write(tmp_path, "- just\n- a list\n")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_unknown_loss_term_parameter_is_named(tmp_path, capsys, workdirs):
    spec = write(tmp_path, tiny_with("params: {wttm: {gamma: 0.2", "params: {wttm: {gama: 0.2"))
    code, err = run_cli(["plan", spec, "--no-estimate"], capsys)
    assert code == 2 and "'gama'" in err and "gamma" in err


def test_missing_loss_term_parameter_is_named(tmp_path, capsys, workdirs):
    spec = write(tmp_path, tiny_with("params: {wttm: {gamma: 0.2, weight: 2.0}}", "params: {wttm: {weight: 2.0}}"))
    code, err = run_cli(["plan", spec, "--no-estimate"], capsys)
    assert code == 2 and "missing parameter(s) ['gamma']" in err


def test_unknown_loss_term_is_named(tmp_path, capsys, workdirs):
    spec = write(tmp_path, tiny_with("Student: {losses: {ce: 1.0}}", "Student: {losses: {ce: 1.0, kdd: 1.0}}"))
    code, err = run_cli(["plan", spec, "--no-estimate"], capsys)
    assert code == 2 and "unknown loss term 'kdd'" in err
