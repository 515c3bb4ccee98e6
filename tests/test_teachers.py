"""Teacher checkpoints: RepDistiller format round trip, clear errors, fetch from a tar, sha256 pinning."""
from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from repro.core.io import sha256_file
from repro.core.errors import ReproError
from repro.models import MODELS, create_model, model_names
from repro.models.weights import load_repdistiller, read_repdistiller_state
from repro.models.teachers import (
    BUNDLE_URL,
    SHIPPED_LOCK_PATH,
    EXPECTED_TEACHER_TOP1,
    TEACHER_ARCHS,
    fetch_teachers,
    read_lock,
    save_checkpoint_repdistiller,
    teacher_path,
    verify_teacher,
)

SMALL_TEACHERS = ("resnet56", "wrn_40_2")  # real teacher archs that are cheap to build and save


def cifar_zoo() -> list[str]:
    """Every model registered by the CIFAR family (``mobile_half`` is an alias of ``MobileNetV2``)."""
    model_names()  # imports the families
    return [n for n, f in MODELS.items() if f.__module__.startswith("repro.models.cifar.") and n != "mobile_half"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on shared CI cores


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default BN statistics too, so a load that skipped buffers would change the outputs."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def outputs(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return model(torch.randn(2, 3, 32, 32))


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """A local mdistiller-style tar: cifar_teachers/<arch>_vanilla/ckpt_epoch_240.pth; returns (url, outputs)."""
    source = tmp_path / "build" / "cifar_teachers"
    expected = {}
    for seed, arch in enumerate(SMALL_TEACHERS):
        model = randomised(create_model(arch), seed)
        save_checkpoint_repdistiller(model, teacher_path(arch, source))
        expected[arch] = outputs(model)
    archive = tmp_path / "cifar_teachers.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source, arcname="cifar_teachers")
    return archive.as_uri(), expected


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("arch", cifar_zoo())
def test_every_zoo_model_round_trips_through_repdistiller_format(arch: str, tmp_path: Path) -> None:
    model = randomised(create_model(arch, num_classes=10))
    path = save_checkpoint_repdistiller(model, tmp_path / f"{arch}_vanilla" / "ckpt_epoch_240.pth", epoch=7)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["epoch"] == 7 and set(raw["model"]) == set(model.state_dict())
    loaded = load_repdistiller(arch, path, num_classes=10)
    assert not loaded.training
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)


def test_bare_and_dataparallel_state_dicts_are_accepted(tmp_path: Path) -> None:
    model = randomised(create_model("resnet8"))
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    prefixed = tmp_path / "dp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, prefixed)
    for path in (bare, prefixed):
        torch.testing.assert_close(outputs(load_repdistiller("resnet8", path)), outputs(model))


def test_missing_num_batches_tracked_is_tolerated(tmp_path: Path) -> None:
    # Checkpoints from PyTorch < 0.4.1 have no BN batch counters; they do not affect inference.
    model = randomised(create_model("resnet8"))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": state}, tmp_path / "old.pth")
    torch.testing.assert_close(outputs(load_repdistiller("resnet8", tmp_path / "old.pth")), outputs(model))


# ---------------------------------------------------------------------------------------------------- errors


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    with pytest.raises(ReproError, match="not found") as err:
        load_repdistiller("resnet56", missing)
    assert str(missing) in str(err.value)
    with pytest.raises(ReproError) as err:
        verify_teacher("resnet56", missing, tmp_path / "lock.json")
    assert str(missing) in str(err.value)


def test_unreadable_checkpoint_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"<html>404 Not Found</html>" * 10)
    with pytest.raises(ReproError, match="could not be read") as err:
        load_repdistiller("resnet56", junk)
    assert str(junk) in str(err.value)


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint_repdistiller(create_model("resnet8"), tmp_path / "full.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ReproError, match="could not be read"):
        read_repdistiller_state(truncated)


def test_checkpoint_pickling_python_objects_is_not_unpickled(tmp_path: Path) -> None:
    # RepDistiller's *_last.pth files also pickle the argparse options; loading must not run arbitrary pickles.
    path = tmp_path / "last.pth"
    torch.save({"opt": argparse.Namespace(model="resnet8"), "model": create_model("resnet8").state_dict()}, path)
    with pytest.raises(ReproError, match="argparse.Namespace"):
        read_repdistiller_state(path)


def test_checkpoint_without_model_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"epoch": 240, "net": create_model("resnet8").state_dict()}, path)
    with pytest.raises(ReproError, match="no 'model' entry") as err:
        load_repdistiller("resnet8", path)
    assert "epoch" in str(err.value) and "net" in str(err.value)


def test_wrong_architecture_names_arch_and_keys(tmp_path: Path) -> None:
    path = save_checkpoint_repdistiller(create_model("resnet56"), tmp_path / "r56.pth")
    with pytest.raises(ReproError) as err:
        load_repdistiller("resnet110", path)
    message = str(err.value)
    assert "'resnet110'" in message and str(path) in message
    assert "weights missing" in message and "layer1.9." in message


def test_wrong_num_classes_reports_shape_mismatch(tmp_path: Path) -> None:
    path = save_checkpoint_repdistiller(create_model("resnet8", num_classes=10), tmp_path / "r8.pth")
    with pytest.raises(ReproError, match=r"shape mismatches .*fc\.weight: checkpoint \(10, 64\) vs model \(100, 64\)"):
        load_repdistiller("resnet8", path, num_classes=100)


# ---------------------------------------------------------------------------------------------- fetch + lock


def test_fetch_from_tar_records_lock_and_second_fetch_verifies(tmp_path: Path, bundle) -> None:
    url, expected = bundle
    dest, lock_path = tmp_path / "teachers", tmp_path / "teachers.lock.json"
    paths = fetch_teachers(dest, archs=SMALL_TEACHERS, lock_path=lock_path, urls=[url])
    lock = json.loads(lock_path.read_text())
    assert set(lock) == set(SMALL_TEACHERS)
    for arch in SMALL_TEACHERS:
        assert paths[arch] == teacher_path(arch, dest) == dest / f"{arch}_vanilla" / "ckpt_epoch_240.pth"
        assert lock[arch] == {
            "file": f"{arch}_vanilla/ckpt_epoch_240.pth",
            "sha256": sha256_file(paths[arch]),
            "source": url,
        }
        assert verify_teacher(arch, paths[arch], lock_path) == lock[arch]["sha256"]
        torch.testing.assert_close(outputs(load_repdistiller(arch, paths[arch])), expected[arch], rtol=0, atol=0)
    assert not any(p.name.startswith(".teachers-download") for p in dest.iterdir())  # staging cleaned up

    # The files are present and pinned: a second fetch needs no source at all and leaves the lock alone.
    before = lock_path.read_text()
    fetch_teachers(dest, archs=SMALL_TEACHERS, lock_path=lock_path, urls=[(tmp_path / "gone.tar").as_uri()])
    assert lock_path.read_text() == before


def test_flipped_byte_is_refused_by_sha256(tmp_path: Path, bundle) -> None:
    url, _ = bundle
    dest, lock_path = tmp_path / "teachers", tmp_path / "lock.json"
    path = fetch_teachers(dest, archs=["resnet56"], lock_path=lock_path, urls=[url])["resnet56"]
    recorded = read_lock(lock_path)["resnet56"]["sha256"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor data: torch would still load this file
    path.write_bytes(bytes(data))
    with pytest.raises(ReproError, match="sha256") as err:
        verify_teacher("resnet56", path, lock_path)
    message = str(err.value)
    assert recorded in message and sha256_file(path) in message and str(path) in message
    with pytest.raises(ReproError, match="sha256"):
        fetch_teachers(dest, archs=["resnet56"], lock_path=lock_path, urls=[url])


def test_download_that_differs_from_the_lock_is_refused(tmp_path: Path, bundle) -> None:
    url, _ = bundle
    lock_path = tmp_path / "lock.json"
    pinned = {"file": "resnet56_vanilla/ckpt_epoch_240.pth", "sha256": "0" * 64, "source": BUNDLE_URL}
    lock_path.write_text(json.dumps({"resnet56": pinned}))
    with pytest.raises(ReproError, match="expected 0{64}"):
        fetch_teachers(tmp_path / "teachers", archs=["resnet56"], lock_path=lock_path, urls=[url])
    assert read_lock(lock_path)["resnet56"] == pinned  # the lock is never rewritten to fit a new file


def test_fetch_falls_back_to_a_per_file_mirror(tmp_path: Path, bundle) -> None:
    url, _ = bundle
    mirror = tmp_path / "build" / "cifar_teachers"  # the bundle fixture's source tree, served per file
    template = mirror.as_uri() + "/{arch}_vanilla/ckpt_epoch_240.pth"
    lock_path = tmp_path / "lock.json"
    dead = (tmp_path / "dead.tar").as_uri()
    paths = fetch_teachers(tmp_path / "teachers", archs=["wrn_40_2"], lock_path=lock_path, urls=[dead, template])
    entry = read_lock(lock_path)["wrn_40_2"]
    assert entry["source"] == template.format(arch="wrn_40_2")
    assert entry["sha256"] == sha256_file(paths["wrn_40_2"])


def test_hand_placed_file_is_pinned_on_first_fetch(tmp_path: Path) -> None:
    dest, lock_path = tmp_path / "teachers", tmp_path / "lock.json"
    path = save_checkpoint_repdistiller(create_model("resnet56"), teacher_path("resnet56", dest))
    fetch_teachers(dest, archs=["resnet56"], lock_path=lock_path, urls=[])
    entry = read_lock(lock_path)["resnet56"]
    assert entry["sha256"] == sha256_file(path) and "local" in entry["source"]


def test_no_network_says_where_to_put_the_files(tmp_path: Path) -> None:
    dest = tmp_path / "teachers"
    unreachable = [(tmp_path / "nowhere.tar").as_uri(), tmp_path.as_uri() + "/{arch}.pth"]
    with pytest.raises(ReproError) as err:
        fetch_teachers(dest, archs=["resnet56", "vgg13"], lock_path=tmp_path / "lock.json", urls=unreachable)
    message = str(err.value)
    assert f"{dest}/<arch>_vanilla/ckpt_epoch_240.pth" in message
    assert str(teacher_path("vgg13", dest)) in message and BUNDLE_URL in message
    assert not (tmp_path / "lock.json").exists()


def test_verify_without_lock_entry_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint_repdistiller(create_model("resnet8"), tmp_path / "r8.pth")
    with pytest.raises(ReproError, match="no sha256 recorded for teacher 'resnet56'"):
        verify_teacher("resnet56", path, tmp_path / "lock.json")


# ------------------------------------------------------------------------------------------- shipped metadata


def test_shipped_lock_and_expected_accuracies() -> None:
    lock = read_lock(SHIPPED_LOCK_PATH)
    for arch, entry in lock.items():  # empty until the first real download; then every entry is complete
        assert arch in TEACHER_ARCHS and set(entry) == {"file", "sha256", "source"}
    assert set(TEACHER_ARCHS) == {"wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50"}
    assert set(EXPECTED_TEACHER_TOP1) <= set(model_names())
    assert EXPECTED_TEACHER_TOP1["resnet32x4"] == 79.42 and EXPECTED_TEACHER_TOP1["ResNet50"] == 79.34


# ------------------------------------------------------------------------------- where the locks and files live


def test_the_user_lock_lives_next_to_the_teachers_and_the_shipped_one_is_never_written(tmp_path: Path,
                                                                                        bundle) -> None:
    url, _ = bundle
    shipped = SHIPPED_LOCK_PATH.read_bytes()
    dest = tmp_path / "teachers"
    paths = fetch_teachers(dest, archs=["resnet56"], urls=[url])  # no lock_path: the teacher root's
    lock = read_lock(dest / "teachers.lock.json")
    assert lock["resnet56"]["sha256"] == sha256_file(paths["resnet56"])
    assert verify_teacher("resnet56", paths["resnet56"]) == lock["resnet56"]["sha256"]  # found beside the file
    assert SHIPPED_LOCK_PATH.read_bytes() == shipped
    with pytest.raises(ReproError, match="shipped with the package"):
        fetch_teachers(tmp_path / "other", archs=["resnet56"], lock_path=SHIPPED_LOCK_PATH, urls=[url])
    assert SHIPPED_LOCK_PATH.read_bytes() == shipped


def test_a_published_checksum_binds_every_download(tmp_path: Path, bundle, monkeypatch) -> None:
    import repro.models.teachers as teachers

    url, _ = bundle
    published = tmp_path / "published.lock.json"
    published.write_text(json.dumps({"resnet56": {"file": "resnet56_vanilla/ckpt_epoch_240.pth",
                                                  "sha256": "f" * 64, "source": "a publisher"}}))
    monkeypatch.setattr(teachers, "SHIPPED_LOCK_PATH", published)
    dest = tmp_path / "teachers"
    with pytest.raises(ReproError, match="expected f{64}"):  # the first download no longer defines the lock
        fetch_teachers(dest, archs=["resnet56"], urls=[url])
    assert not (dest / "teachers.lock.json").exists()
    assert teachers.lock_origin("resnet56") == "published checksum"
    assert "first download defined the lock" in teachers.lock_origin("vgg13")


def test_one_teacher_root_for_fetch_and_plan(tmp_path: Path, monkeypatch) -> None:
    import repro.models.teachers as teachers
    from repro.cli import main
    from repro.harness.plan import make_plan, teachers_root
    from repro.harness.spec import load_spec

    root = tmp_path / "elsewhere"
    monkeypatch.setenv("REPRO_TEACHERS", str(root))
    fetched = []
    monkeypatch.setattr(teachers, "fetch_teachers", lambda dest, **_: fetched.append(Path(dest)) or {})
    assert main(["teachers", "fetch"]) == 0
    spec = load_spec("wttm/cifar100-table1")
    assert fetched == [root.resolve()] == [teachers_root(spec.recipe_for("full"))]
    checkpoint = next(r for r in make_plan(spec, "full", 1).ordered() if r.config["kind"] == "eval").config["checkpoint"]
    assert Path(checkpoint["path"]).is_absolute() and Path(checkpoint["path"]).parent.parent == root.resolve()
    assert checkpoint["lock"] == str(root.resolve() / "teachers.lock.json")


def _teacher_runs(spec_id: str = "wttm/cifar100-table1") -> dict:
    from repro.harness.plan import make_plan
    from repro.harness.spec import load_spec

    plan = make_plan(load_spec(spec_id), "full", 1)
    return {r.config["model"]["arch"]: r for r in plan.ordered() if r.config["kind"] == "eval"}


def test_run_ids_do_not_depend_on_where_the_teachers_are_but_on_their_sha256(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("REPRO_TEACHERS", str(tmp_path / "a"))
    at_a = _teacher_runs()
    monkeypatch.setenv("REPRO_TEACHERS", str(tmp_path / "b"))
    at_b = _teacher_runs()
    assert {a: r.run_id for a, r in at_a.items()} == {a: r.run_id for a, r in at_b.items()}
    assert at_a["resnet56"].config["checkpoint"]["path"] != at_b["resnet56"].config["checkpoint"]["path"]
    assert at_a["resnet56"].config["checkpoint"]["sha256"] is None
    # The hash, once known (here from the lock, the file itself still absent), is part of the identity.
    lock = {"resnet56": {"file": "resnet56_vanilla/ckpt_epoch_240.pth", "sha256": "a" * 64, "source": "test"}}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "teachers.lock.json").write_text(json.dumps(lock))
    locked = _teacher_runs()
    assert locked["resnet56"].config["checkpoint"]["sha256"] == "a" * 64
    assert locked["resnet56"].run_id != at_b["resnet56"].run_id
    assert locked["vgg13"].run_id == at_b["vgg13"].run_id  # other teachers are unaffected
    # And with the file present, its own hash.
    path = save_checkpoint_repdistiller(create_model("resnet56"), teacher_path("resnet56", tmp_path / "b"))
    assert _teacher_runs()["resnet56"].config["checkpoint"]["sha256"] == sha256_file(path)


def test_a_run_refuses_a_checkpoint_that_changed_after_planning(tmp_path: Path, monkeypatch) -> None:
    from repro.harness.execute import load_eval_model

    root = tmp_path / "teachers"
    monkeypatch.setenv("REPRO_TEACHERS", str(root))
    path = save_checkpoint_repdistiller(randomised(create_model("resnet56"), 0), teacher_path("resnet56", root))
    fetch_teachers(root, archs=["resnet56"], urls=[])  # pins the hand-placed file in the root's lock
    run = _teacher_runs()["resnet56"]
    _, key = load_eval_model(run.config)
    assert key == sha256_file(path) == run.config["checkpoint"]["sha256"]
    save_checkpoint_repdistiller(randomised(create_model("resnet56"), 1), path)
    lock = read_lock(root / "teachers.lock.json")
    lock["resnet56"]["sha256"] = sha256_file(path)  # even with the lock rewritten by hand
    (root / "teachers.lock.json").write_text(json.dumps(lock))
    with pytest.raises(ReproError, match="planned for"):
        load_eval_model(run.config)


def test_tables_say_what_pins_the_teacher_checkpoints(tmp_path: Path, monkeypatch) -> None:
    from repro.harness.plan import make_plan
    from repro.harness.render.tables import stamp_lines
    from repro.harness.spec import load_spec

    root = tmp_path / "teachers"
    monkeypatch.setenv("REPRO_TEACHERS", str(root))
    path = save_checkpoint_repdistiller(create_model("resnet56"), teacher_path("resnet56", root))
    plan = make_plan(load_spec("wttm/cifar100-table1"), "full", 1)
    line = stamp_lines("full", [plan], [], "test")[-1]
    assert line.startswith("> Teacher checkpoints (sha256): ")
    assert f"resnet56 `{sha256_file(path)[:12]}`" in line and "vgg13 (not downloaded when planned)" in line
    assert "the first download defined the lock; the accuracy gate is the check" in line and "±0.5" in line
    smoke = make_plan(load_spec("wttm/cifar100-table1"), "smoke", 1)  # trained teachers: nothing to pin
    assert not any("Teacher checkpoints" in x for x in stamp_lines("smoke", [smoke], [], "test"))
