"""`ladder <command>`: every command is a module with `HELP`, `add_arguments(parser)` and `run(args)`.

Commands are found through the `ladder.commands` entry points (see pyproject.toml), so the core
package names none of the packages above it: conversion and the benchmarks plug themselves in.
"""

from __future__ import annotations

import argparse
import signal
import sys
from importlib.metadata import entry_points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ladder", description="Ladder-Residual transformers on CPU ranks")
    commands = parser.add_subparsers(dest="command", required=True)
    for entry in sorted(entry_points(group="ladder.commands"), key=lambda e: e.name):
        module = entry.load()
        sub = commands.add_parser(entry.name, help=module.HELP, description=module.HELP)
        sub.set_defaults(run=module.run)
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM ends a job as cleanly as Ctrl-C does
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(f"ladder {args.command}: stopped by a signal; every rank has ended and nothing half-written was left",
              file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
