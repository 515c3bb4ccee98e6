"""The evaluation record: one JSON document per (model, suites, data, options) holding every metric with its
protocol, the model's identity (run id, checkpoint sha256 or pretrained tag; the head used for distilled ViTs),
the data, the options, library versions, commit and device; where it is written and its console summary.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from repro.analyses.resolve import LoadedModel
from repro.analyses.suite_config import EvalData, SuiteOptions, suite_config

RECORD_FORMAT = "repro-eval/1"


def evaluate_record(model: LoadedModel, suites: Sequence[str], data: EvalData, options: SuiteOptions,
                    device: torch.device, other: Optional[LoadedModel] = None, command: str = "",
                    arguments: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run the suites on the model and return the record (JSON-ready)."""
    from repro.analyses import SUITES
    from repro.core.env import environment

    runners = {name: SUITES.get(name) for name in suites}  # unknown names fail before any work
    data.check(list(suites))
    names = distinct_names(model.label, other.label) if other is not None else None
    cfg = suite_config(suites, data, options, other, names)
    results, seconds = {}, {}
    for name, suite in runners.items():
        if options.progress:
            print(f"[{model.label}] suite {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        results[name] = suite(model.module, cfg, device)
        seconds[name] = round(time.perf_counter() - started, 3)
    record_options = _recorded_options(options)
    return {
        "format": RECORD_FORMAT,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "arguments": arguments,
        "model": model.info,
        "other_model": other.info if other is not None else None,
        "top10_names": list(names) if names else None,
        "suites": results,
        "suite_wall_time_s": seconds,
        "data": data.as_record(),
        "options": record_options,
        **environment(device),
    }


def _recorded_options(options: SuiteOptions) -> dict[str, Any]:
    # JSON round trip, so that a record read back compares equal (tuples become lists).
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(options).items() if k != "progress"}))


def distinct_names(first: str, second: str) -> tuple[str, str]:
    return (first, second) if first != second else (f"{first} (A)", f"{second} (B)")


def default_record_path(model: LoadedModel, store: Any, synthetic: bool) -> Path:
    """Runs keep their record beside their results; a synthetic evaluation never overwrites a real one."""
    name = "eval-synthetic.json" if synthetic else "eval.json"
    if model.run_id is not None:
        return store.run_dir(model.run_id) / name
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in model.label)
    return Path("evals") / f"{slug}{'-synthetic' if synthetic else ''}.json"


def cached_record(path: Path, data: EvalData, suites: Sequence[str], options: SuiteOptions,
                  top10_names: Optional[tuple[str, str]]) -> Optional[dict[str, Any]]:
    """A record already written for the same data, options, suites and top-10 names (a finished run's weights
    never change, so the numbers would be the same)."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    same = (record.get("data") == data.as_record() and record.get("options") == _recorded_options(options)
            and set(suites) <= set(record.get("suites", {}))
            and record.get("top10_names") == (list(top10_names) if top10_names else None))
    return record if same else None


def summary_line(record: dict[str, Any]) -> str:
    """One headline number per suite for the console (the suite's registered ``headline``); the record holds
    everything."""
    from repro.analyses import SUITES

    parts = [SUITES.get(name).headline(result) if name in SUITES else name
             for name, result in record["suites"].items()]
    return f"{record['model'].get('run_id') or record['model'].get('arch')}: " + "; ".join(parts)
