"""One run on several processes: batch mapping, sharded loaders, global-batch BatchNorm, exact distributed
evaluation, and the end-to-end equivalence of 2 gloo processes x 32 with 1 process x 64."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from repro.train import distributed
from repro.data import ImageTensorDataset
from repro.data.imagefolder import write_synthetic_imagefolder
from repro.data.loader import TensorLoader
from repro.data.pipelines_folder import build_folder_pipeline
from repro.data.pipelines_transfer import build_transfer_pipeline
from repro.data.batch import rank_bounds
from repro.train.distributed import BatchMapping, GlobalBatchNorm, ScaleOptions, map_batch, split_batch
from repro.core.errors import ReproError
from tests.conftest import TESTS

DDP_SPEC = str(TESTS / "specs" / "tiny_ddp.yaml")
FOLDER_SPEC = str(TESTS / "specs" / "tiny_ddp_folder.yaml")
TRANSFER_SPEC = str(TESTS / "specs" / "tiny_ddp_transfer.yaml")
QUIET = ["--no-progress", "--no-estimate"]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _dataset(count: int, classes: int = 5, seed: int = 0) -> ImageTensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, classes, (count,), generator=generator)
    return ImageTensorDataset(images=images, labels=labels, num_classes=classes, name="random", fingerprint="x")


# -- the batch mapping --------------------------------------------------------------------------------------------
def test_mapping_keeps_the_global_batch():
    assert map_batch(64, 1) == BatchMapping(1, 64, 64, 1, 64)
    assert map_batch(64, 2).fields() == {"world_size": 2, "global_batch": 64, "per_device_batch": 32,
                                         "grad_accum_steps": 1}
    capped = map_batch(64, 2, ScaleOptions(max_device_batch=12))
    assert (capped.per_device_batch, capped.grad_accum_steps) == (8, 4)  # 32 per rank = 4 micro-batches of 8
    assert capped.per_device_batch * capped.grad_accum_steps * capped.world_size == 64


def test_mapping_refuses_a_world_size_that_cannot_keep_the_batch_unless_told_to_rescale():
    with pytest.raises(ReproError, match="cannot be split evenly over 3 processes.*--rescale-batch"):
        map_batch(64, 3)
    rescaled = map_batch(64, 3, ScaleOptions(rescale_batch=True))
    assert rescaled.rescaled and rescaled.global_batch == 63 and rescaled.per_device_batch == 21


def test_tail_too_small_for_the_world_is_refused():
    def loader(count: int, drop_last: bool = False) -> TensorLoader:
        return TensorLoader(_dataset(count), 64, MEAN, STD, train=True, augment=False, seed=0, device="cpu",
                            drop_last=drop_last)

    distributed.check_tail(loader(123), map_batch(64, 2))  # tail 59: fine
    with pytest.raises(ReproError, match="last batch holds 1 of 65"):
        distributed.check_tail(loader(65), map_batch(64, 2))
    distributed.check_tail(loader(65, drop_last=True), map_batch(64, 2))  # the tail is never trained


def test_rank_shares_are_contiguous_and_cover_everything():
    for count in range(0, 12):
        for world in (1, 2, 3, 5):
            shares = [rank_bounds(count, r, world) for r in range(world)]
            assert shares[0][0] == 0 and shares[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
            assert max(s[1] - s[0] for s in shares) - min(s[1] - s[0] for s in shares) <= 1


# -- sharded loaders ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
def test_sharded_batches_put_together_are_the_single_process_batches(train):
    data = _dataset(23)
    loader = TensorLoader(data, 8, MEAN, STD, train=train, augment=train, seed=3, device="cpu")
    shards = [loader.shard(r, 3) for r in range(3)]
    for epoch in (1, 2):
        for view in (loader, *shards):
            view.set_epoch(epoch)
        whole = list(loader)
        parts = [list(s) for s in shards]
        assert all(len(p) == len(whole) == 3 for p in parts)
        for number, batch in enumerate(whole):
            pieces = [p[number] for p in parts]
            assert sum(int(p.labels.numel()) for p in pieces) == loader.global_batch_size(number)
            assert torch.equal(torch.cat([p.indices for p in pieces]), batch.indices)
            assert torch.equal(torch.cat([p.images for p in pieces]), batch.images)
            if train:
                assert torch.equal(torch.cat([p.views for p in pieces]), batch.views)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """The smoke ImageFolder layout: 4 classes x 9 training, x 5 val JPEGs of 36 px."""
    return write_synthetic_imagefolder(tmp_path_factory.mktemp("folder"), classes=4, per_class=9, size=36, seed=0,
                                       val_per_class=5)


def _assert_shards_make_the_batches(loader, world: int, epoch: int) -> None:
    """Rank views of ``loader`` yield slices of each global batch that put together are the single-process batch
    (images, soft targets, labels, indices: exactly, bit for bit)."""
    shards = [loader.shard(r, world) for r in range(world)]
    for view in (loader, *shards):
        view.set_epoch(epoch)
    whole = list(loader)
    parts = [list(s) for s in shards]
    assert len(whole) == len(loader) and all(len(p) == len(whole) for p in parts)
    for number, batch in enumerate(whole):
        pieces = [p[number] for p in parts]
        assert [int(p.labels.numel()) for p in pieces] == [b - a for a, b in
                                                           (rank_bounds(loader.global_batch_size(number), r, world)
                                                            for r in range(world))]
        for name in ("images", "targets", "labels", "indices", "host_indices"):
            assert torch.equal(torch.cat([getattr(p, name) for p in pieces]), getattr(batch, name)), (number, name)


@pytest.mark.parametrize("name, options", [
    ("imagenet_standard", {}),  # the last, partial batch kept (36 = 10 + 10 + 10 + 6)
    ("deit", {}),  # RandAugment, random erasing, repeated augmentation, mixup/cutmix switching, smoothing
    ("deit", {"mixup": 0.0, "repeated_aug": 1}),  # CutMix on every batch: boxes cut from other ranks' images
])
def test_folder_shards_put_together_are_the_single_process_batches(image_folder, name, options):
    train, test, *_ = build_folder_pipeline(name, image_folder, 32, 10, seed=4, device="cpu", **options)
    for world in (2, 3):  # 3: uneven, odd slices (mixup pairs an image with one on another rank)
        _assert_shards_make_the_batches(train, world, epoch=2)
        _assert_shards_make_the_batches(test, world, epoch=1)
    if train.mixup is not None:  # the mixing really happened (soft targets of two classes)
        train.set_epoch(2)
        assert any(((b.targets > 0.2).sum(1) > 1).any() for b in train)


def test_transfer_shards_put_together_are_the_single_process_batches():
    data = _dataset(30, classes=5, seed=1)
    bundle = build_transfer_pipeline(data, _dataset(7, classes=5, seed=2), 10, 4, seed=0, device=torch.device("cpu"),
                                     image_size=16, re_prob=0.0)
    _assert_shards_make_the_batches(bundle.train, 2, epoch=1)
    _assert_shards_make_the_batches(bundle.test, 2, epoch=1)


def test_split_batch_cuts_every_per_image_tensor():
    loader = TensorLoader(_dataset(10), 10, MEAN, STD, train=True, augment=True, seed=0, device="cpu")
    batch = next(iter(loader))
    pieces = split_batch(batch, 3)
    assert [int(p.labels.numel()) for p in pieces] == [4, 3, 3]
    assert torch.equal(torch.cat([p.views for p in pieces]), batch.views)
    assert all(p.epoch == batch.epoch for p in pieces)


def test_global_batchnorm_keeps_state_dict_names_and_is_plain_bn_on_one_process():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    converted = distributed.convert_global_batchnorm(net)
    assert isinstance(converted[1], GlobalBatchNorm)
    assert list(converted.state_dict()) == list(reference)
    x = torch.randn(6, 3, 8, 8)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    plain.load_state_dict(reference)
    assert torch.equal(converted(x), plain(x))  # no process group: exactly BatchNorm


# -- two gloo processes (spawned) ---------------------------------------------------------------------------------
def _gloo_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.manual_seed(0)
    # Global-batch BatchNorm: 7 images split 4 + 3; forward, backward and running statistics.
    x = torch.randn(7, 3, 5, 5)
    weights = torch.randn(7, 4, 5, 5)
    net = distributed.convert_global_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    lo, hi = rank_bounds(7, rank, world)
    mine = x[lo:hi].clone().requires_grad_(True)
    out = net(mine)
    (out * weights[lo:hi]).sum().backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)  # what DDP does (before its 1/world average)
    torch.save({"out": out.detach(), "input_grad": mine.grad, "grads": grads, "state": net.state_dict()},
               Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned gloo processes: the heaviest of the fast suite, so `make test-all` only
def test_global_batchnorm_on_two_gloo_processes_is_batchnorm_on_the_whole_batch(tmp_path):
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    torch.manual_seed(0)
    x = torch.randn(7, 3, 5, 5).requires_grad_(True)
    weights = torch.randn(7, 4, 5, 5)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    out = net(x)
    (out * weights).sum().backward()
    assert torch.allclose(torch.cat([r["out"] for r in ranks]), out.detach(), atol=1e-5)
    assert torch.allclose(torch.cat([r["input_grad"] for r in ranks]), x.grad, atol=1e-5)
    for name, p in net.named_parameters():
        for r in ranks:
            assert torch.allclose(r["grads"][name], p.grad, atol=1e-5), name
    for key, value in net.state_dict().items():
        for r in ranks:
            assert torch.allclose(r["state"][key].float(), value.float(), atol=1e-6), key


# -- end to end: `repro run --nproc 2` -----------------------------------------------------------------------------
def _repro(store: Path, data: Path, *args: str, threads: int = 1, spec: str = DDP_SPEC) -> subprocess.Popen:
    env = {**os.environ, "REPRO_RUNS": str(store), "REPRO_DATA": str(data), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "repro", "run", spec, "--tier", "smoke", *QUIET, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _wait_gone(pids: list[int]) -> None:
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.05)


def _result(store: Path) -> dict:
    [path] = list(store.glob("*/result.json"))
    return json.loads(path.read_text())


def _weights(store: Path) -> dict:
    [path] = list(store.glob("*/model.pt"))
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """The tiny run on 1 process at global batch 64 (shared by the multi-process tests)."""
    root = tmp_path_factory.mktemp("single")
    _finish(_repro(root / "runs", root / "data"))
    return root


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
def test_two_processes_at_32_train_the_same_weights_as_one_at_64(single_process_run, tmp_path):
    runs = tmp_path / "runs"
    out = _finish(_repro(runs, single_process_run / "data", "--nproc", "2"))
    assert out.count("1 trained") == 1  # rank 0 alone prints
    multi, single = _result(runs), _result(single_process_run / "runs")
    assert {k: multi[k] for k in ("world_size", "global_batch", "per_device_batch", "grad_accum_steps")} == \
        {"world_size": 2, "global_batch": 64, "per_device_batch": 32, "grad_accum_steps": 1}
    assert multi["sync_batchnorm"] is True and single["world_size"] == 1
    assert not any("BatchNorm" in d for d in multi["deviations"])  # equivalent recipe: nothing to stamp
    # Same data order and global-batch statistics: the same weights up to float reduction order (per-device
    # BatchNorm, or a wrong loss scale on the uneven last batch, moves them by 1e-2).
    assert _max_difference(_weights(runs), _weights(single_process_run / "runs")) < 1e-3
    assert multi["last_top1"] == single["last_top1"]
    metrics = [json.loads(line) for line in next(runs.glob("*/metrics.jsonl")).read_text().splitlines()]
    reference = [json.loads(line) for line in next((single_process_run / "runs").glob("*/metrics.jsonl"))
                 .read_text().splitlines()]
    for row, ref in zip(metrics, reference):
        assert row["loss_ce"] == pytest.approx(ref["loss_ce"], rel=1e-4)
        # 15 test images split 8 + 7 over the ranks: each counted exactly once, the same accuracy.
        assert row["test_images"] == ref["test_images"] == 15
        assert row["test_top1"] == ref["test_top1"]


@pytest.mark.slow
def test_a_run_interrupted_on_two_processes_resumes_on_one(single_process_run, tmp_path):
    runs = tmp_path / "runs"
    proc = _repro(runs, single_process_run / "data", "--nproc", "2")
    deadline = time.time() + 300
    while time.time() < deadline and not list(runs.glob("*/checkpoint.pt")):
        time.sleep(0.02)
    workers = _children(proc.pid)  # the elastic launcher starts each worker in a session of its own
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    _wait_gone(workers)
    if list(runs.glob("*/result.json")):
        pytest.skip("the run finished before it could be interrupted (machine too fast for this test)")
    checkpoint = torch.load(next(runs.glob("*/checkpoint.pt")), weights_only=False)
    assert checkpoint["mapping"]["world_size"] == 2
    _finish(_repro(runs, single_process_run / "data"))  # resume the same run id at world size 1
    resumed = _result(runs)
    assert resumed["world_size"] == 1
    assert _max_difference(_weights(runs), _weights(single_process_run / "runs")) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("spec, options", [
    (FOLDER_SPEC, []),  # imagenet_standard
    (FOLDER_SPEC, ["--set", "recipe.pipeline=deit", "--set", "recipe.pipeline_args.drop_last=true"]),  # RandAugment,
    # random erasing, repeated augmentation, mixup/cutmix, label smoothing
    (TRANSFER_SPEC, []),  # cifar_transfer through the deit recipe
], ids=["imagenet_standard", "deit", "cifar_transfer"])
def test_folder_pipelines_on_two_processes_train_the_same_weights_as_one(tmp_path, spec, options):
    data = tmp_path / "data"
    _finish(_repro(tmp_path / "one", data, *options, spec=spec))
    _finish(_repro(tmp_path / "two", data, *options, "--nproc", "2", spec=spec))
    multi, single = _result(tmp_path / "two"), _result(tmp_path / "one")
    assert (multi["world_size"], multi["global_batch"], multi["per_device_batch"]) == (2, 12, 6)
    assert multi["sync_batchnorm"] is True and single["world_size"] == 1
    # Each rank's slice of each global batch is the single process's, augmentation and mixing included.
    assert _max_difference(_weights(tmp_path / "two"), _weights(tmp_path / "one")) < 1e-3
    assert multi["last_top1"] == single["last_top1"]
