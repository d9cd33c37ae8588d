"""Shared helpers of the kernel suite: unique names, the dmsetup oracle, scratch images."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

_counter = itertools.count()


def unique_name(prefix: str = "dmfi-t") -> str:
    """A device name no other test (or parallel process) uses."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def dmsetup(*args: str, check: bool = True) -> str:
    """The test-only oracle: what dmsetup says (the library never runs it)."""
    proc = subprocess.run(["dmsetup", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dmsetup {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def dm_names() -> set[str]:
    """Names of the dm devices sysfs shows (a device being deleted may vanish mid-read)."""
    names = set()
    for path in Path("/sys/block").glob("dm-*/dm/name"):
        try:
            names.add(os.fsdecode(path.read_bytes().rstrip(b"\n")))  # a name need not be UTF-8
        except OSError:
            continue
    return names
