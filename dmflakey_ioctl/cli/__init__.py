"""The ``dmflakey`` command: make, switch, inspect, record and remove devices from a shell.

Each call reads its device back from the kernel, so a later call works on what
an earlier one made, with no state file.  Devices made here are persistent: no
process owns them, so ``cleanup`` leaves them unless told ``--all``.  Exit
status 0 on success, 1 when the operation failed, 2 when the command line is
wrong; an error is one line on stderr (``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Optional, Sequence

from .. import __version__
from ..kernel.dm import check_device_mapper
from . import devices, logs
from .args import PROG, Parser, UsageError, parse_probability, parse_size
from .devices import table_features, table_mode

__all__ = ["main", "build_parser", "parse_size", "parse_probability", "table_mode",
           "table_features", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one subcommand per action."""
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an error")
    parser = Parser(prog=PROG, description="Make a file or block device drop, fail, delay or "
                    "corrupt I/O on command, record every write and replay it (device-mapper, "
                    "driven through ioctls).")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    devices.register(sub, common)
    logs.register(sub, common)
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one subcommand; returns the exit status (0 ok, 1 failed, 2 bad usage)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(args_list)
        if args.command == "create":
            devices.check_create(args, UsageError)
    except UsageError as exc:
        print(_one_line(str(exc)), file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if getattr(args, "needs_kernel", True):
            check_device_mapper()
        return int(args.handler(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, OSError):
            message = str(exc)
        else:
            message = f"internal error: {type(exc).__name__}: {exc}"
            if not args.debug:
                message += " (rerun with --debug for the traceback)"
        print(f"{PROG}: {_one_line(message)}", file=sys.stderr)
        return EXIT_FAILED
