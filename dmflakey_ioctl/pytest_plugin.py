"""pytest plugin (entry point ``dmflakey``): fixtures ``flakey`` and ``flakey_factory``.

pytest loads it in every session wherever the package is installed, so it
imports the library only when needed and never opens /dev/mapper/control
on a kernel without device-mapper.  Where root or dm-flakey is missing, tests
using the fixtures are skipped with the reason; inside the test guest
(DMFLAKEY_IN_GUEST=1) or with DMFLAKEY_REQUIRE_KERNEL=1 nothing is skipped, so
a broken set-up fails loudly.  At session start, devices left by crashed
runs of this pid namespace (their owning process is gone) are removed; the
ini option ``dmflakey_cleanup_stale = false`` turns that off.
"""

from __future__ import annotations

import functools
import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Sequence, Union

import pytest

if TYPE_CHECKING:
    from .flakey import Flakey

__all__ = ["flakey", "flakey_factory", "unavailable_reason", "DEFAULT_SIZE"]

DEFAULT_SIZE = 64 << 20
"""Image size when none is given (raised to the filesystem's minimum, e.g. 320 MiB for XFS)."""

_names = itertools.count()


def _required() -> bool:
    return "1" in (os.environ.get("DMFLAKEY_IN_GUEST"), os.environ.get("DMFLAKEY_REQUIRE_KERNEL"))


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """Why flakey devices cannot be made here (no root, no device-mapper, no dm-flakey), or None."""
    if os.geteuid() != 0:
        return "needs root"
    from .kernel import dm
    from .errors import DMFlakeyError, KernelSupportError
    from .flakey import check_device_mapper
    try:
        check_device_mapper()
        dm.target_version("flakey")  # loads dm-flakey if it is a module
    except KernelSupportError as exc:
        return str(exc)
    except DMFlakeyError:
        pass  # a kernel too old to answer the query: creating the device will tell
    return None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("dmflakey_cleanup_stale", type="bool", default=True,
                  help="dmflakey: remove the devices of crashed runs (of this pid namespace) at "
                  "session start (default true)")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove devices of crashed runs, where this machine has device-mapper and we are root.

    Only devices made in this pid namespace whose creating process is gone
    (see cleanup_stale): another container's devices are never touched.
    """
    if os.geteuid() != 0 or not session.config.getini("dmflakey_cleanup_stale"):
        return
    from .errors import DMFlakeyError
    from .flakey import check_device_mapper, cleanup_stale
    try:
        check_device_mapper()
    except DMFlakeyError:
        return
    errors: List[DMFlakeyError] = []
    try:
        removed = cleanup_stale(on_error=errors.append)
    except DMFlakeyError as failure:  # e.g. device-mapper refused the listing
        removed, errors = [], [failure]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if removed:
        reporter.write_line(f"dmflakey: removed {len(removed)} stale device(s) of crashed runs: "
                            f"{', '.join(removed)}")
    for error in errors:
        reporter.write_line(f"dmflakey: cannot remove a stale device: {error}")


FlakeyFactory = Callable[..., "Flakey"]


@pytest.fixture
def flakey_factory(tmp_path: Path) -> Iterator[FlakeyFactory]:
    """Make flakey devices on sparse images under tmp_path; all are torn down after the test.

    Call it as ``flakey_factory(name=None, fs_type="ext4", size=None,
    mkfs_options=None)``: the default name is unique, the default size
    DEFAULT_SIZE or the filesystem's minimum.  Teardown runs also when the
    test fails, unmounting what the test left mounted.
    """
    if not _required():
        reason = unavailable_reason()
        if reason:
            pytest.skip(f"dm-flakey fixtures: {reason}")
    from .errors import DMFlakeyError
    from .flakey import init_flakey
    from .fs import MIN_SIZE, FSType
    made: List[Flakey] = []

    def make(name: Optional[str] = None, fs_type: Union[FSType, str, None] = "ext4",
             size: Optional[int] = None,
             mkfs_options: Union[Sequence[str], str, None] = None) -> Flakey:
        if name is None:
            name = f"dmflakey-pytest-{os.getpid()}-{next(_names)}"
        if size is None:
            try:
                size = max(DEFAULT_SIZE, MIN_SIZE[FSType(fs_type)])
            except ValueError:  # no or an unknown filesystem: init_flakey says what is wrong
                size = DEFAULT_SIZE
        dev = init_flakey(name, str(tmp_path), fs_type, mkfs_options, size)
        made.append(dev)
        return dev

    yield make
    errors: List[DMFlakeyError] = []
    for dev in reversed(made):
        try:
            dev.teardown()
        except DMFlakeyError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def flakey(flakey_factory: FlakeyFactory) -> Flakey:
    """A flakey device with ext4 on a small image, letting all I/O through; torn down after."""
    return flakey_factory()
