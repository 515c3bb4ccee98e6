"""``repro specs`` (list the specs) and ``repro schema`` (the JSON Schema of a spec, for editor completion)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from repro.cli import command


@command("specs")
def cmd_specs(args: argparse.Namespace) -> int:
    from repro.harness.spec import all_spec_ids, load_spec

    for spec_id in all_spec_ids():
        spec = load_spec(spec_id, check_models=False)
        print(f"{spec_id:40s} -> tables/{spec.output}.md  {spec.table}: {spec.title}")
    return 0


@command("schema")
def cmd_schema(args: argparse.Namespace) -> int:
    from repro.harness.spec import json_schema

    text = json.dumps(json_schema(), indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def add_parsers(sub: Any) -> None:
    sub.add_parser("specs", help="list the specs")
    p = sub.add_parser("schema", help="write the JSON Schema of a spec (for editor completion)")
    p.add_argument("-o", "--output", default=None)
