"""``repro``: a thin command line over plan / run / report (and the tools around them).

One module per command group (``schema``, ``plan``, ``store``, ``teachers``, ``evaluation``, ``figures``), each
registering its commands with ``@command`` and its parsers in ``add_parsers``; the options they share are defined
once in ``repro.cli.options``. Bad input ends in one line ``error: ...`` on stderr and exit code 2, never a
traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Optional

from repro.core.errors import ReproError

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Command] = {}
# The command groups, in the order `repro --help` lists them.
GROUPS = ("schema", "plan", "store", "teachers", "evaluation", "figures")


def command(name: str) -> Callable[[Command], Command]:
    def add(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn

    return add


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repro", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        importlib.import_module(f"{__name__}.{group}").add_parsers(sub)
    return parser


def _import_groups() -> None:
    # At import (after ``command`` exists, which the groups use), so COMMANDS is complete for any caller.
    for group in GROUPS:
        importlib.import_module(f"{__name__}.{group}")


def main(argv: Optional[list[str]] = None) -> int:
    from repro.core.numerics import set_cublas_workspace

    set_cublas_workspace()  # before any CUDA work of this process (cost model, teacher gate, every run)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        from repro.harness.executors import prepare

        launched = prepare(args, argv)  # --nproc N: this process launches N workers and waits for them
        if launched is not None:
            return launched
        return COMMANDS[args.command](args)
    except ReproError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished runs are kept and the interrupted run resumes from its last checkpoint",
              file=sys.stderr)
        return 130


_import_groups()

if __name__ == "__main__":
    sys.exit(main())
