"""SSTA end to end and the ``auto`` head choice inside ``ssta_attn``.

End to end: a tiny spec on the real SSTA base (``ssta/_imagenet``) goes through ``repro.harness.plan`` and
``repro.harness.execute``: a supervised teacher trained with CE, a teaching assistant pretrained without labels
(``masked_recon``), head selection inside the term, then the SSTA student, each with its result.json.
Term level: the decisive head of a teacher (CE importance) and of a label-free TA (feature or probe importance)
is found, cached, reported, and leaves every global RNG where it was.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from repro.core.errors import ReproError
from repro.data.batch import Batch
from repro.methods import Outputs, TermContext, get_term
from repro.models import create_model
from repro.harness.plan import make_plan
from repro.harness.execute import execute
from repro.harness.spec import load_spec
from repro.methods.attention_readings import AttentionCapture, attention_kl
from repro.methods.head_importance import last_blocks_features
from repro.harness.store import RunStore
from tests.support import silence_heads, tiny_ssta_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------------- end to end

TINY_SPEC = tiny_ssta_spec(
    "test/ssta-tiny", "tiny SSTA end to end", "test-ssta",
    methods={"SSTA": {"losses": {"ce": 1.0, "ssta_attn": {"weight": 1.0, "stop_epoch": 100, "stop_epoch_of": 300,
                                                          "head_batches": 2}}}},
    cells=[{"teacher": "deit_base_patch16_224", "student": "deit_tiny_patch16_224",
            "assistant": "vit_small_patch16_224.dino", "method": "SSTA", "reported": {"status": "not_transcribed"}}])


def test_ssta_end_to_end_through_planner_and_runner(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_DATA", str(tmp_path / "data"))
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(TINY_SPEC))
    plan = make_plan(load_spec(str(spec_file)), "smoke")
    (student_id,) = plan.cells[0].run_ids
    student = plan.runs[student_id]
    teacher_id, ta_id = student.config["teacher"]["run"], student.config["assistants"]["ta"]["run"]
    assert list(plan.runs)[-1] == student_id and set(student.deps) == {teacher_id, ta_id}
    assert set(plan.runs[ta_id].config["losses"]) == {"masked_recon"}

    store = RunStore(tmp_path / "runs")
    summary = execute(plan, store, torch.device("cpu"), progress=False)
    assert sorted(summary.done) == sorted(plan.runs) and not summary.failed
    results = {rid: json.loads((store.run_dir(rid) / "result.json").read_text()) for rid in plan.runs}
    assert all(r["status"] == "done" and 0 <= r["last_top1"] <= 100 for r in results.values())
    assert "loss_ce" not in store.metrics(ta_id)[0] and "loss_masked_recon" in store.metrics(ta_id)[0]
    assert store.metrics(teacher_id)[0].keys() >= {"loss_ce"}
    assert store.metrics(student_id)[0].keys() >= {"loss_ce", "loss_ssta_attn"}  # epoch 1 of 1: KD on

    # head selection ran inside the student's term: one cached choice for the teacher (CE through its
    # classifier) and one for the TA (label-free feature loss), each in the run store's analysis cache
    cached = [json.loads(p.read_text()) for p in (store.root / ".cache" / "analyses").glob("heads-*.json")]
    assert sorted(c["config"]["loss"] for c in cached) == ["ce", "feature"]
    assert all(c["config"]["scope"] == "layer" and len(c["selection"]["pairs"]) == 1 for c in cached)


# ------------------------------------------------------------------------------------------- the term

class BatchSource:
    """``ctx.sample_batches``: fixed batches, counting how many were drawn; each draw also moves the global RNGs,
    as RandAugment and mixup do in a real loader."""

    def __init__(self, count: int = 3, size: int = 4, classes: int = 5) -> None:
        generator = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(count):
            images = torch.randn(size, 3, 32, 32, generator=generator)
            labels = torch.randint(classes, (size,), generator=generator)
            self.batches.append(Batch(images=images, targets=labels, labels=labels, indices=torch.arange(size), epoch=1))
        self.drawn = 0

    def __call__(self, n: int):
        for batch in self.batches[:n]:
            torch.rand(3), random.random(), np.random.rand()
            self.drawn += 1
            yield batch


def _ctx(student, teacher, ta, source=None, cache_dir=None, epochs=4):
    return TermContext(student=student, teacher=teacher, num_classes=5, train_labels=torch.arange(12) % 5,
                       device=torch.device("cpu"), epochs=epochs, assistants={"ta": ta} if ta is not None else {},
                       sample_batches=source, cache_dir=cache_dir)


@pytest.fixture
def models():
    torch.manual_seed(3)
    student = create_model("vit_smoke_tiny", num_classes=5)
    teacher = create_model("vit_smoke_small", num_classes=5)  # 6 heads
    ta = create_model("vit_smoke_tiny", num_classes=0)  # an SSL TA: no classifier
    silence_heads(teacher, {3: 4})
    silence_heads(ta, {0: 0, 1: 0, 2: 0, 3: 2})
    return student, teacher, ta


def test_auto_heads_are_found_cached_reported_and_leave_the_rngs(tmp_path, models):
    student, teacher, ta = models
    source = BatchSource()
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    term = get_term("ssta_attn")(_ctx(student, teacher, ta, source, tmp_path), head_batches=2)
    after = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    assert torch.equal(after[0], torch.rand(2)) and after[1:] == (random.random(), np.random.rand())

    report = term.report()
    assert (report["heads"]["teacher"]["layer"], report["heads"]["teacher"]["heads"]) == (3, [4])
    assert (report["heads"]["ta"]["layer"], report["heads"]["ta"]["heads"]) == (3, [2])
    assert report["heads"]["teacher"]["loss"] == "ce" and report["heads"]["ta"]["loss"] == "feature"
    assert all(Path(h["cache_file"]).is_file() for h in report["heads"].values())
    assert source.drawn == 4  # two batches per model

    again = get_term("ssta_attn")(_ctx(student, teacher, ta, source, tmp_path), head_batches=2)
    assert source.drawn == 6  # only the first batch per model (its digest keys the cache), then the cache
    assert again.report()["heads"] == report["heads"]
    other_data = BatchSource(size=2)
    get_term("ssta_attn")(_ctx(student, teacher, ta, other_data, tmp_path), head_batches=2)
    assert other_data.drawn == 4  # other batches (another seed or dataset): selected again, not read


def test_any_layer_all_heads_and_given_heads(models):
    student, teacher, ta = models
    one_head = create_model("vit_smoke_small", num_classes=5)
    silence_heads(one_head, {1: 5})  # one head in the whole network carries signal
    term = get_term("ssta_attn")(_ctx(student, one_head, ta, BatchSource()), teacher_layer="auto", lam=0.0)
    assert (term.choices["teacher"].layer, term.choices["teacher"].heads) == (1, [5])
    assert term.report()["heads"]["teacher"]["scope"] == "global"

    term = get_term("ssta_attn")(_ctx(student, teacher, ta), head_rule="all", lam=0.0)  # no images needed
    assert term.choices["teacher"].heads == list(range(6))
    images = BatchSource().batches[0].images
    student.train()
    term.active(1)
    loss = term(Outputs(logits=student(images)), BatchSource().batches[0])
    student.eval()
    caps = [AttentionCapture(student, -1, [0]), AttentionCapture(teacher, -1, None, mode="mean")]
    with torch.no_grad():
        student(images), teacher(images)
        s, t = (c.pop() for c in caps)
    torch.testing.assert_close(loss, attention_kl(t, s), rtol=1e-4, atol=1e-6)

    given = get_term("ssta_attn")(_ctx(student, teacher, ta), teacher_head=[1, 3], ta_head=0, ta_layer=2)
    assert (given.choices["teacher"].heads, given.choices["ta"].layer) == ([1, 3], 2)


def test_label_free_ta_probe_and_its_errors(tmp_path, models):
    student, teacher, ta = models
    probe_file = tmp_path / "linear.pth"  # DINO's linear-weights layout, on the cls tokens of the last 2 blocks
    torch.save({"state_dict": {"module.linear.weight": torch.randn(5, 2 * 96), "module.linear.bias": torch.zeros(5)}},
               probe_file)
    term = get_term("ssta_attn")(_ctx(student, teacher, ta, BatchSource()), beta=0.0, ta_importance_loss="probe",
                                 ta_probe={"checkpoint": str(probe_file), "n_last_blocks": 2})
    assert (term.choices["ta"].layer, term.choices["ta"].heads) == (3, [2])
    # the default ("auto") prefers the published probe where one is given, and the label-free loss otherwise
    auto = get_term("ssta_attn")(_ctx(student, teacher, ta, BatchSource()), beta=0.0,
                                 ta_probe={"checkpoint": str(probe_file), "n_last_blocks": 2})
    assert auto.choices["ta"].record["loss"] == "probe" and auto.choices["ta"].heads == [2]
    plain = get_term("ssta_attn")(_ctx(student, teacher, ta, BatchSource()), beta=0.0)
    assert plain.choices["ta"].record["loss"] == "feature"
    with pytest.raises(ReproError, match="expects 192 input features"):
        get_term("ssta_attn")(_ctx(student, teacher, ta, BatchSource()), beta=0.0, ta_importance_loss="probe",
                              ta_probe={"checkpoint": str(probe_file)})
    with pytest.raises(ReproError, match="ta_importance_loss"):  # a label-free TA has no classifier for CE
        get_term("ssta_attn")(_ctx(student, teacher, ta, BatchSource()), ta_importance_loss="ce")
    with pytest.raises(ReproError, match="scores heads"):
        get_term("ssta_attn")(_ctx(student, teacher, ta, BatchSource()), head_rule="fixed", teacher_layer="auto")
    with pytest.raises(ReproError, match="head_options"):
        get_term("ssta_attn")(_ctx(student, teacher, ta, BatchSource()), head_options={"scope": "global"})


def test_dino_avgpool_features_interleave_cls_and_mean_patch(models):
    _, _, ta = models
    images = BatchSource().batches[0].images
    with torch.no_grad():
        features = last_blocks_features(ta, images, 1, avgpool=True)
        tokens = ta.vit.forward_features(images)
    torch.testing.assert_close(features[:, 0::2], tokens[:, 0])
    torch.testing.assert_close(features[:, 1::2], tokens[:, 1:].mean(dim=1))


def test_early_stop_scales_with_the_run(models):
    student, teacher, ta = models
    term = get_term("ssta_attn")(_ctx(student, teacher, ta, epochs=2), teacher_head=0, ta_head=0,
                                 stop_epoch=100, stop_epoch_of=300, ta_stop_epoch=None)
    assert term.report()["stop_epochs"] == {"teacher": 1, "ta": None}
    assert term._targets[0].active(1) and not term._targets[0].active(2) and term._targets[1].active(2)


def _rank_chooses(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(3)  # the same models on every rank, as DDP replicas are
        student = create_model("vit_smoke_tiny", num_classes=5)
        teacher = create_model("vit_smoke_small", num_classes=5)
        ta = create_model("vit_smoke_tiny", num_classes=0)
        silence_heads(teacher, {3: 4} if rank == 0 else {3: 1})  # each rank alone would choose differently
        term = get_term("ssta_attn")(_ctx(student, teacher, ta, BatchSource(size=2 + rank)), lam=0.0)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(term.report()["heads"]["teacher"]["heads"]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~40 s on the shared 2-core machine, mostly imports
def test_distributed_ranks_distil_rank_zeros_heads(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank_chooses, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    heads = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert heads == [[4], [4]]
