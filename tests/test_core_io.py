"""repro.core.io: the one atomic write, the one file hash, the one reading and cleaning of state dicts."""
from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from repro.core.io import (STATE_DICT_CONTAINERS, atomic_torch_save, atomic_write, atomic_write_bytes,
                           atomic_write_json, file_digests, is_state_dict, publish_folder, read_checkpoint, sha256_bytes, sha256_file,
                           strip_prefixes, unwrap_state_dict)
from repro.core.errors import ReproError
from repro.models.weights import REPDISTILLER_CONTAINERS, load_checkpoint


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = Tiny()
    model.bn.running_mean.normal_()
    return {k: v.clone() for k, v in model.state_dict().items()}


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------- atomic writes


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    atomic_write_json(target, {"top1": 1.0})
    before = target.read_bytes()

    def half_then_crash(handle) -> None:
        handle.write(b'{"top1": 2')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == before and temp_files(tmp_path) == []
    with pytest.raises(Exception):  # a lambda cannot be pickled: torch.save fails after writing its header
        atomic_torch_save(target, {"fn": lambda: None})
    assert target.read_bytes() == before and temp_files(tmp_path) == []


def test_every_write_is_fsynced_file_and_folder(tmp_path: Path, monkeypatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    for write in (lambda p: atomic_write_bytes(p, b"x"), lambda p: atomic_write_json(p, {"a": 1}),
                  lambda p: atomic_torch_save(p, {"w": torch.ones(2)})):
        synced.clear()
        write(tmp_path / "sub" / "file")
        assert len(synced) == (2 if os.name == "posix" else 1)  # the file, then its folder's entry


def test_written_files_are_shared_complete_and_in_the_store_format(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2, sort_keys=True) + "\n"
    assert path.stat().st_mode & 0o777 == 0o644
    atomic_torch_save(tmp_path / "w.pt", {"w": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True)["w"], torch.arange(3))


def test_a_published_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "smoke" / "images"

    def build(folder: Path) -> None:
        (folder / "train").mkdir()
        (folder / "train" / "a.txt").write_text("a")
        assert not target.exists()  # nobody sees the folder while it is being filled
        # A second builder racing this one publishes first; ours is discarded, theirs kept.
        publish_folder(target, lambda other: (other / "train").mkdir() or (other / "train" / "a.txt").write_text("b"))

    assert publish_folder(target, build) == target
    assert (target / "train" / "a.txt").read_text() == "b"
    assert target.stat().st_mode & 0o777 == 0o755
    publish_folder(target, lambda folder: pytest.fail("an existing folder is rebuilt"))

    def fails(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        publish_folder(tmp_path / "other", fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke"]  # no partial folder left behind
    assert sorted(p.name for p in (tmp_path / "smoke").iterdir()) == ["images"]
    empty = tmp_path / "made-by-hand"
    empty.mkdir()
    publish_folder(empty, lambda folder: (folder / "train").mkdir())
    assert (empty / "train").is_dir()  # an empty folder a user made is filled, as before


# ---------------------------------------------------------------------------------------------------- hashes


def test_hash_of_a_known_file(tmp_path: Path) -> None:
    path = tmp_path / "abc.txt"
    path.write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2, "abc"
    assert sha256_file(path) == sha256_bytes(b"abc") == expected
    assert file_digests(path, "md5", "sha256") == {"md5": "900150983cd24fb0d6963f7d28e17f72", "sha256": expected}
    big = tmp_path / "big.bin"  # more than one read chunk
    big.write_bytes(b"\x01" * (3 << 20))
    assert sha256_file(big) == sha256_bytes(big.read_bytes())


# ------------------------------------------------------------------------------------------------ state dicts


def test_is_state_dict_means_a_non_empty_mapping_of_names_to_tensors() -> None:
    assert is_state_dict({"w": torch.ones(1)})
    assert not is_state_dict({})
    assert not is_state_dict({"w": torch.ones(1), "epoch": 3})
    assert not is_state_dict({0: torch.ones(1)})
    assert not is_state_dict([torch.ones(1)])


# Every container/prefix format the loaders must accept, as each writer lays it out, and the keys it yields.
STATE = tiny_state()
FORMATS = {
    "bare (torchvision, timm, our run model.pt)": STATE,
    "RepDistiller {'model': sd, 'epoch'}": {"model": STATE, "epoch": 240},
    "DataParallel inside RepDistiller": {"model": prefixed(STATE, "module.")},
    "timm/MoCo {'state_dict': sd}": {"state_dict": STATE, "epoch": 3, "arch": "resnet"},
    "{'net': sd}": {"net": STATE},
    "{'module': sd}": {"module": STATE},
    "nested {'model': {'state_dict': sd}}": {"model": {"state_dict": STATE}},
    "DINO full checkpoint (teacher evaluated)": {
        "student": {**prefixed(STATE, "module.backbone."), "module.head.mlp.0.weight": torch.zeros(3)},
        "teacher": {**prefixed(STATE, "backbone."), "head.mlp.0.weight": torch.zeros(3)}, "epoch": 100},
    "DINO student only": {"student": prefixed(STATE, "module.backbone.")},
    "MoCo v3 (base and momentum encoders)": {"state_dict": {**prefixed(STATE, "module.base_encoder."),
                                                            **prefixed(STATE, "module.momentum_encoder.")}},
    "mdistiller distiller (student and teacher)": {"model": {**prefixed(STATE, "module.student."),
                                                             **prefixed(tiny_state(1), "module.teacher.")}},
    "torch.compile + DDP": prefixed(STATE, "module._orig_mod."),
    "this package's wrappers (TimmViT.vit, TimmCNN.net)": prefixed(STATE, "vit."),
    "a ViT wrapped twice": prefixed(STATE, "model.net."),
}


@pytest.mark.parametrize("name", FORMATS)
def test_every_container_and_prefix_format_gives_the_networks_own_keys(name: str, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(FORMATS[name], path)
    state = strip_prefixes(unwrap_state_dict(read_checkpoint(path), path), Tiny().state_dict().keys())
    own = {k: v for k, v in state.items() if k in STATE}
    assert set(own) == set(STATE) and all(torch.equal(own[k], STATE[k]) for k in STATE)
    model = Tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the classifier loaded: no warning says otherwise
        load_checkpoint(model, path)  # other networks in the file (momentum encoder, teacher, DINO head) ignored
    assert all(torch.equal(model.state_dict()[k], STATE[k]) for k in STATE)


def test_the_prefix_rule_keeps_other_networks_apart_and_asks_the_model() -> None:
    moco = strip_prefixes({**prefixed(STATE, "module.base_encoder."), **prefixed(STATE, "module.momentum_encoder.")})
    assert set(moco) == set(STATE) | {f"momentum_encoder.{k}" for k in STATE}
    # A network whose own submodule is called "encoder" keeps it.
    assert set(strip_prefixes({"encoder.weight": torch.ones(1)}, own_keys=["encoder.weight"])) == {"encoder.weight"}
    assert set(strip_prefixes({"encoder.weight": torch.ones(1)})) == {"weight"}
    # A prefix whose removal would merge two keys means something: it stays.
    collide = {"module.w": torch.ones(1), "w": torch.zeros(1)}
    assert strip_prefixes(collide).keys() == collide.keys()


def test_containers_restrict_the_format_and_a_key_names_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "net.pth"
    torch.save({"epoch": 240, "net": STATE}, path)
    with pytest.raises(ReproError, match="no 'model' entry") as err:
        unwrap_state_dict(read_checkpoint(path), path, REPDISTILLER_CONTAINERS)
    assert str(path) in str(err.value) and "epoch" in str(err.value) and "net" in str(err.value)
    assert unwrap_state_dict(read_checkpoint(path), path).keys() == STATE.keys()
    both = {"student": prefixed(STATE, "s."), "teacher": prefixed(STATE, "t.")}
    assert set(unwrap_state_dict(both, path)) == set(prefixed(STATE, "t."))  # DINO evaluates the teacher
    assert set(unwrap_state_dict(both, path, key="student")) == set(prefixed(STATE, "s."))
    with pytest.raises(ReproError, match="no key 'ema'"):
        unwrap_state_dict(both, path, key="ema")
    with pytest.raises(ReproError, match="not bare"):
        unwrap_state_dict({"model": STATE}, path, containers=())  # a run's model.pt is a bare state dict
    assert "state_dict" in STATE_DICT_CONTAINERS


def test_safetensors_files_are_read(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file(prefixed(STATE, "module."), str(tmp_path / "w.safetensors"))
    model = Tiny()
    load_checkpoint(model, tmp_path / "w.safetensors", strict=True)
    assert torch.equal(model.fc.weight, STATE["fc.weight"])


def test_unreadable_files_are_one_error_naming_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"<html>404</html>")
    with pytest.raises(ReproError, match="could not be read: corrupt") as err:
        read_checkpoint(junk)
    assert str(junk) in str(err.value)
    pickled = tmp_path / "last.pth"
    torch.save({"opt": argparse.Namespace(lr=0.1), "model": STATE}, pickled)
    with pytest.raises(ReproError, match="pickles argparse.Namespace, which is never unpickled") as err:
        read_checkpoint(pickled)
    assert str(pickled) in str(err.value)
    with pytest.raises(ReproError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")
