"""Every run id of every spec at every tier, computed from the specs alone (no training, no files).

`python tests/pinned_run_ids.py > tests/data/run_ids.json` regenerates the pin; tests/test_run_ids.py compares.
A refactor must leave this map unchanged; a fix that changes a run's configuration changes its id on purpose,
and the commit that regenerates the pin lists which ids moved.
"""
from __future__ import annotations

import json
import os
import sys

TIERS = ("smoke", "proxy", "full")


def current_run_ids() -> dict[str, dict[str, dict[str, str]]]:
    os.environ.pop("REPRO_TEACHERS", None)  # the planner's teacher root must not come from the caller's shell
    from repro.harness.plan import make_plan
    from repro.harness.spec import all_spec_ids, load_spec

    ids: dict[str, dict[str, dict[str, str]]] = {}
    for spec_id in all_spec_ids():
        spec = load_spec(spec_id)
        ids[spec_id] = {}
        for tier in TIERS:
            plan = make_plan(spec, tier, None)
            ids[spec_id][tier] = {run.run_id: run.label for run in plan.ordered()}
    return ids


if __name__ == "__main__":
    json.dump(current_run_ids(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
