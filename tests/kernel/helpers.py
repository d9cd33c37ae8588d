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
            names.add(path.read_text().strip())
        except OSError:
            continue
    return names


# When dm-flakey gained each newer feature: Linux's history, written here independently of the
# library's own table so that the tests check that table against it.
FLAKEY_FEATURE_RELEASE = {"error_reads": (6, 4), "random_read_corrupt": (6, 5),
                          "random_write_corrupt": (6, 5)}


def running_release() -> tuple[int, int]:
    """(major, minor) of the running kernel, e.g. (6, 1) for 6.1.0-57-amd64."""
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def kernel_has(feature: str) -> bool:
    """Whether the running kernel's dm-flakey has feature, by release."""
    return running_release() >= FLAKEY_FEATURE_RELEASE[feature]


def assert_refused(call, feature: str, name: str, table_before, data_unchanged) -> None:
    """call() must raise UnsupportedFeatureError naming feature, the release that added it and the
    running release, and change nothing: same live table, not suspended, no inactive table, and
    data_unchanged() (which reads the device again) true.

    table_before is what dm.table(name) returned before the call.
    """
    from dmflakey_ioctl.errors import UnsupportedFeatureError
    from dmflakey_ioctl.kernel import dm

    try:
        call()
    except UnsupportedFeatureError as err:
        since = ".".join(map(str, FLAKEY_FEATURE_RELEASE[feature]))
        running = os.uname().release
        assert (err.feature, err.since, err.running) == (feature, since, running), err
        assert feature in str(err) and since in str(err) and running in str(err) and name in str(err)
    else:
        raise AssertionError(f"{feature} on {os.uname().release} was not refused")
    info = dm.info(name)
    assert not info.suspended and not info.inactive_table and info.live_table, info
    assert dm.table(name) == table_before
    assert data_unchanged(), f"the data on {name} changed"
