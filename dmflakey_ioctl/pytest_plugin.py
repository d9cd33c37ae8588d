"""pytest plugin (entry point ``dmflakey``): fixtures ``flakey``, ``flakey_factory``,
``crash_recorder`` and ``crash_recorder_factory``.

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
    from .crashreport import CrashReport
    from .flakey import Flakey
    from .recording import Recording
    from .writelog import WriteLog

__all__ = ["flakey", "flakey_factory", "crash_recorder", "crash_recorder_factory", "CrashRecorder",
           "unavailable_reason", "DEFAULT_SIZE"]

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
    _skip_without_kernel("dm-flakey fixtures")
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
    _teardown_all(made)


def _skip_without_kernel(what: str) -> None:
    if not _required():
        reason = unavailable_reason()
        if reason:
            pytest.skip(f"{what}: {reason}")


def _teardown_all(made: Sequence[object]) -> None:
    """Tear down everything made, newest first; the first error is raised once all were tried."""
    from .errors import DMFlakeyError
    errors: List[DMFlakeyError] = []
    for thing in reversed(made):
        try:
            thing.teardown()  # type: ignore[attr-defined]
        except DMFlakeyError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def flakey(flakey_factory: FlakeyFactory) -> Flakey:
    """A flakey device with ext4 on a small image, letting all I/O through; torn down after."""
    return flakey_factory()


class CrashRecorder:
    """A recording device for one test, mounted at ``mount_point``; explore it after the workload.

    ``explore(check, **options)`` stops the recording, checks every crash
    state (see :func:`dmflakey_ioctl.explore`), writes the HTML report next to
    the test's tmp dir, and fails the test with the report's summary and first
    failures when any state failed.  ``stop()`` gives the WriteLog instead, for
    a test that looks at the log itself.
    """

    def __init__(self, recording: "Recording", mount_point: str, mount_options: str,
                 report_dir: Path) -> None:
        self.recording = recording
        self.mount_point = mount_point
        self.mount_options = mount_options
        self.report_dir = report_dir
        self.report_path: Optional[Path] = None
        self._log: Optional["WriteLog"] = None

    def mark(self, label: str) -> None:
        """Log a mark (a point ``explore(points="mark")`` and replays can name)."""
        self.recording.mark(label)

    def stop(self) -> "WriteLog":
        """Unmount and stop recording (once); the log, owned by this fixture."""
        if self._log is None:
            self._log = self.recording.stop()
        return self._log

    def explore(self, check: Callable[[str], object], **options: object) -> "CrashReport":
        """Check every crash state; fail the test when one fails.  options go to explore()."""
        from .explorer import explore
        options.setdefault("mount_options", self.mount_options)
        report = explore(self.stop(), check, **options)  # type: ignore[arg-type]
        self.report_path = self.report_dir / "crash-report.html"
        report.write_html(self.report_path)
        if not report.states:
            pytest.fail(f"{report.summary()}: no crash state was checked (see points= and "
                        "after=)", pytrace=False)
        if report.failures:
            pytest.fail(f"{report.summary()}\n{report.describe_failures()}\n"
                        f"HTML report: {self.report_path}", pytrace=False)
        return report

    def teardown(self) -> None:
        if self._log is not None:
            self._log.close()
        self.recording.teardown()


CrashRecorderFactory = Callable[..., CrashRecorder]


@pytest.fixture
def crash_recorder_factory(tmp_path: Path) -> Iterator[CrashRecorderFactory]:
    """Make recording devices under tmp_path, each mounted; all torn down after the test.

    Call it as ``crash_recorder_factory(fs_type="ext4", size=None,
    mount_options="", mkfs_options=None)``; the default size is DEFAULT_SIZE
    or the filesystem's minimum.
    """
    _skip_without_kernel("crash_recorder")
    from .fs import MIN_SIZE, FSType
    from .recording import record_writes
    made: List[CrashRecorder] = []

    def make(fs_type: Union[FSType, str] = "ext4", size: Optional[int] = None,
             mount_options: str = "",
             mkfs_options: Union[Sequence[str], str, None] = None) -> CrashRecorder:
        if size is None:
            size = max(DEFAULT_SIZE, MIN_SIZE[FSType(fs_type)])
        name = f"dmflakey-rec-{os.getpid()}-{next(_names)}"
        directory = tmp_path / name
        directory.mkdir()
        recording = record_writes(name, str(directory), fs_type, size, mkfs_options=mkfs_options)
        mount_point = directory / "mnt"
        mount_point.mkdir()
        recorder = CrashRecorder(recording, str(mount_point), mount_options, directory)
        made.append(recorder)
        recording.mount(str(mount_point), mount_options)
        return recorder

    yield make
    _teardown_all(made)


@pytest.fixture
def crash_recorder(crash_recorder_factory: CrashRecorderFactory) -> CrashRecorder:
    """A recording ext4 device, mounted at ``crash_recorder.mount_point``; torn down after."""
    return crash_recorder_factory()
