"""Things going wrong around the library: a killed owner, a table the kernel refuses, a failing mkfs,
a device held open by another process, teardown straight after unmount.

Each test checks that nothing is left behind (dm device, loop device,
/dev/mapper node, image, mount) besides what it asserts about the error.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
import traceback
from pathlib import Path
from typing import Callable, List

import pytest

from dmflakey_ioctl import fs

from dmflakey_ioctl.kernel import dm
from dmflakey_ioctl.errors import DeviceBusyError, DMFlakeyError, InvalidArgumentError, TableRejectedError
from dmflakey_ioctl.flakey import cleanup_stale, init_flakey
from dmflakey_ioctl.ownership import Kind, Owner
from dmflakey_ioctl.tables.flakey import FlakeyTable

from .helpers import dm_names, unique_name
from .test_stress import leftovers

MiB = 1 << 20
BLOCK = 4096


def mounted(path: Path) -> bool:
    return str(path) in {line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()}


def in_child(body: Callable[[], None]) -> tuple[int, int]:
    """Fork a child that runs body, says "ready" on a pipe and then waits to be killed or released.

    Returns (pid, release_fd): writing to release_fd lets the child return (exit 0).
    A failure in the child is reported by the parent with the child's traceback.
    """
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        status = 1
        try:
            os.close(ready_r)
            os.close(release_w)
            body()
            os.write(ready_w, b"ready")
            os.read(release_r, 1)
            status = 0
        except BaseException:  # noqa: BLE001
            os.write(ready_w, traceback.format_exc().encode()[-4000:])
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(release_r)
    readable, _, _ = select.select([ready_r], [], [], 60)
    said = os.read(ready_r, 8192).decode() if readable else "(nothing within 60 s)"
    os.close(ready_r)
    if said != "ready":
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"the child failed:\n{said}")
    return pid, release_w


def write_block(path: str, data: bytes, offset: int = 0) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_direct(path: str, offset: int = 0) -> bytes:
    """One block read with O_DIRECT, past the page cache, from the device itself."""
    import mmap
    buf = mmap.mmap(-1, BLOCK)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    return bytes(buf)


# ---- a process killed while it holds a device ---------------------------------------------------------

@pytest.mark.parametrize("state", ["mounted with a file open", "held open", "switched to drop_writes",
                                   "created without a table"])
def test_sigkilled_owner_leaves_devices_that_cleanup_stale_removes(tmp_path, state):
    prefix = unique_name("dmfi-kill")
    name = f"{prefix}-0"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    keep: List[object] = []

    def body() -> None:
        if state == "created without a table":  # killed between DM_DEV_CREATE and the table load
            dm.create(name, uuid=Owner.current(Kind.FLAKEY_IMAGE).uuid())
            return
        dev = init_flakey(name, str(tmp_path), "ext4" if state.startswith("mounted") else None, size=16 * MiB)
        if state.startswith("mounted"):
            dev.mount(str(mnt))
            handle = open(mnt / "file", "w")
            handle.write("written by a process about to be killed")
            keep.append(handle)
        elif state == "held open":
            keep.append(os.open(dev.device_path, os.O_RDWR))
        else:
            dev.drop_writes()

    # a device of a live owner (this process) that cleanup_stale must leave alone
    alive = init_flakey(f"{prefix}-alive", str(tmp_path), fs_type=None, size=MiB)
    try:
        pid, release = in_child(body)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(release)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert name in {d.name for d in dm.list_devices()}  # (no sysfs entry before a table is loaded)
        assert mounted(mnt) == state.startswith("mounted")

        removed = cleanup_stale()
        assert name in removed and alive.name not in removed
        assert name not in {d.name for d in dm.list_devices()} and not mounted(mnt)
        assert alive.name in dm_names() and not dm.info(alive.name).suspended
        assert cleanup_stale() == []  # nothing stale is left, and a second run is harmless
    finally:
        alive.teardown()
        if mounted(mnt):
            fs.umount(str(mnt))
    assert leftovers(prefix, tmp_path) == {}


# ---- a table the kernel refuses -----------------------------------------------------------------------

def test_rejected_tables_leave_the_device_resumed_with_its_table_and_data(tmp_path):
    prefix = unique_name("dmfi-rej")
    dev = init_flakey(f"{prefix}-0", str(tmp_path), fs_type=None, size=8 * MiB)
    try:
        kept = b"kept ".ljust(BLOCK, b"k")
        write_block(dev.device_path, kept)
        dev.drop_writes()
        before = dm.table(dev.name)
        backing = dev.backing
        # tables that FlakeyTable and dm.pack_targets accept and the kernel refuses, at load or at resume
        through_flakey = {
            "no such device number": FlakeyTable("4095:1048575", 0, 60),
            "a character device": FlakeyTable("/dev/null", 0, 60),
            "no such path": FlakeyTable("/dev/dmflakey-no-such-device", 0, 60, drop_writes=True),
            "offset past the end (refused at resume)": FlakeyTable(backing, 0, 60, offset=dev.sectors),
            "offset that makes the target too long (resume)":
                FlakeyTable(backing, 1, 1, offset=1, error_writes=True),
        }
        by_hand = {
            "period of zero": f"{backing} 0 0 0 0",
            "period overflowing 32 bits": f"{backing} 0 {2**32 - 1} 1 0",
            "unknown feature": f"{backing} 0 0 60 1 drop_everything",
            "too few feature words": f"{backing} 0 0 60 2 drop_writes",
            "corrupt byte 0": f"{backing} 0 0 60 5 corrupt_bio_byte 0 r 0 0",
            "drop and error writes": f"{backing} 0 0 60 2 drop_writes error_writes",
            "probability without a value": f"{backing} 0 0 60 1 random_read_corrupt",
            "not a number": f"{backing} zero 0 60 0",
        }
        attempts: List[tuple[str, Callable[[], None]]] = []
        for what, table in through_flakey.items():
            attempts += [(f"Flakey.load_table: {what}", lambda t=table: dev.load_table(t)),
                         (f"Flakey.load_table sync_fs: {what}", lambda t=table: dev.load_table(t, sync_fs=True))]
        for what, params in by_hand.items():
            attempts.append((f"dm.load: {what}",
                             lambda p=params: dm.load(dev.name, [(0, dev.sectors, "flakey", p)])))
        for what, attempt in attempts:
            with pytest.raises(TableRejectedError) as err:
                attempt()
            # (ENODEV: 6.1 and 5.10 for a path that is no block device)
            assert err.value.errno in (errno.EINVAL, errno.ENXIO, errno.ENOENT, errno.ENOTBLK, errno.ENODEV), \
                (what, err.value)
            assert err.value.kernel_log and "device-mapper" in err.value.kernel_log, (what, err.value)
            info = dm.info(dev.name)
            assert info.live_table and not info.suspended and not info.inactive_table, (what, info)
            assert dm.table(dev.name) == before, what
            assert read_direct(dev.device_path) == kept, what
        # the device still switches and writes through
        dev.allow_writes()
        later = b"later ".ljust(BLOCK, b"l")
        write_block(dev.device_path, later, BLOCK)
        assert read_direct(dev.device_path, BLOCK) == later and read_direct(dev.device_path) == kept
    finally:
        dev.teardown()
    assert leftovers(prefix, tmp_path) == {}


def test_sync_fs_switch_that_cannot_freeze_leaves_the_old_table(tmp_path):
    """ext4 whose journal aborted cannot be frozen: the switch fails and the device keeps running."""
    prefix = unique_name("dmfi-freeze")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    dev = init_flakey(f"{prefix}-0", str(tmp_path), "ext4", size=16 * MiB)
    try:
        dev.mount(str(mnt), "commit=1000")
        (mnt / "a").write_text("a")
        dev.error_writes()
        with pytest.raises(DMFlakeyError):
            fs.syncfs(str(mnt))  # EIO: the journal aborts, the filesystem turns read-only
        before = dm.table(dev.name)
        with pytest.raises(DMFlakeyError) as err:
            dev.allow_writes(sync_fs=True)
        assert err.value.errno == errno.EIO, err.value
        info = dm.info(dev.name)
        assert info.live_table and not info.suspended and not info.inactive_table, info
        assert dm.table(dev.name) == before
        dev.allow_writes()  # without the freeze the switch goes through
        assert dev.table().fault.equivalent(FlakeyTable(dev.backing, 120, 0))
    finally:
        dev.teardown()
    assert not mounted(mnt) and leftovers(prefix, tmp_path) == {}


# ---- mkfs failing -------------------------------------------------------------------------------------

def test_failing_mkfs_leaves_no_loop_device_and_no_image(tmp_path, monkeypatch):
    prefix = unique_name("dmfi-mkfs")
    with pytest.raises(DMFlakeyError) as err:
        init_flakey(f"{prefix}-0", str(tmp_path), "ext4", mkfs_options="-b 3", size=16 * MiB)
    assert "mkfs" in str(err.value) and err.value.operation == "mkfs"
    assert leftovers(prefix, tmp_path) == {}
    # no mkfs program at all
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(fs, "_SBIN_DIRS", ())
    with pytest.raises(DMFlakeyError) as err:
        init_flakey(f"{prefix}-1", str(tmp_path), "xfs", size=320 * MiB)
    assert err.value.errno == errno.ENOENT and "mkfs.xfs not found" in str(err.value)
    assert leftovers(prefix, tmp_path) == {}
    # too small for the filesystem: refused before any file is made
    with pytest.raises(InvalidArgumentError):
        init_flakey(f"{prefix}-2", str(tmp_path), "xfs", size=16 * MiB)
    assert leftovers(prefix, tmp_path) == {} and not list(tmp_path.iterdir())


# ---- the device held by another process ---------------------------------------------------------------

@pytest.mark.parametrize("how", ["open", "mounted"])
def test_teardown_of_a_device_another_process_holds_is_busy_then_succeeds(tmp_path, how):
    prefix = unique_name("dmfi-busy")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    dev = init_flakey(f"{prefix}-0", str(tmp_path), "ext4" if how == "mounted" else None, size=16 * MiB)
    try:
        if how == "mounted":  # a cwd inside the mount: umount gets EBUSY
            dev.mount(str(mnt))
            pid, release = in_child(lambda: os.chdir(mnt))
        else:
            pid, release = in_child(lambda: os.open(dev.device_path, os.O_RDONLY))
        try:
            started = time.monotonic()
            with pytest.raises(DeviceBusyError) as err:
                dev.teardown()
            assert time.monotonic() - started < 30
            assert err.value.errno == errno.EBUSY
            message = str(err.value)
            assert (dev.name in message) if how == "open" else (str(mnt) in message), message
            assert "retry" in message or "busy" in message, message
            # nothing is lost: teardown can be called again
            assert dev.name in dm_names() and not dm.info(dev.name).suspended
            assert dev.image_path and os.path.exists(dev.image_path)
            assert leftovers(prefix, tmp_path)["loop devices"]
        finally:
            os.write(release, b"x")
            os.close(release)
            os.waitpid(pid, 0)
        dev.teardown()
    finally:
        dev.teardown()
    assert not mounted(mnt) and leftovers(prefix, tmp_path) == {}


# ---- teardown straight after unmount ------------------------------------------------------------------

def test_teardown_right_after_unmount_does_not_flake(tmp_path):
    prefix = unique_name("dmfi-umount")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for cycle in range(20):
        dev = init_flakey(f"{prefix}-{cycle}", str(tmp_path), "ext4", size=16 * MiB)
        try:
            dev.mount(str(mnt))
            with open(mnt / "data", "wb") as fh:
                fh.write(os.urandom(64 << 10))
                fh.flush()
                os.fsync(fh.fileno())
            fs.umount(str(mnt))
        finally:
            dev.teardown()  # at once, no settling: must not raise EBUSY
        assert dev.name not in dm_names(), cycle
    assert leftovers(prefix, tmp_path) == {}

