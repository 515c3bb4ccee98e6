"""Result bundles: the runs of a spec in one archive, to pool results across machines and labs.

``export_bundle`` writes a tar.gz with ``manifest.json`` (the sha256 of every file, each run's label, where the
bundle was made) and ``runs/<id>/{config.json, metrics.jsonl, result.json}`` (``model.pt`` with weights). A run's
``result.json`` carries its environment stamp (device, versions, commit, host).

``import_bundle`` verifies everything before writing anything: every file against the manifest, every run id
against the hash of its config, every result against its run id. Any mismatch refuses the whole bundle with one
line. It never replaces a result already in the store: a run id present with other numbers (the same config
trained on another machine can give other numbers) keeps the store's result, lists the conflict, and keeps the
bundle's result beside it under ``runs/<id>/conflicts/`` for inspection.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from repro.core.io import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file
from repro.core.errors import ReproError
from repro.harness.plan import Plan
from repro.harness.store import RunStore, run_id_of

FORMAT = "repro-bundle/1"
RUN_FILES = ("config.json", "metrics.jsonl", "result.json")
WEIGHTS = "model.pt"
# Result fields that describe how and where a run was computed, not what it computed: two results that differ
# only here hold the same numbers (not a conflict).
CIRCUMSTANTIAL = {"wall_time_s", "images_per_s", "hostname", "device_name", "commit", "versions", "label",
                 "overrides"}


@dataclass
class ExportSummary:
    path: Path
    runs: list[str]
    skipped: list[str]  # planned runs without a result (pending, running, interrupted): not exported


def export_bundle(plans: list[Plan], store: RunStore, out: Path, with_weights: bool = False) -> ExportSummary:
    import platform

    from repro.core.env import git_commit

    files: dict[str, bytes] = {}
    runs: dict[str, dict[str, Any]] = {}
    skipped = []
    for plan in plans:
        for run in plan.ordered():
            if run.run_id in runs or run.run_id in skipped:
                continue
            if store.result(run.run_id) is None:
                skipped.append(run.run_id)
                continue
            names = list(RUN_FILES) + ([WEIGHTS] if with_weights else [])
            present = [n for n in names if (store.run_dir(run.run_id) / n).is_file()]
            for name in present:
                files[f"runs/{run.run_id}/{name}"] = (store.run_dir(run.run_id) / name).read_bytes()
            runs[run.run_id] = {"label": run.label, "files": present}
    if not runs:
        raise ReproError(f"nothing to export: no run of {', '.join(p.spec.id for p in plans)} has a result in "
                         f"{store.root}")
    manifest = {
        "format": FORMAT, "specs": sorted({p.spec.id for p in plans}), "tiers": sorted({p.tier for p in plans}),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "commit": git_commit(), "with_weights": with_weights,
        "runs": runs, "files": {name: sha256_bytes(data) for name, data in sorted(files.items())},
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in [("manifest.json", _json_bytes(manifest)), *sorted(files.items())]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    atomic_write_bytes(out, buffer.getvalue())
    return ExportSummary(out, list(runs), skipped)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


@dataclass
class ImportSummary:
    imported: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)  # already in the store with the same numbers
    conflicts: list[str] = field(default_factory=list)  # one line each: which result was kept and why


def read_bundle(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the files of a bundle, every one verified; any problem is a ReproError naming it."""
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            members = tar.getmembers()
            files: dict[str, bytes] = {}
            for member in members:
                if not member.isfile():
                    raise ReproError(f"bundle {path}: {member.name!r} is not a plain file; refused, nothing imported")
                pure = PurePosixPath(member.name)
                if pure.is_absolute() or ".." in pure.parts:
                    raise ReproError(f"bundle {path}: unsafe path {member.name!r}; refused, nothing imported")
                extracted = tar.extractfile(member)
                files[member.name] = extracted.read() if extracted else b""
    except (OSError, tarfile.TarError, EOFError) as err:
        raise ReproError(f"bundle {path} is not a readable repro bundle ({err})") from None
    if "manifest.json" not in files:
        raise ReproError(f"bundle {path} has no manifest.json; refused, nothing imported")
    try:
        manifest = json.loads(files.pop("manifest.json"))
    except json.JSONDecodeError as err:
        raise ReproError(f"bundle {path}: manifest.json is not JSON ({err}); refused, nothing imported") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ReproError(f"bundle {path}: not a {FORMAT} manifest; refused, nothing imported")
    listed = manifest.get("files", {})
    for name in sorted(set(files) | set(listed)):
        if name not in listed:
            raise ReproError(f"bundle {path}: {name} is not in the manifest; refused, nothing imported")
        if name not in files:
            raise ReproError(f"bundle {path}: {name} is in the manifest but missing; refused, nothing imported")
        if sha256_bytes(files[name]) != listed[name]:
            raise ReproError(f"bundle {path}: {name} does not match its sha256 in the manifest (changed after "
                             f"export); refused, nothing imported")
    for run_id in manifest.get("runs", {}):
        _verify_run(path, run_id, files)
    return manifest, files


def _verify_run(path: Path, run_id: str, files: dict[str, bytes]) -> None:
    prefix = f"runs/{run_id}/"
    try:
        config = json.loads(files[prefix + "config.json"])
        result = json.loads(files[prefix + "result.json"])
    except KeyError as err:
        raise ReproError(f"bundle {path}: run {run_id} lacks {err.args[0]}; refused, nothing imported") from None
    except json.JSONDecodeError as err:
        raise ReproError(f"bundle {path}: run {run_id}: unreadable JSON ({err}); refused, nothing imported") from None
    if run_id_of(config) != run_id:
        raise ReproError(f"bundle {path}: run {run_id}: its config hashes to {run_id_of(config)}, not to its id; "
                         f"refused, nothing imported")
    if result.get("run_id") != run_id:
        raise ReproError(f"bundle {path}: run {run_id}: its result.json is of run {result.get('run_id')!r}; "
                         f"refused, nothing imported")


def same_numbers(a: dict[str, Any], b: dict[str, Any]) -> bool:
    strip = lambda r: {k: v for k, v in r.items() if k not in CIRCUMSTANTIAL}  # noqa: E731
    return strip(a) == strip(b)


def _origin(result: dict[str, Any]) -> str:
    return f"{result.get('hostname', '?')} @ {result.get('commit', '?')} (best top-1 {result.get('best_top1')})"


def import_bundle(path: Path, store: RunStore) -> ImportSummary:
    manifest, files = read_bundle(path)  # everything verified before the first write
    bundle_sha = sha256_file(path)
    summary = ImportSummary()
    for run_id in sorted(manifest.get("runs", {})):
        prefix = f"runs/{run_id}/"
        theirs = json.loads(files[prefix + "result.json"])
        ours = store.result(run_id)
        if ours is None and store.lock(run_id).is_held_live():
            summary.conflicts.append(f"run {run_id}: being trained here; kept the store's run, the bundle's result "
                                     f"({_origin(theirs)}) not imported")
            continue
        if ours is not None:
            if same_numbers(ours, theirs):
                summary.present.append(run_id)
                _add_weights_if_missing(store, run_id, files, prefix)
            else:
                kept = store.run_dir(run_id) / "conflicts" / f"{bundle_sha[:12]}.result.json"
                atomic_write_bytes(kept, files[prefix + "result.json"])
                summary.conflicts.append(
                    f"run {run_id}: the store has {_origin(ours)}, the bundle {_origin(theirs)}; kept the store's "
                    f"(an import never replaces a result), the bundle's is in {kept}")
            continue
        for name in [n for n in (*RUN_FILES[:-1], WEIGHTS) if prefix + n in files]:
            atomic_write_bytes(store.run_dir(run_id) / name, files[prefix + name])
        atomic_write_json(store.run_dir(run_id) / "origin.json",
                          {"bundle": str(path), "bundle_sha256": bundle_sha, "exported_from": manifest.get("host"),
                           "exported_at_commit": manifest.get("commit"),
                           "imported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        atomic_write_bytes(store.run_dir(run_id) / "result.json", files[prefix + "result.json"])  # last: done
        summary.imported.append(run_id)
    return summary


def _add_weights_if_missing(store: RunStore, run_id: str, files: dict[str, bytes], prefix: str) -> None:
    if prefix + WEIGHTS in files and not store.model_path(run_id).is_file():
        atomic_write_bytes(store.model_path(run_id), files[prefix + WEIGHTS])
