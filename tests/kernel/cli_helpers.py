"""The dmflakey command, for the kernel tests of the command line.

``dmflakey()`` runs one call in a forked child of the test process: a process
of its own, with its own exit status, stdout and stderr (file descriptors 1
and 2, not Python objects), and the library's warnings printed to stderr as
the command prints them.  What it skips is a new interpreter's start-up and
imports, which under the guest's emulation cost 2.5 to 4 seconds a call.  The
command's module state (the feature cache, the control file) comes from the
test process, as in a long-lived user program; the ``python -m`` entry itself
is run by ``dmflakey_exec()`` (a real new interpreter), which the error-format
test uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

from dmflakey_ioctl.cli import main

from .helpers import REPO

TIMEOUT = 600.0


def dmflakey(*args: object) -> subprocess.CompletedProcess:
    """One call of the command in a forked child; output captured as text."""
    argv = [str(a) for a in args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            _child(argv, out.fileno(), err.fileno())
        status = _wait(pid, argv)
        texts = []
        for fh in (out, err):
            fh.seek(0)
            texts.append(fh.read().decode("utf-8", "replace"))
    return subprocess.CompletedProcess(["dmflakey", *argv], status, texts[0], texts[1])


def _child(argv: list, out: int, err: int) -> None:
    """In the fork: fds 1 and 2 onto the files, the command run, its status the exit status."""
    code = 70
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        with warnings.catch_warnings():   # the command's warnings on stderr, not in pytest's record
            warnings.simplefilter("default")
            warnings.showwarning = _print_warning
            code = main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _wait(pid: int, argv: list) -> int:
    """The child's exit status; killed (and the test failed) after TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"dmflakey {' '.join(argv)}: still running after {TIMEOUT:.0f} s")
        time.sleep(0.005)


def dmflakey_exec(*args: object) -> subprocess.CompletedProcess:
    """One call as ``python -m dmflakey_ioctl`` from the checkout's root: a new interpreter."""
    return subprocess.run([sys.executable, "-m", "dmflakey_ioctl", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)


def ok(*args: object) -> str:
    """stdout of a call that must succeed quietly."""
    proc = dmflakey(*args)
    assert (proc.returncode, proc.stderr) == (0, ""), f"dmflakey {' '.join(map(str, args))}: {proc}"
    return proc.stdout


def fails(status: int, *args: object, run=dmflakey) -> str:
    """The one stderr line of a call that must fail with status."""
    proc = run(*args)
    assert proc.returncode == status, f"dmflakey {' '.join(map(str, args))}: {proc}"
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]
