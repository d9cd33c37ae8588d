"""Kernel suite: root and a real dm-flakey.

Inside the test guest (DMFLAKEY_IN_GUEST=1, set by scripts/vm) or with
DMFLAKEY_REQUIRE_KERNEL=1 nothing here may skip: a test that cannot run fails,
and a run that skipped anything or passed nothing fails as a whole.  On any
other host without root or device-mapper the suite is skipped with the reason.
At the end of the session every dm device, loop device, mapper node and mount
that the suite left behind is reported as an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmflakey_ioctl.kernel.dm import check_device_mapper
from dmflakey_ioctl.errors import KernelSupportError

from .helpers import dm_names

REQUIRED = os.environ.get("DMFLAKEY_IN_GUEST") == "1" or os.environ.get("DMFLAKEY_REQUIRE_KERNEL") == "1"
KERNEL_DIR = Path(__file__).parent


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        check_device_mapper()
    except KernelSupportError as exc:
        return f"{exc} (run `make vm-test` to use the QEMU guest)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = unavailable_reason()
    for item in items:
        if KERNEL_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kernel)
            if reason and not REQUIRED:
                item.add_marker(pytest.mark.skip(reason=f"kernel suite: {reason}"))


_outcomes = {"passed": 0, "skipped": 0}


def pytest_runtest_logreport(report):
    if report.skipped:
        _outcomes["skipped"] += 1
    elif report.when == "call" and report.passed:
        _outcomes["passed"] += 1


def pytest_sessionfinish(session, exitstatus):
    if not REQUIRED or exitstatus not in (0, 5):
        return
    problem = None
    if _outcomes["skipped"]:
        problem = f"{_outcomes['skipped']} kernel test(s) skipped where skipping is not allowed"
    elif not _outcomes["passed"]:
        problem = "the kernel suite passed no test"
    if problem:
        session.config.get_terminal_writer().line(f"ERROR: {problem}", red=True)
        session.exitstatus = 1


def system_state() -> dict[str, set[str]]:
    """What the kernel holds right now, read from sysfs and procfs only."""
    dm = dm_names()
    loops = set()
    for p in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            loops.add(f"{p.parent.parent.name}:{p.read_text().strip()}")
        except OSError:
            continue
    mapper = {p.name for p in Path("/dev/mapper").iterdir()} if Path("/dev/mapper").is_dir() else set()
    # bytes: a mount whose path is not UTF-8 (a test makes one) must not break this check
    mounts = {os.fsdecode(line.split()[1]) for line in Path("/proc/self/mounts").read_bytes().splitlines()}
    return {"dm devices": dm, "loop devices": loops, "/dev/mapper nodes": mapper, "mounts": mounts}


@pytest.fixture(scope="session", autouse=True)
def no_leaks():
    """Fail the session when the suite leaves anything behind."""
    if unavailable_reason():
        yield
        return
    before = system_state()
    yield
    after = system_state()
    leaked = {k: sorted(after[k] - before[k]) for k in after if after[k] - before[k]}
    assert not leaked, f"the kernel suite leaked: {leaked}"

