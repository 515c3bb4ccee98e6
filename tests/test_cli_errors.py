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


# Each spec mistake the loader must name: (the line to change, its replacement, --tier args, words the message names).
SPEC_MISTAKES = {
    "unknown key": ("seeds: 2", "seeds: 2\nseedz: 3", [], ["unknown key 'seedz'"]),
    "unknown key in a tier override": ("    epochs: 3\n", "    epochs: 3\n    epoch: 4\n", ["--tier", "smoke"],
                                       ["unknown key 'epoch'", "smoke"]),
    "unknown model": ("student: resnet8, method: KD", "student: resnet999, method: KD", [],
                      ["unknown model 'resnet999'"]),
    "negative lr": ("    batch_size: 8\n", "    batch_size: 8\n    optimizer: {lr: -0.1}\n", ["--tier", "smoke"],
                    ["optimizer.lr", "greater than 0"]),
    "unknown method in a cell": ("method: FitNet", "method: FitNett", [], ["FitNett"]),
}


@pytest.mark.parametrize("mistake", SPEC_MISTAKES)
def test_spec_mistake_is_named(mistake, tmp_path, capsys, workdirs):
    old, new, tier, words = SPEC_MISTAKES[mistake]
    code, err = run_cli(["plan", write(tmp_path, tiny_with(old, new)), *tier, "--no-estimate"], capsys)
    assert code == 2 and all(word in err for word in words), err


def test_missing_spec_path(capsys, workdirs):
    code, err = run_cli(["plan", "/nonexistent/spec.yaml", "--no-estimate"], capsys)
    assert code == 2 and "/nonexistent/spec.yaml" in err and "does not exist" in err


def test_unknown_spec_id_lists_known_ids(capsys, workdirs):
    code, err = run_cli(["plan", "wttm/no-such-table", "--no-estimate"], capsys)
    assert code == 2 and "wttm/cifar100-table1" in err


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


# -- every registry name and every loss-term parameter domain is checked when the spec loads ----------------------
def with_recipe(fragment: str, text: str | None = None) -> str:
    """The tiny spec with a top-level ``recipe:`` fragment (deep-merged into its base's recipe)."""
    return (text or Path(TINY_SPEC).read_text()) + f"recipe: {fragment}\n"


BAD_VALUES = {
    "pipeline": (with_recipe("{pipeline: cifar_crop_flp}"), ["pipeline 'cifar_crop_flp'", "cifar_crop_flip"]),
    "optimizer": (with_recipe("{optimizer: {name: sgdd}}"), ["optimizer.name 'sgdd'", "sgd", "adamw"]),
    "schedule": (with_recipe("{schedule: {name: cosinee}}"), ["schedule.name 'cosinee'", "cosine", "multistep"]),
    "dataset": (with_recipe("{data: {name: cifar1000}}"), ["data.name 'cifar1000'", "cifar100"]),
    "folder dataset": (with_recipe("{pipeline: imagenet_standard}"), ["data.name 'cifar100'", "imagenet"]),
    "teacher source": (with_recipe("{teachers: {source: pretrainedd}}"), ["teachers.source", "'pretrainedd'",
                                                                          "checkpoint"]),
    "wttm gamma": (tiny_with("params: {wttm: {gamma: 0.2", "params: {wttm: {gamma: -3"),
                   ["'wttm'", "gamma = -3", "> 0"]),
    "kd temperature": (tiny_with("kd: {weight: 0.9, temperature: 4}", "kd: {weight: 0.9, temperature: 0}"),
                       ["'kd'", "temperature = 0", "> 0"]),
    "weight": (tiny_with("kd: {weight: 0.9, temperature: 4}", "kd: {weight: .nan, temperature: 4}"),
               ["weight = nan", "finite"]),
    "schedule warm-up": (with_recipe("{schedule: {warmup_epochs: 300}}"), ["warmup_epochs = 300", "240 epochs"]),
    "term warm-up": (tiny_with("  FitNet:", "  DKD: {losses: {ce: 1.0, dkd: {warmup: 500}}}\n  FitNet:")
                     + "  - {teacher: resnet14, student: resnet8, method: DKD}\n",
                     ["'dkd'", "warmup = 500", "240 epochs"]),
    "probability": (tiny_with("Student: {losses: {ce: 1.0}}", "Student: {losses: {ce: {label_smoothing: 1.5}}}"),
                    ["label_smoothing = 1.5", "[0, 1]"]),
    "pipeline args": (with_recipe("{pipeline_args: {image_sise: 32}}"), ["pipeline_args ['image_sise']",
                                                                          "cifar_crop_flip", "image_size"]),
    "reported metric": (tiny_with("reported: {mean: 61.0}", "reported: {mean: 61.0, metric: mCE}"),
                        ["metric 'mCE'", "top1", "top5", "repro eval"]),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_name_or_domain_is_refused_at_load(case, tmp_path, capsys, workdirs):
    text, expected = BAD_VALUES[case]
    code, err = run_cli(["plan", write(tmp_path, text), "--no-estimate"], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in expected:
        assert part in err, (part, err)


def test_bad_tier_override_is_refused_naming_the_tier(tmp_path, capsys, workdirs):
    text = tiny_with("    epochs: 3\n", "    epochs: 3\n    schedule: {name: cosinee}\n")
    code, err = run_cli(["plan", write(tmp_path, text), "--no-estimate"], capsys)
    assert code == 2 and "tier 'smoke'" in err and "'cosinee'" in err and err.count("\n") == 1


def test_bad_value_refused_by_the_installed_command(tmp_path, workdirs):
    # The real `repro plan` process: exit 2, one line, no traceback.
    spec = write(tmp_path, BAD_VALUES["wttm gamma"][0])
    proc = subprocess.run([sys.executable, "-m", "repro", "plan", spec, "--no-estimate"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "gamma = -3" in proc.stderr


def test_every_shipped_spec_loads_and_plans_at_every_tier(workdirs):
    from repro.harness.plan import make_plan
    from repro.harness.spec import TIERS, all_spec_ids, load_spec

    for spec_id in all_spec_ids():
        spec = load_spec(spec_id)
        for tier in TIERS:
            assert make_plan(spec, tier).runs or all(c.method.reported_only for c in make_plan(spec, tier).cells)
