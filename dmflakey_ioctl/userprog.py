"""Running a program the user named: an fsck for every crash state, a check command.

The library itself runs no program but mkfs.  A program the caller names
explicitly (``fsck=["e2fsck", "-fn"]``, ``dmflakey explore --check CMD``) is run
here, with stdin from a pipe (no /dev/null needed) and its output captured.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from typing import Sequence, Tuple

from .errors import InvalidArgumentError, ProgramNotFoundError, program_start_error

__all__ = ["run_user_program", "require_program"]


def run_user_program(argv: Sequence[str], operation: str, timeout: float = 600.0
                     ) -> Tuple[int, str]:
    """(exit status, output) of argv; a program that cannot be started is ProgramNotFoundError."""
    if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
        raise InvalidArgumentError(operation, None, f"a program is an argv list of strings, got "
                                   f"{argv!r}")
    try:
        result = subprocess.run(list(argv), input=b"", stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, timeout=timeout)
    except FileNotFoundError as exc:
        if os.path.exists(argv[0]) or exc.filename not in (None, argv[0]):
            raise program_start_error(operation, None, argv[0], exc) from None
        raise ProgramNotFoundError(operation, argv[0], "no such program (not in PATH)",
                                   errno.ENOENT, program=argv[0]) from None
    except OSError as exc:
        raise program_start_error(operation, None, argv[0], exc) from None
    except subprocess.TimeoutExpired as exc:
        return -1, (exc.output or b"").decode("utf-8", "replace") + \
            f"\n(killed after {timeout:.0f} s)"
    return result.returncode, result.stdout.decode("utf-8", "replace")


def require_program(argv: Sequence[str], operation: str) -> None:
    """ProgramNotFoundError now, before any work, when argv's program cannot be found.

    For a program run many times later whose absence would otherwise show as
    every run failing (a check command of the explorer).
    """
    if not argv:
        raise InvalidArgumentError(operation, None, "the command is empty")
    if shutil.which(argv[0]) is None:
        raise ProgramNotFoundError(operation, argv[0], "no such program (not in PATH, or not "
                                   "executable)", errno.ENOENT, program=argv[0])
