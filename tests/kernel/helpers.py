"""Shared helpers of the kernel suite: unique names, the dmsetup oracle, scratch images, files
written durably, forks that report a line, devices whose creator was killed."""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import signal
import subprocess
import time
from typing import Callable
from pathlib import Path

import pytest

from dmflakey_ioctl.flakey import init_flakey

_counter = itertools.count()
CHUNK = 64 * 1024          # one O_DIRECT call of this size is one bio
REPO = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python: this checkout's package comes first; extra on top.

    An editable install may point at another checkout, and a child started in a
    temporary directory would import that one.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def loop_backing_files() -> dict[str, str]:
    """Bound loop devices and their backing files as sysfs shows them ({"loop3": "/x.img (deleted)"})."""
    bound = {}
    for path in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            bound[path.parent.parent.name] = path.read_text().rstrip("\n")
        except OSError:
            continue
    return bound


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


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory: its entries (a new name, a rename, an unlink) become durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, content: bytes, *, sync: bool, sync_dir: bool = True) -> None:
    """Write a new file; with sync, fsync it and then (unless sync_dir is False) its directory,
    so that the file's name is durable too."""
    with open(path, "wb") as fh:
        fh.write(content)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())
    if sync and sync_dir:
        fsync_dir(os.path.dirname(path))


def read_line(fd: int) -> str:
    """One line from a pipe (empty when the writer died first)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def line_from_a_fork(child: Callable[[int], object]) -> str:
    """Run child(fd) in a fork of this process: the line it writes to fd ("error <exception>" if
    it raised first, "" if it died without a word).

    The fork never returns into pytest; it is SIGKILLed (if it still runs) and reaped before
    this returns.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            child(write_fd)
        except BaseException as exc:
            os.write(write_fd, f"error {exc!r}\n".encode())
        finally:
            os._exit(1)
    os.close(write_fd)
    try:
        return read_line(read_fd)
    finally:
        os.close(read_fd)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def flakey_of_a_killed_process(name: str, directory: Path, size: int) -> tuple[str, str]:
    """A flakey device (no filesystem, its image in directory) whose creator, a fork of this
    process and so of this pid namespace, was SIGKILLed.  Returns the fork's word for its loop
    device and image path."""
    def make(fd: int) -> None:
        dev = init_flakey(name, str(directory), None, size=size)
        os.write(fd, f"ok {dev.loop_device} {dev.image_path}\n".encode())
        while True:
            time.sleep(60)

    answer = line_from_a_fork(make)
    words = answer.split()
    assert words[:1] == ["ok"], answer
    return words[1], words[2]


def dm_names() -> set[str]:
    """Names of the dm devices sysfs shows (a device being deleted may vanish mid-read)."""
    names = set()
    for path in Path("/sys/block").glob("dm-*/dm/name"):
        try:
            names.add(os.fsdecode(path.read_bytes().rstrip(b"\n")))  # a name need not be UTF-8
        except OSError:
            continue
    return names


# When each newer feature arrived: Linux's history, written here independently of the library's
# own table so that the tests check that table against it.  Read-direction corrupt_bio_byte came
# with a mid-2025 fix that reached some stable lines only: no release number tells.
FLAKEY_FEATURE_RELEASE = {"error_reads": (6, 4), "random_read_corrupt": (6, 5),
                          "random_write_corrupt": (6, 5), "corrupt_bio_byte_write": (6, 5),
                          "delay_flush": (4, 19)}
READ_CORRUPTION_FIX = "dm-flakey: make corrupting read bios work"


def running_release() -> tuple[int, int]:
    """(major, minor) of the running kernel, e.g. (6, 1) for 6.1.0-57-amd64."""
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def kernel_has(feature: str) -> bool:
    """Whether the running kernel should have feature, by release (or, for read corruption in
    the stable lines between 6.6 and 6.15, by a device of the test's own)."""
    if feature == "corrupt_bio_byte_read":
        release = running_release()
        if release >= (6, 16):
            return True
        if release < (6, 6):
            return False
        return read_corruption_works_here()
    return running_release() >= FLAKEY_FEATURE_RELEASE[feature]


def expected_since(feature: str) -> str:
    """What UnsupportedFeatureError.since must say for feature."""
    if feature == "corrupt_bio_byte_read":
        return READ_CORRUPTION_FIX
    return "Linux " + ".".join(map(str, FLAKEY_FEATURE_RELEASE[feature]))


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
        since, running = expected_since(feature), os.uname().release
        assert (err.feature, err.running) == (feature, running) and since in err.since, err
        assert since in str(err) and running in str(err) and name in str(err)
    else:
        raise AssertionError(f"{feature} on {os.uname().release} was not refused")
    info = dm.info(name)
    assert not info.suspended and not info.inactive_table and info.live_table, info
    assert dm.table(name) == table_before
    assert data_unchanged(), f"the data on {name} changed"


def read_corruption_works_here() -> bool:
    """Whether read-direction corrupt_bio_byte corrupts, seen on a device of the test's own.

    A linear device over a loop image holds a pattern; a flakey device over the
    same loop image with corrupt_bio_byte 1 r is read with O_DIRECT.
    """
    import mmap
    import tempfile

    from dmflakey_ioctl.kernel import dm, loop
    with tempfile.NamedTemporaryFile(dir="/tmp") as image:
        image.write(b"\xa5" * 65536)
        image.flush()
        with loop.attach(image.name) as lo:
            name = unique_name("dmfi-oracle")
            dm.create(name)
            try:
                dm.load(name, [(0, 128, "flakey", f"{lo.major_minor} 0 0 1 5 corrupt_bio_byte 1 r 90 0")])
                path = dm.resume(name).path
                buf = mmap.mmap(-1, 4096)
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                try:
                    os.preadv(fd, [buf], 0)
                finally:
                    os.close(fd)
                return buf[0] == 90
            finally:
                dm.remove(name)


def diff(a: bytes, b: bytes) -> list[int]:
    """Offsets where a and b differ (fast for the usual zero or one difference)."""
    assert len(a) == len(b)
    out = []
    for start in range(0, len(a), 4096):
        if a[start:start + 4096] != b[start:start + 4096]:
            out += [start + i for i, (x, y) in enumerate(zip(a[start:start + 4096], b[start:start + 4096]))
                    if x != y]
    return out


class Direct:
    """O_DIRECT access to a block device through page-aligned buffers: one call, one bio."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)

    def read(self, offset: int, size: int = CHUNK) -> bytes:
        with mmap.mmap(-1, size) as buf:
            assert os.preadv(self.fd, [buf], offset) == size
            return bytes(buf)

    def write(self, offset: int, data: bytes) -> bytes:
        """Write data; returns what the buffer holds afterwards (the kernel must not change it)."""
        with mmap.mmap(-1, len(data)) as buf:
            buf.write(data)
            assert os.pwritev(self.fd, [buf], offset) == len(data)
            return bytes(buf)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "Direct":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def expect_eio(action: Callable[[], object]) -> None:
    with pytest.raises(OSError) as info:
        action()
    assert info.value.errno == errno.EIO, info.value
