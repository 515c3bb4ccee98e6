"""`repro eval`: one record with every suite and its protocol, models from files / runs / names, clear errors."""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from repro.core.errors import ReproError
from repro.analyses.resolve import with_head
from repro.cli.evaluation import add_eval_parser, run_eval
from repro.models import create_model
from repro.harness.store import RunStore

SUITES = ("clean", "imagenet-c", "shape-bias", "top10")


def main(argv: list[str]) -> int:
    """`repro.cli.main` once `eval` is wired into it; until then the same contract (ReproError -> exit 2)."""
    import repro.cli

    if "eval" in repro.cli.COMMANDS:
        return repro.cli.main(argv)
    parser = argparse.ArgumentParser(prog="repro")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run_eval(args)
    except ReproError as err:
        print(f"error: {err}", file=__import__("sys").stderr)
        return 2


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A 1000-way smoke ViT (32 px): the shape-bias suite needs ImageNet's 1000 outputs."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save(create_model("vit_smoke_tiny", num_classes=1000).state_dict(), path)
    return str(path)


def test_eval_writes_one_record_with_all_four_suites(tiny_checkpoint, tmp_path):
    out = tmp_path / "records" / "tiny.json"
    code = main(["eval", tiny_checkpoint, "--arch", "vit_smoke_tiny", "--suite", ",".join(SUITES),
                 "--other", tiny_checkpoint, "--other-arch", "vit_smoke_tiny", "--corruptions", "gaussian_noise",
                 "--synthetic", str(tmp_path / "data"), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.json"]  # one record, no temp file left
    record = json.loads(out.read_text())
    assert set(record["suites"]) == set(SUITES)
    for name in SUITES:
        assert record["suites"][name]["protocol"], name  # every metric carries its protocol
    assert record["model"]["source"] == "checkpoint" and len(record["model"]["sha256"]) == 64
    assert record["model"]["arch"] == "vit_smoke_tiny" and record["model"]["head"] == "single"
    assert record["data"]["synthetic"] is True and record["data"]["corruptions"] == ["gaussian_noise"]
    assert record["options"]["image_size"] == 32  # the smoke ViT's input size, found from the model
    assert {"torch", "timm"} <= set(record["versions"]) and record["commit"] and record["device"] == "cpu"
    imagenet_c = record["suites"]["imagenet-c"]
    assert imagenet_c["complete_benchmark"] is False and set(imagenet_c["ce"]) == {"gaussian_noise"}
    assert 0.0 <= record["suites"]["shape-bias"]["shape_bias"] <= 1.0
    assert 0.0 <= record["suites"]["clean"]["top1"] <= 100.0
    assert len(set(record["top10_names"])) == 2  # the same model twice still gets two names


def _fake_run(store: RunStore, run_id: str, arch: str, num_classes: int) -> None:
    torch.manual_seed(1)
    model = create_model(arch, num_classes=num_classes)
    store.write_config(run_id, {"kind": "train", "tier": "smoke", "seed": 0,
                                "model": {"arch": arch, "num_classes": num_classes, "args": {}},
                                "recipe": {"pipeline": "cifar_crop_flip",
                                           "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}})
    torch.save(model.state_dict(), store.model_path(run_id))
    store.write_result(run_id, {"status": "done", "label": f"{arch} test run"})


def test_eval_of_a_run_by_prefix_writes_beside_the_run(tmp_path):
    store = RunStore(tmp_path / "runs")
    _fake_run(store, "abcdef0123456789", "resnet8", 10)
    code = main(["eval", "abcdef01", "--suite", "clean", "--synthetic", "--runs", str(store.root),
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    record = json.loads((store.run_dir("abcdef0123456789") / "eval-synthetic.json").read_text())
    assert record["model"]["source"] == "run" and record["model"]["run_id"] == "abcdef0123456789"
    assert record["options"]["mean"] == [0.5, 0.5, 0.5]  # the run's own normalisation
    assert record["options"]["image_size"] == 32  # the cifar_crop_flip pipeline's native size
    assert record["suites"]["clean"]["protocol"]["label_space"] == "folder"  # 10 outputs, 10 folders
    assert not (store.run_dir("abcdef0123456789") / "eval.json").exists()  # synthetic never overwrites real


@pytest.mark.parametrize("argv, message", [
    (["eval", "no_such_model_xyz", "--synthetic"], "not a run id in the store, not a file"),
    (["eval", "deit_tiny_patch16_224", "--synthetic"], "--pretrained"),
    (["eval", "resnet20", "--pretrained", "--synthetic"], "does not load --pretrained"),
    (["eval", "{ckpt}", "--synthetic"], "--arch"),
    (["eval", "{ckpt}", "--arch", "vit_smoke_tiny", "--suite", "clean,top10", "--synthetic"], "--other"),
    (["eval", "{ckpt}", "--arch", "vit_smoke_tiny", "--suite", "clean,no-such-suite"], "no-such-suite"),
    (["eval", "{ckpt}", "--arch", "vit_smoke_tiny", "--suite", "imagenet-c"], "--imagenet-c-root"),
    (["eval", "{ckpt}", "--arch", "resnet20", "--synthetic"], "does not fit"),
])
def test_bad_input_is_exit_2_with_one_clear_message(argv, message, tiny_checkpoint, tmp_path, capsys):
    argv = [a.format(ckpt=tiny_checkpoint) for a in argv] + ["--runs", str(tmp_path / "runs"), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_distilled_vit_heads_are_explicit_and_recorded():
    torch.manual_seed(0)
    model = create_model("vit_smoke_tiny_distilled", num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.vit.forward_features(x)
        cls, dist = model.vit.head(tokens[:, 0]), model.vit.head_dist(tokens[:, 1])
        by_head = {head: with_head(model, head) for head in ("cls", "dist", "avg")}
        assert torch.allclose(by_head["cls"][0](x), cls) and torch.allclose(by_head["dist"][0](x), dist)
        assert torch.allclose(by_head["avg"][0](x), model(x))  # DeiT's evaluation: the mean of both heads
    assert [by_head[h][1] for h in ("cls", "dist", "avg")] == ["cls", "dist", "avg"]
    assert with_head(model, None)[1] == "avg"
    plain = create_model("vit_smoke_tiny", num_classes=7)
    assert with_head(plain, None)[1] == "single"
    with pytest.raises(ReproError, match="one classifier head"):
        with_head(plain, "dist")
