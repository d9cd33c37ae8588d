"""The dmflakey command as a user runs it, for the kernel tests of the command line.

Every call is a new Python process.  The guest's root is read-only: scripts/vm
compiles the checkout on the host before it boots, so the calls find bytecode
(a per-test PYTHONPYCACHEPREFIX would make each call compile the whole standard
library, for PYTHONDONTWRITEBYTECODE is set in the guest).
"""

from __future__ import annotations

import subprocess
import sys

from .helpers import REPO


def dmflakey(*args: object) -> subprocess.CompletedProcess:
    """One call of the command from the checkout's root; output captured as text."""
    return subprocess.run([sys.executable, "-m", "dmflakey_ioctl", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def ok(*args: object) -> str:
    """stdout of a call that must succeed quietly."""
    proc = dmflakey(*args)
    assert (proc.returncode, proc.stderr) == (0, ""), f"dmflakey {' '.join(map(str, args))}: {proc}"
    return proc.stdout


def fails(status: int, *args: object) -> str:
    """The one stderr line of a call that must fail with status."""
    proc = dmflakey(*args)
    assert proc.returncode == status, f"dmflakey {' '.join(map(str, args))}: {proc}"
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]
