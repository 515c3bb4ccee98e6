"""The run store: ``runs/<run-id>/`` holds everything needed to audit one number.

- ``config.json``   the fully resolved config whose hash is the run id
- ``metrics.jsonl`` one line per epoch (lr, each loss term, test top-1/top-5, predictive entropy, wall time)
- ``checkpoint.pt`` the full state (model, optimizer, terms, epoch, every RNG state) after each epoch but the last
                    (``model.pt`` follows the last one; a run killed in between replays it exactly)
- ``model.pt``      the final weights (what a student run loads when this run is its teacher)
- ``result.json``   the outcome (best/last top-1, status, device, versions, commit, deviations)
- ``.lock``         held while a process trains the run (``repro.harness.locks``: one trainer per run, stale-lock recovery)
- ``job.json``      the executor job (local/slurm) last submitted for the run, for ``repro status``

Every write is atomic (``repro.core.io``: temp file + fsync + rename + fsync of the folder), so a run killed at
any moment leaves either the previous or the next complete file, never a torn one. In a multi-process run only
rank 0 writes (a write from another rank is a bug and raises).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from repro.core.io import atomic_write_bytes, atomic_write_json
from repro.core.errors import ReproError
from repro.harness.locks import RunLock

# Fields that say where things are on this machine, not what is computed: excluded from the run id.
NON_IDENTITY_PATHS = (("recipe", "data", "root"), ("recipe", "data", "download"), ("recipe", "teachers", "root"),
                      ("checkpoint", "path"), ("checkpoint", "lock"))  # a checkpoint is its file name and sha256


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


_ABSENT = object()
# Recipe fields added (or re-spelled) after run ids were first published, at the one value that computes what
# every earlier config computed: that value is hashed in its earlier form (absent, or the old spelling), so adding
# the field moved no run id. config.json always holds the full current form; any other value is hashed as it is
# (a new id). Every earlier result ran on CPU, where ``tf32`` has no effect and ``deterministic: true`` behaved
# as ``warn`` (no CPU kernel it used lacked a deterministic implementation).
LEGACY_IDENTITY: dict[tuple[str, ...], tuple[Any, Any]] = {
    ("recipe", "deterministic"): ("warn", True),
    ("recipe", "tf32"): (False, _ABSENT),
    ("recipe", "precise_bn_batches"): (None, _ABSENT),
    ("recipe", "teacher_cache_features"): (False, _ABSENT),
    ("recipe", "eval_every_epoch"): (True, _ABSENT),
}


def run_id_of(config: dict[str, Any]) -> str:
    identity = json.loads(canonical_json(config))
    for path in NON_IDENTITY_PATHS:
        node = _parent(identity, path)
        if isinstance(node, dict):
            node.pop(path[-1], None)
    for path, (current, legacy) in LEGACY_IDENTITY.items():
        node = _parent(identity, path)
        if isinstance(node, dict) and path[-1] in node and node[path[-1]] == current \
                and type(node[path[-1]]) is type(current):
            if legacy is _ABSENT:
                del node[path[-1]]
            else:
                node[path[-1]] = legacy
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


def _parent(identity: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = identity
    for key in path[:-1]:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return node


def _check_writer() -> None:
    # Every rank of a DDP run computes the same files; two writers would race on the same temp-and-rename.
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        raise RuntimeError("only rank 0 writes to the run store")


def default_store_root() -> Path:
    return Path(os.environ.get("REPRO_RUNS", "runs"))


class RunStore:
    def __init__(self, root: Optional[Path] = None) -> None:
        self.root = Path(root) if root is not None else default_store_root()

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def result(self, run_id: str) -> Optional[dict[str, Any]]:
        path = self.run_dir(run_id) / "result.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ReproError(f"run store: {path} is unreadable ({err}); move it away to re-run that run") from None

    def is_done(self, run_id: str) -> bool:
        result = self.result(run_id)
        return result is not None and result.get("status") == "done"

    def is_finished(self, run_id: str) -> bool:
        """Done or failed: a finished run is never run again (``--retry-failed`` re-runs failures)."""
        return self.result(run_id) is not None

    def config(self, run_id: str) -> Optional[dict[str, Any]]:
        path = self.run_dir(run_id) / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def write_config(self, run_id: str, config: dict[str, Any]) -> None:
        _check_writer()
        atomic_write_json(self.run_dir(run_id) / "config.json", config)

    def write_result(self, run_id: str, result: dict[str, Any]) -> None:
        _check_writer()
        atomic_write_json(self.run_dir(run_id) / "result.json", result)

    def clear_result(self, run_id: str) -> None:
        (self.run_dir(run_id) / "result.json").unlink(missing_ok=True)

    def write_metrics(self, run_id: str, history: list[dict[str, Any]]) -> None:
        _check_writer()
        lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
        atomic_write_bytes(self.run_dir(run_id) / "metrics.jsonl", lines.encode())

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        path = self.run_dir(run_id) / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def checkpoint_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "checkpoint.pt"

    def model_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "model.pt"

    def lock_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / ".lock"

    def lock(self, run_id: str) -> RunLock:
        """The run's lock: whoever holds it is the only process training the run."""
        return RunLock(self.lock_path(run_id))

    def write_job(self, run_id: str, job: dict[str, Any]) -> None:
        _check_writer()
        atomic_write_json(self.run_dir(run_id) / "job.json", job)

    def job(self, run_id: str) -> Optional[dict[str, Any]]:
        path = self.run_dir(run_id) / "job.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def run_ids(self) -> Iterator[str]:
        if self.root.is_dir():
            for child in sorted(self.root.iterdir()):
                if (child / "config.json").is_file():
                    yield child.name
