"""The library beside a real udev: Debian's systemd-udevd with Debian's rules (dmsetup's 55-dm.rules).

The test guest runs no udev (the container case); these tests start the daemon for
themselves and stop it after, checking that no udev process and no link of ours is
left.  What is proven: with udevd running, /dev/mapper/<name> is udev's link to
../dm-N, the library waits for it instead of making a node, fault switches work
through it, and teardown leaves no link; with udev installed but stopped (its
control socket left behind) the library makes the node itself, as without udev.
Every wait is bounded.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from dmflakey_ioctl import init_flakey
from dmflakey_ioctl.kernel import nodes

from .helpers import dm_names, unique_name

UDEVD = next((p for p in ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")
              if os.path.exists(p)), "/lib/systemd/systemd-udevd")
# The guest's PID 1 (the initramfs) lives outside the chroot that runs the tests;
# without this udevadm refuses every request ("Running in chroot, ignoring request").
UDEV_ENV = dict(os.environ, SYSTEMD_IGNORE_CHROOT="1")
SIZE = 64 << 20
BOUND = 60.0          # seconds; no step here may take longer, even under TCG on a busy host
BLOCK = 4096


def udev_processes() -> list[str]:
    """udevd and its workers, as "pid comm" (workers are named after it or "(udev-worker)")."""
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:
            continue
        if "udev" in name:
            found.append(f"{comm.parent.name} {name}")
    return found


def links_under_dev() -> set[str]:
    return {str(p) for p in Path("/dev").rglob("*") if p.is_symlink()}


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Udevd:
    """One systemd-udevd for a test: started with its debug log kept, stopped after."""

    def __init__(self) -> None:
        assert os.path.exists(UDEVD), f"{UDEVD} is missing: install the udev package (make deps)"
        assert not udev_processes(), f"a udev is already running: {udev_processes()}"
        assert not nodes.udev_running(), "something listens on /run/udev/control already"
        self.links_before = links_under_dev()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([UDEVD, "--debug"], env=UDEV_ENV, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        assert wait_until(nodes.udev_running, BOUND), "udevd did not open its control socket"
        # the first event makes udevd read its rules and fork a worker: seconds under TCG
        subprocess.run(["udevadm", "settle", f"--timeout={BOUND:.0f}"], env=UDEV_ENV, check=True,
                       timeout=BOUND + 10)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop udevd: SIGTERM is its orderly exit, SIGKILL a crash; either leaves its control socket.

        (Not `udevadm control --exit`: udevd takes one control connection at a time
        with a backlog of one, and under TCG that request failed with EAGAIN.)
        """
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=BOUND)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"udevd did not exit on signal {sig}") from None
        # its workers follow it out (they get SIGTERM when it dies)
        wait_until(lambda: not udev_processes(), BOUND)

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def close(self) -> None:
        """Stop it, then put the guest back as it was: no udev process, no /run/udev, no new link."""
        try:
            self.stop()
        finally:
            left = udev_processes()
            for entry in left:
                os.kill(int(entry.split()[0]), signal.SIGKILL)
            new_links = links_under_dev() - self.links_before
            for link in new_links:            # udev's links of loop and dm devices
                if os.path.islink(link):
                    os.unlink(link)
            subprocess.run(["rm", "-rf", "/run/udev"], check=True)
            self.log.close()
        assert not left, f"udev processes left after stop: {left}"
        mapper_links = sorted(link for link in new_links if link.startswith("/dev/mapper/"))
        assert not mapper_links, f"links left in /dev/mapper after udevd stopped: {mapper_links}"


@pytest.fixture
def udevd():
    daemon = Udevd()
    try:
        yield daemon
    finally:
        daemon.close()


def dm_block(name: str) -> str:
    """dm-N of the device called name, from sysfs (the kernel's own word)."""
    for entry in Path("/sys/block").glob("dm-*"):
        if (entry / "dm" / "name").read_text().strip() == name:
            return entry.name
    raise AssertionError(f"no dm device {name} in sysfs")


def sysfs_rdev(block: str) -> int:
    major, minor = (Path("/sys/block") / block / "dev").read_text().strip().split(":")
    return os.makedev(int(major), int(minor))


def write_block(path: str, data: bytes) -> None:
    """One O_DIRECT write at offset 0 (no page cache between us and the target)."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(fd, buf, 0)
    finally:
        os.close(fd)
        buf.close()


def read_block(path: str) -> bytes:
    buf = mmap.mmap(-1, BLOCK)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [buf], 0)
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


def timed(step):
    started = time.monotonic()
    result = step()
    elapsed = time.monotonic() - started
    assert elapsed < BOUND, f"{step} took {elapsed:.1f} s"
    return result


def test_with_udevd_the_mapper_entry_is_udevs_link_and_teardown_leaves_none(udevd, tmp_path):
    assert nodes.dm_rules_present() and nodes.udev_manages_mapper()
    name = unique_name("dmfi-udev")
    path = f"/dev/mapper/{name}"
    with timed(lambda: init_flakey(name, str(tmp_path), None, size=SIZE)) as dev:
        block = dm_block(name)
        assert dev.device_path == path
        # udev's link to ../dm-N, not a node the library made in its way
        assert stat.S_ISLNK(os.lstat(path).st_mode), "the library made a node where udev makes a link"
        assert os.readlink(path) == f"../{block}"
        assert os.stat(path).st_rdev == sysfs_rdev(block)
        assert f"LINK 'mapper/{name}'" in udevd.log_text()   # 55-dm.rules made it

        data = os.urandom(BLOCK)
        timed(dev.error_writes)
        with pytest.raises(OSError) as failed:
            write_block(path, data)
        assert failed.value.errno == errno.EIO
        timed(dev.drop_writes)
        write_block(path, data)                 # acknowledged, thrown away
        assert read_block(path) != data
        timed(dev.allow_writes)
        write_block(path, data)
        assert read_block(path) == data
        # every switch resumed the device (a change event each): still udev's link
        assert os.readlink(path) == f"../{block}"
    assert name not in dm_names()
    assert not os.path.lexists(path), "teardown returned while udev's link was still there"


def test_udev_installed_but_stopped_is_no_udev(udevd, tmp_path):
    udevd.stop(signal.SIGKILL)     # a crashed daemon: nothing listens, its socket file stays
    assert os.path.exists(nodes.UDEV_CONTROL)
    assert nodes.dm_rules_present() and not nodes.udev_running() and not nodes.udev_manages_mapper()
    name = unique_name("dmfi-noudev")
    path = f"/dev/mapper/{name}"
    started = time.monotonic()
    with init_flakey(name, str(tmp_path), None, size=SIZE) as dev:
        # made at once by the library (no wait for a udev that is not there)
        assert time.monotonic() - started < BOUND
        st = os.lstat(path)
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == sysfs_rdev(dm_block(name))
        data = os.urandom(BLOCK)
        write_block(dev.device_path, data)
        assert read_block(dev.device_path) == data
    assert name not in dm_names()
    assert not os.path.lexists(path)
