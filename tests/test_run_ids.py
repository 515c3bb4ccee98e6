"""The run ids of every spec at every tier are pinned: a refactor must not move one.

A deliberate change of a run's configuration regenerates the pin (`python tests/pinned_run_ids.py >
tests/data/run_ids.json`) and its commit lists the ids that moved.
"""
import json
from pathlib import Path

from pinned_run_ids import current_run_ids

PINNED = Path(__file__).parent / "data" / "run_ids.json"


def test_every_run_id_is_pinned():
    pinned = json.loads(PINNED.read_text())
    current = current_run_ids()
    moved = []
    for spec_id in sorted(set(pinned) | set(current)):
        for tier in sorted(set(pinned.get(spec_id, {})) | set(current.get(spec_id, {}))):
            before = pinned.get(spec_id, {}).get(tier, {})
            after = current.get(spec_id, {}).get(tier, {})
            for run_id in sorted(set(before) ^ set(after)):
                side = "gone" if run_id in before else "new"
                moved.append(f"{spec_id} [{tier}] {side} {run_id}: {before.get(run_id) or after.get(run_id)}")
    assert not moved, "run ids moved:\n" + "\n".join(moved)
