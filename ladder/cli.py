"""`ladder <command>`: every command is a module with `HELP`, `add_arguments(parser)` and `run(args)`.

Commands are found through the `ladder.commands` entry points (see pyproject.toml), so the core
package names none of the packages above it: conversion and the benchmarks plug themselves in.

Whatever a command refuses ends here as one line naming the problem and exit code 2 (1 when ranks
failed for another reason), printed once however many ranks the job has; `--debug` shows the
traceback instead. SIGTERM ends a job as Ctrl-C does: every rank stops and one line says so.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from importlib.metadata import entry_points

from ladder.comm import CommunicationError
from ladder.launcher import LaunchError

BAD_INPUT = (ValueError, OSError)  # every error the library raises about a file, flag or field is one
MESSAGE_CHARS = 2000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ladder", description="Ladder-Residual transformers on CPU ranks")
    commands = parser.add_subparsers(dest="command", required=True)
    for entry in sorted(entry_points(group="ladder.commands"), key=lambda e: e.name):
        module = entry.load()
        sub = commands.add_parser(entry.name, help=module.HELP, description=module.HELP)
        sub.set_defaults(run=module.run)
        module.add_arguments(sub)
        sub.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(f"ladder {args.command}: stopped by a signal; every rank has ended and nothing half-written was left",
              file=sys.stderr)
        return 130
    except (*BAD_INPUT, CommunicationError, LaunchError) as exc:
        if args.debug:
            raise
        cause = (exc.cause or exc) if isinstance(exc, LaunchError) else exc
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line for the whole job
            print(f"ladder {args.command}: error: {one_line(cause)}", file=sys.stderr)
        return 2 if isinstance(cause, BAD_INPUT) else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def one_line(exc: BaseException) -> str:
    """The exception's message on one line, cut to a readable length."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + " ..."


if __name__ == "__main__":
    sys.exit(main())
