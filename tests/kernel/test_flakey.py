"""The high-level Flakey API against the real dm-flakey: every fault mode, its refusals, teardown.

Each test builds a device with init_flakey over a small sparse image under
tmp_path and checks what the kernel really did: data that survives or not,
errno values, bytes that changed, what the live table says.  Data is checked
with O_DIRECT reads of the dm device (page-aligned buffers, so one call is one
bio) and against the image file behind the loop device.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import stat
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import pytest

from dmflakey_ioctl import features, fs

from dmflakey_ioctl.kernel import dm
from dmflakey_ioctl.errors import (DeviceBusyError, DeviceExistsError, DMFlakeyError, InvalidArgumentError,
                                   TableRejectedError, UnsupportedFeatureError)
from dmflakey_ioctl.flakey import Flakey, cleanup_stale, init_flakey, open_flakey
from dmflakey_ioctl.ownership import UUID_PREFIX, Verdict
from dmflakey_ioctl.fs import FSType
from dmflakey_ioctl.tables.flakey import PROBABILITY_MAX, CorruptBIOByte, FlakeyTable

from .helpers import (CHUNK, Direct, assert_refused, diff, dm_names, expect_eio, flakey_of_a_killed_process,
                      kernel_has, unique_name)

MiB = 1 << 20
SIZE = {FSType.EXT4: 64 * MiB, FSType.XFS: fs.MIN_SIZE[FSType.XFS], FSType.BTRFS: fs.MIN_SIZE[FSType.BTRFS],
        None: 16 * MiB}
# ext4 commits its journal only when asked: a background commit would save what a test expects lost
OPTIONS = {FSType.EXT4: "commit=1000", FSType.XFS: "", FSType.BTRFS: ""}
BASE = 1 * MiB             # raw-device tests stay clear of sector 0
FITHAW = 0xC0045878        # _IOWR('X', 120, int)


# ---- helpers ------------------------------------------------------------------------------------------

def bound_loops(image: str) -> list[str]:
    """Loop devices whose backing file is image (deleted or not)."""
    found = []
    for path in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            backing = path.read_text().rstrip("\n")
        except OSError:
            continue
        if backing == image or backing == f"{image} (deleted)":
            found.append(path.parent.parent.name)
    return found


def is_mount_point(path: Path) -> bool:
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == str(path) for line in fh)


def assert_intact(dev: Flakey) -> None:
    """Every part of the device is still there."""
    assert dev.name in dm_names()
    info = dm.info(dev.name)
    assert info.live_table and not info.suspended and not info.inactive_table
    st = os.stat(dev.device_path)
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(info.major, info.minor)
    assert dev.image_path and os.path.isfile(dev.image_path)
    assert dev.loop_device and bound_loops(dev.image_path) == [os.path.basename(dev.loop_device)]


def assert_gone(name: str, image: Optional[str]) -> None:
    """No dm device, no mapper node, no loop device on the image, no image."""
    assert name not in dm_names()
    assert not os.path.lexists(f"{dm.MAPPER_DIR}/{name}")
    if image:
        assert bound_loops(image) == []
        assert not os.path.exists(image)


def assert_table(dev: Flakey, expected: FlakeyTable) -> None:
    """The live table is expected (a table without features reads back as error_reads error_writes)."""
    live = dev.table().fault
    assert live.equivalent(expected), f"live {live.params()!r}, expected {expected.params()!r}"


def release(dev: Flakey) -> None:
    """Let I/O through again (so unmounting writes normally), then tear everything down."""
    if dev.name in dm_names():
        try:
            dev.allow_writes()
        except DMFlakeyError:
            pass
    dev.teardown()


def write_file(path: Path, data: bytes, *, sync: bool) -> None:
    """Create path with data; with sync, fsync the file and its directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if sync:
        dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


def lost(path: Path) -> bool:
    """A file written without sync before a power cut: gone, or present with no data."""
    return not path.exists() or path.stat().st_size == 0


def within(seconds: float, action: Callable[[], None], thaw: Optional[Path] = None) -> None:
    """Run action in a thread; fail (after thawing a frozen filesystem) if it blocks."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:  # reported in the test's thread
            failure.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        if thaw is not None:
            fd = os.open(thaw, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.ioctl(fd, FITHAW, 0)
            except OSError:
                pass
            finally:
                os.close(fd)
            worker.join(10)
        pytest.fail(f"blocked for more than {seconds} s (a frozen filesystem or a suspended device?)")
    if failure:
        raise failure[0]


def image_bytes(dev: Flakey, offset: int, size: int = CHUNK) -> bytes:
    """What the image file behind the loop device holds."""
    assert dev.image_path
    with open(dev.image_path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


class Holder:
    """A forked child that keeps path open until released."""

    def __init__(self, path: str) -> None:
        ready_r, ready_w = os.pipe()
        self._stop_r, self._stop_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child: never returns into pytest
            try:
                os.close(ready_r)
                os.close(self._stop_w)
                fd = os.open(path, os.O_RDONLY)
                os.write(ready_w, b"1")
                os.read(self._stop_r, 1)
                os.close(fd)
            finally:
                os._exit(0)
        os.close(ready_w)
        os.close(self._stop_r)
        answer = os.read(ready_r, 1)
        os.close(ready_r)
        if answer != b"1":
            self.release()
            raise AssertionError(f"the holder could not open {path}")

    def release(self) -> None:
        if self.pid:
            os.close(self._stop_w)
            os.waitpid(self.pid, 0)
            self.pid = 0


# ---- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture
def make(tmp_path):
    """init_flakey under tmp_path; every device made is torn down afterwards, whatever happened."""
    made: list[Flakey] = []

    def make(fs_type: Optional[FSType] = FSType.EXT4, *, name: Optional[str] = None, data_dir: Optional[Path] = None,
             **kwargs) -> Flakey:
        kwargs.setdefault("size", SIZE[fs_type])
        dev = init_flakey(name or unique_name("dmfi-fl"), str(data_dir or tmp_path), fs_type, **kwargs)
        made.append(dev)
        return dev

    yield make
    problems = []
    for dev in reversed(made):
        try:
            release(dev)
        except Exception as exc:  # keep going: the others must still be removed
            problems.append(f"{dev.name}: {exc!r}")
    assert not problems, f"teardown after the test failed: {problems}"


@pytest.fixture
def mnt(tmp_path):
    point = tmp_path / "mnt"
    point.mkdir()
    return point


@pytest.fixture
def feature_cache():
    """Tests that fake the probe results start and end with an empty cache."""
    features.reset_cache()
    yield
    features.reset_cache()


# ---- life cycle ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fs_type", list(FSType), ids=lambda t: t.value)
def test_init_mount_write_teardown_leaves_nothing(make, mnt, fs_type):
    dev = make(fs_type)
    name, image = dev.name, dev.image_path
    assert_intact(dev)
    assert os.stat(image).st_size == SIZE[fs_type]
    assert os.stat(image).st_blocks * 512 < SIZE[fs_type] // 2, "the image is not sparse"
    assert dm.info(name).uuid.startswith(UUID_PREFIX)
    assert dev.filesystem is fs_type and fs.detect_fs(dev.device_path) is fs_type
    live = dev.table().fault
    assert live.device == dev.backing and live.down_interval == 0 and live.up_interval > 0

    dev.mount(str(mnt), OPTIONS[fs_type])
    payload = os.urandom(256 * 1024)
    (mnt / "data").write_bytes(payload)
    fs.syncfs(str(mnt))
    fs.umount(str(mnt))
    assert not is_mount_point(mnt)
    dev.mount(str(mnt), OPTIONS[fs_type])
    assert (mnt / "data").read_bytes() == payload

    dev.teardown()  # still mounted: teardown unmounts first
    assert not is_mount_point(mnt)
    assert_gone(name, image)


def test_teardown_is_idempotent(make):
    dev = make(None)
    dev.teardown()
    assert_gone(dev.name, dev.image_path)
    dev.teardown()
    with dev:
        pass  # leaving a with block tears down again: still nothing to do
    assert_gone(dev.name, dev.image_path)


def test_teardown_of_a_device_held_open_is_busy_and_loses_nothing(make):
    dev = make(None)
    holder = Holder(dev.device_path)
    try:
        assert dm.info(dev.name).open_count == 1
        start = time.monotonic()
        with pytest.raises(DeviceBusyError) as info:
            dev.teardown()
        assert time.monotonic() - start < 15
        assert info.value.errno == errno.EBUSY and dev.name in str(info.value)
        assert_intact(dev)
    finally:
        holder.release()
    dev.teardown()
    assert_gone(dev.name, dev.image_path)


def test_open_flakey_reads_a_device_back_from_the_kernel(make):
    dev = make(FSType.EXT4)
    dev.drop_writes(up_interval=3, interval=9)
    again = open_flakey(dev.name)
    assert (again.loop_device, again.image_path, again.backing, again.sectors, again.filesystem) == \
        (dev.loop_device, dev.image_path, dev.backing, dev.sectors, FSType.EXT4)
    assert again.owner == dev.owner and again.owner.pid == os.getpid()
    assert again.table().fault == FlakeyTable(dev.backing, 3, 9, drop_writes=True)
    again.allow_writes(interval=11)  # both handles drive the same kernel device
    assert_table(dev, FlakeyTable(dev.backing, 11, 0))
    again.teardown()  # the read-back handle knows everything there is to remove
    assert_gone(dev.name, dev.image_path)
    dev.teardown()


# ---- init_flakey refusals -----------------------------------------------------------------------------

def test_init_refuses_an_existing_image_and_leaves_it_alone(make, tmp_path):
    name = unique_name("dmfi-fl")
    image = tmp_path / f"{name}.img"
    image.write_bytes(b"precious" * 512)
    with pytest.raises(DeviceExistsError) as info:
        make(FSType.EXT4, name=name)
    assert str(image) in str(info.value)
    assert image.read_bytes() == b"precious" * 512
    assert name not in dm_names() and bound_loops(str(image)) == []


def test_init_refuses_a_duplicate_name(make, tmp_path):
    dev = make(None)
    before = dev.table()
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(DeviceExistsError):
        make(None, name=dev.name, data_dir=other)
    assert list(other.iterdir()) == []
    assert_intact(dev)
    assert dev.table() == before


def test_failing_mkfs_leaves_no_loop_no_device_no_image(make, tmp_path):
    name = unique_name("dmfi-fl")
    loops_before = {p.read_text() for p in Path("/sys/block").glob("loop*/loop/backing_file")}
    with pytest.raises(DMFlakeyError) as info:
        make(FSType.EXT4, name=name, mkfs_options="-O nosuchfeature")
    assert "mkfs" in str(info.value)
    assert name not in dm_names()
    assert list(tmp_path.iterdir()) == []
    assert {p.read_text() for p in Path("/sys/block").glob("loop*/loop/backing_file")} == loops_before


# ---- faults with a filesystem -------------------------------------------------------------------------

@pytest.mark.parametrize("fs_type", [FSType.EXT4, FSType.XFS], ids=lambda t: t.value)
def test_power_failure_keeps_what_was_synced_and_loses_the_rest(make, mnt, fs_type):
    dev = make(fs_type)
    dev.mount(str(mnt), OPTIONS[fs_type])
    kept, unsynced, acked = os.urandom(CHUNK), os.urandom(CHUNK), os.urandom(CHUNK)
    write_file(mnt / "kept", kept, sync=True)
    write_file(mnt / "unsynced", unsynced, sync=False)
    dev.drop_writes()
    write_file(mnt / "acked", acked, sync=True)  # the device acknowledges and drops: fsync succeeds
    assert (mnt / "acked").read_bytes() == acked  # from the page cache

    dev.power_failure(str(mnt), OPTIONS[fs_type])
    assert is_mount_point(mnt)
    assert_table(dev, FlakeyTable(dev.backing, 120, 0))
    assert (mnt / "kept").read_bytes() == kept
    assert lost(mnt / "unsynced")
    assert lost(mnt / "acked")


@pytest.mark.parametrize("fs_type", [FSType.EXT4, FSType.XFS], ids=lambda t: t.value)
def test_error_writes_fails_fsync_then_allow_writes_recovers(make, mnt, fs_type):
    dev = make(fs_type)
    dev.mount(str(mnt), OPTIONS[fs_type])
    before = os.urandom(CHUNK)
    write_file(mnt / "before", before, sync=True)

    dev.error_writes()
    assert dev.table().fault.error_writes
    # fsync of the file only: a syncfs here would abort ext4's journal (kernel-behaviour.md)
    expect_eio(lambda: write_file(mnt / "failed", os.urandom(CHUNK), sync=True))
    assert (mnt / "before").read_bytes() == before  # reads pass

    dev.allow_writes()
    after = os.urandom(CHUNK)
    write_file(mnt / "after", after, sync=True)
    fs.umount(str(mnt))
    dev.mount(str(mnt), OPTIONS[fs_type])
    assert (mnt / "after").read_bytes() == after
    assert (mnt / "before").read_bytes() == before


def test_xfs_unmount_under_error_writes_returns_within_seconds(make, mnt):
    dev = make(FSType.XFS)
    dev.mount(str(mnt))
    rdev = os.stat(dev.device_path).st_rdev
    sysfs = Path(os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")).name
    knobs = Path(f"/sys/fs/xfs/{sysfs}/error")
    assert (knobs / "fail_at_unmount").read_text().strip() == "1"
    assert (knobs / "metadata/EIO/max_retries").read_text().strip() == "0"
    synced = {f"synced{i}": os.urandom(4096) for i in range(20)}
    for name, data in synced.items():
        (mnt / name).write_bytes(data)
    fs.syncfs(str(mnt))  # the log is on disk; the metadata it describes is still to be written back

    # Unmounting now pushes that metadata out and every write fails.  XFS retries failed
    # metadata writes forever by default; it gives up here only because of the knobs above
    # (seen: with fail_at_unmount=0 this unmount was still retrying after 30 s).
    dev.error_writes()
    start = time.monotonic()
    done = threading.Thread(target=lambda: fs.umount(str(mnt)), daemon=True)
    done.start()
    done.join(15)
    elapsed = time.monotonic() - start
    if done.is_alive():  # rescue the unmount so that the cleanup can run, then fail
        (knobs / "fail_at_unmount").write_text("1")
        for klass in (knobs / "metadata").iterdir():
            (klass / "max_retries").write_text("0")
        done.join(30)
        pytest.fail("unmounting under error_writes did not return within 15 s")
    assert not is_mount_point(mnt)
    print(f"xfs unmount under error_writes: {elapsed:.2f} s")

    dev.allow_writes()
    dev.mount(str(mnt))  # log recovery brings back everything that was synced
    for name, data in synced.items():
        assert (mnt / name).read_bytes() == data


@pytest.mark.parametrize("sync_fs", [True, False], ids=["sync_fs", "no_sync_fs"])
def test_sync_fs_flushes_the_filesystem_before_the_switch(make, mnt, sync_fs):
    dev = make(FSType.EXT4)
    dev.mount(str(mnt), OPTIONS[FSType.EXT4])
    data = os.urandom(CHUNK)
    write_file(mnt / "unsynced", data, sync=False)
    dev.drop_writes(sync_fs=sync_fs)
    # the freeze that sync_fs takes must be over: the filesystem still takes writes
    within(10, lambda: (mnt / "after-switch").write_bytes(b"x"), thaw=mnt)
    dev.power_failure(str(mnt), OPTIONS[FSType.EXT4])
    if sync_fs:
        assert (mnt / "unsynced").read_bytes() == data
    else:
        assert lost(mnt / "unsynced")
    assert lost(mnt / "after-switch")


# ---- faults on the raw device -------------------------------------------------------------------------

def test_error_reads_fails_uncached_reads_while_writes_pass(make):
    dev = make(None)
    old, new = os.urandom(CHUNK), os.urandom(CHUNK)
    with Direct(dev.device_path) as io:
        io.write(BASE, old)
        if not kernel_has("error_reads"):
            assert_refused(dev.error_reads, "error_reads", dev.name, dm.table(dev.name),
                           lambda: io.read(BASE) == old)
            return
        dev.error_reads()
        assert dev.table().fault == FlakeyTable(dev.backing, 0, 120, error_reads=True)
        expect_eio(lambda: io.read(BASE))
        io.write(BASE + CHUNK, new)
        assert image_bytes(dev, BASE + CHUNK) == new
        # buffered reads too, once nothing is cached
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1")
        fd = os.open(dev.device_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            expect_eio(lambda: os.pread(fd, 4096, BASE))
        finally:
            os.close(fd)
        dev.allow_writes()
        assert io.read(BASE) == old
        assert io.read(BASE + CHUNK) == new


def test_corrupt_bio_byte_read_changes_one_byte_of_what_is_read(make):
    dev = make(None)
    data = os.urandom(CHUNK)
    nth = 1000
    value = data[nth - 1] ^ 0x5A
    with Direct(dev.device_path) as io:
        io.write(BASE, data)
        if not kernel_has("corrupt_bio_byte_read"):   # accepted there, but corrupts nothing
            assert_refused(lambda: dev.corrupt_bio_byte(nth, "r", value), "corrupt_bio_byte_read",
                           dev.name, dm.table(dev.name), lambda: io.read(BASE) == data)
            return
        dev.corrupt_bio_byte(nth, "r", value)
        assert dev.table().fault.corrupt_bio_byte == CorruptBIOByte(nth, "r", value, 0)
        got = io.read(BASE)
        assert diff(got, data) == [nth - 1] and got[nth - 1] == value
        # each bio gets its own corrupted byte, counted from the bio's start
        second = io.read(BASE + 4096, 4096)
        assert diff(second, data[4096:8192]) == [nth - 1]
        assert image_bytes(dev, BASE) == data  # what is stored stays intact
        dev.corrupt_bio_byte(CHUNK + 1, "r", value)  # beyond the bio: nothing to change
        assert io.read(BASE) == data
        dev.allow_writes()
        assert io.read(BASE) == data


def test_corrupt_bio_byte_write_stores_the_changed_byte(make):
    dev = make(None)
    data = os.urandom(CHUNK)
    nth = CHUNK - 7
    value = data[nth - 1] ^ 0xFF
    with Direct(dev.device_path) as io:
        io.write(BASE, data)
        if not kernel_has("corrupt_bio_byte_write"):  # it would corrupt the caller's own buffer
            assert_refused(lambda: dev.corrupt_bio_byte(nth, "w", value), "corrupt_bio_byte_write",
                           dev.name, dm.table(dev.name), lambda: io.read(BASE) == data)
            return
        dev.corrupt_bio_byte(nth, "w", value)
        assert io.write(BASE, data) == data  # the caller's buffer is not touched
        dev.allow_writes()
        got = io.read(BASE)
        assert diff(got, data) == [nth - 1] and got[nth - 1] == value
        assert image_bytes(dev, BASE) == got


def corrupted_chunks(got: list[bytes], want: list[bytes]) -> int:
    """How many chunks differ; none may differ in more than one byte (one per bio)."""
    count = 0
    for i, (a, b) in enumerate(zip(got, want)):
        changed = diff(a, b)
        assert len(changed) <= 1, f"chunk {i}: {len(changed)} bytes changed in one bio"
        count += bool(changed)
    return count


CHUNKS = 8  # the random byte may by chance get its old value (1 in 256): count over several bios


def test_random_read_corrupt(make):
    dev = make(None)
    chunks = [os.urandom(CHUNK) for _ in range(CHUNKS)]
    with Direct(dev.device_path) as io:
        for i, chunk in enumerate(chunks):
            io.write(BASE + i * CHUNK, chunk)
        if kernel_has("random_read_corrupt"):
            dev.random_read_corrupt(1.0)
            assert dev.table().fault.random_read_corrupt == PROBABILITY_MAX
            got = [io.read(BASE + i * CHUNK) for i in range(CHUNKS)]
            assert corrupted_chunks(got, chunks) >= CHUNKS - 2
            assert image_bytes(dev, BASE, CHUNKS * CHUNK) == b"".join(chunks)
        else:
            assert_refused(lambda: dev.random_read_corrupt(1.0), "random_read_corrupt", dev.name,
                           dm.table(dev.name),
                           lambda: [io.read(BASE + i * CHUNK) for i in range(CHUNKS)] == chunks)

        # probability 0 corrupts nothing and, unlike the kernel's own 0, fails nothing (any kernel)
        dev.random_read_corrupt(0.0)
        assert_table(dev, FlakeyTable(dev.backing, 1, 0))
        assert [io.read(BASE + i * CHUNK) for i in range(CHUNKS)] == chunks
        fresh = os.urandom(CHUNK)
        io.write(BASE, fresh)
        assert io.read(BASE) == fresh


def test_random_write_corrupt(make):
    dev = make(None)
    chunks = [os.urandom(CHUNK) for _ in range(CHUNKS)]
    with Direct(dev.device_path) as io:
        if kernel_has("random_write_corrupt"):
            dev.random_write_corrupt(1.0)
            assert dev.table().fault.random_write_corrupt == PROBABILITY_MAX
            for i, chunk in enumerate(chunks):
                assert io.write(BASE + i * CHUNK, chunk) == chunk
            dev.allow_writes()
            got = [io.read(BASE + i * CHUNK) for i in range(CHUNKS)]
            assert corrupted_chunks(got, chunks) >= CHUNKS - 2
            assert image_bytes(dev, BASE, CHUNKS * CHUNK) == b"".join(got)
        else:
            for i, chunk in enumerate(chunks):
                io.write(BASE + i * CHUNK, chunk)
            assert_refused(lambda: dev.random_write_corrupt(1.0), "random_write_corrupt", dev.name,
                           dm.table(dev.name),
                           lambda: [io.read(BASE + i * CHUNK) for i in range(CHUNKS)] == chunks)

        dev.random_write_corrupt(0.0)
        assert_table(dev, FlakeyTable(dev.backing, 1, 0))
        for i, chunk in enumerate(chunks):
            io.write(BASE + i * CHUNK, chunk)
        assert [io.read(BASE + i * CHUNK) for i in range(CHUNKS)] == chunks


def test_up_and_down_intervals_alternate(make):
    dev = make(None)
    block = os.urandom(4096)
    outcomes: list[tuple[float, bool]] = []
    with Direct(dev.device_path) as io:
        dev.error_writes(up_interval=1, interval=timedelta(seconds=1))
        start = time.monotonic()
        while time.monotonic() - start < 4.5:
            try:
                io.write(BASE, block)
                ok = True
            except OSError as exc:
                assert exc.errno == errno.EIO
                ok = False
            outcomes.append((time.monotonic() - start, ok))
            time.sleep(0.05)
        assert io.read(BASE, 4096) == block  # reads pass in both phases
    runs: list[list[tuple[float, bool]]] = []
    for outcome in outcomes:
        if runs and runs[-1][-1][1] == outcome[1]:
            runs[-1].append(outcome)
        else:
            runs.append([outcome])
    phases = [(run[0][1], round(run[-1][0] - run[0][0], 2)) for run in runs]
    print(f"error_writes up=1 down=1, (writes pass, phase length): {phases}")
    assert {ok for ok, _ in phases} == {True, False}, phases
    assert phases[0][0] is True, f"the period starts with the up phase at the table load: {phases}"
    assert len(runs) >= 4, f"expected one-second phases to alternate: {phases}"
    assert max(length for _, length in phases) < 2.0, phases


# ---- refusals -----------------------------------------------------------------------------------------

def refusals(dev: Flakey) -> list[tuple[str, Callable[[], object]]]:
    """Calls the library must refuse before any ioctl."""
    bad_intervals = [-1, 1.5, 2.0, True, "10", timedelta(seconds=1.5), timedelta(seconds=-1)]
    cases: list[tuple[str, Callable[[], object]]] = []
    switches = {
        "drop_writes": dev.drop_writes, "error_writes": dev.error_writes, "error_reads": dev.error_reads,
        "corrupt_bio_byte": lambda **kw: dev.corrupt_bio_byte(1, "r", 0, **kw),
        "random_read_corrupt": lambda **kw: dev.random_read_corrupt(0.5, **kw),
        "random_write_corrupt": lambda **kw: dev.random_write_corrupt(0.5, **kw),
        "random_read_corrupt(0)": lambda **kw: dev.random_read_corrupt(0.0, **kw),
    }
    for label, switch in switches.items():
        for bad in bad_intervals:
            cases.append((f"{label}(interval={bad!r})", lambda s=switch, b=bad: s(interval=b)))
            cases.append((f"{label}(up_interval={bad!r})", lambda s=switch, b=bad: s(up_interval=b)))
    for bad in bad_intervals:
        cases.append((f"allow_writes(interval={bad!r})", lambda b=bad: dev.allow_writes(interval=b)))
    cases += [
        ("no period", lambda: dev.drop_writes(interval=0, up_interval=0)),
        ("allow with no period", lambda: dev.allow_writes(interval=0)),
        ("interval overflow", lambda: dev.error_writes(interval=2**32)),
        ("period overflow", lambda: dev.error_writes(interval=2**31, up_interval=2**31)),
    ]
    for bad in [math.nan, -0.1, 1.5, "0.5", True, math.inf, None]:
        cases.append((f"random_read_corrupt({bad!r})", lambda b=bad: dev.random_read_corrupt(b)))
        cases.append((f"random_write_corrupt({bad!r})", lambda b=bad: dev.random_write_corrupt(b)))
    for args in [(0, "r", 1), (1, "r", 256), (1, "r", -1), (1, "x", 1), (1, "rw", 1), (1, "", 1),
                 (2**32, "w", 1), ("1", "r", 1), (1.0, "r", 1), (1, "r", 1, -1), (1, "r", 1, 2**32)]:
        cases.append((f"corrupt_bio_byte{args!r}", lambda a=args: dev.corrupt_bio_byte(*a)))
    write_corrupt = CorruptBIOByte(1, "w", 0)
    read_corrupt = CorruptBIOByte(1, "r", 0)
    for label, table in [
        ("drop_writes + corrupt w", dict(drop_writes=True, corrupt_bio_byte=write_corrupt)),
        ("error_writes + corrupt w", dict(error_writes=True, corrupt_bio_byte=write_corrupt)),
        ("drop_writes + error_writes", dict(drop_writes=True, error_writes=True)),
        ("error_writes + random_write_corrupt", dict(error_writes=True, random_write_corrupt=5)),
        ("error_reads + corrupt r", dict(error_reads=True, corrupt_bio_byte=read_corrupt)),
        ("error_reads + random_read_corrupt", dict(error_reads=True, random_read_corrupt=5)),
        ("random_read_corrupt 0", dict(random_read_corrupt=0)),
    ]:
        cases.append((f"load_table({label})",
                      lambda t=table: dev.load_table(FlakeyTable(dev.backing, 0, 10, **t))))
    return cases


def test_every_refusal_leaves_the_live_table_alone(make):
    dev = make(None)
    dev.drop_writes(up_interval=5, interval=7)
    before = dev.table()
    event = dm.info(dev.name).event_nr
    not_refused = []
    for label, call in refusals(dev):
        try:
            call()
        except InvalidArgumentError as exc:
            assert exc.errno is None, f"{label}: {exc} came from the kernel"
        else:
            not_refused.append(label)
        info = dm.info(dev.name)
        assert not info.suspended and not info.inactive_table, label
        assert dev.table() == before, label
    assert not not_refused, f"accepted: {not_refused}"
    assert dm.info(dev.name).event_nr == event


def test_a_table_the_kernel_rejects_keeps_the_old_table_and_the_data(make, mnt):
    dev = make(FSType.EXT4)
    dev.mount(str(mnt), OPTIONS[FSType.EXT4])
    data = os.urandom(CHUNK)
    write_file(mnt / "data", data, sync=True)
    dev.allow_writes(interval=77)
    before = dev.table()
    rejected = [
        # the builder takes any absolute path; the kernel finds no such device at load time
        # (ENOENT; ENODEV on 6.1 and 5.10)
        (FlakeyTable("/dev/dmfi-no-such-device", 0, 10, error_writes=True), (errno.ENOENT, errno.ENODEV),
         "Device lookup failed"),
        # an offset that makes the target end past the backing device: loaded, refused at resume
        (FlakeyTable(dev.backing, 0, 10, offset=8, error_writes=True), (errno.EINVAL,), "too small"),
    ]
    for table, err, reason in rejected:
        for sync_fs in (False, True):
            with pytest.raises(TableRejectedError) as info:
                dev.load_table(table, sync_fs=sync_fs)
            assert info.value.errno in err and reason in info.value.kernel_log, info.value
            state = dm.info(dev.name)
            assert not state.suspended and not state.inactive_table, (table, sync_fs)
            assert dev.table() == before
            # resumed, thawed and still letting writes through
            within(10, lambda: write_file(mnt / "later", data[::-1], sync=True), thaw=mnt)
    fs.umount(str(mnt))
    dev.mount(str(mnt), OPTIONS[FSType.EXT4])
    assert (mnt / "data").read_bytes() == data
    assert (mnt / "later").read_bytes() == data[::-1]


# ---- features -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("feature", list(features.FEATURE_SINCE))
def test_the_probe_tells_what_this_kernel_has(feature, feature_cache):
    before = dm_names()
    assert features.supported(feature) is kernel_has(feature), \
        f"{feature} on {os.uname().release}"
    assert dm_names() == before  # the probe's scratch devices are gone (the session checks loops)


def test_the_probe_says_no_to_a_refused_table_and_to_an_inert_one():
    def reads_the_backing_data(path, memfd):
        with open(path, "rb", buffering=0) as fh:
            return fh.read(4096) == os.pread(memfd, 4096, 0)

    def reads_something_else(path, memfd):
        return not reads_the_backing_data(path, memfd)

    refused = features.Probe(lambda backing: (0, 128, "flakey", f"{backing} 0 0 1 1 no_such_feature"),
                             reads_the_backing_data)
    assert refused.run() is False  # the kernel said EINVAL
    inert = features.Probe(lambda backing: (0, 128, "flakey", f"{backing} 0 1 0 0"),
                           reads_something_else)
    assert inert.run() is False    # taken, but the effect never showed
    working = features.Probe(lambda backing: (0, 128, "flakey", f"{backing} 0 1 0 0"),
                             reads_the_backing_data)
    assert working.run() is True   # the same device, with an effect that is really there


def test_a_missing_feature_is_refused_before_any_change(make, feature_cache):
    dev = make(None)
    dev.allow_writes(interval=33)
    before = dev.table()
    for feature in features.FEATURE_SINCE:
        assert features.supported(feature, probe=lambda f: False) is False
    running = os.uname().release
    for feature, call in [("error_reads", dev.error_reads),
                          ("random_read_corrupt", lambda: dev.random_read_corrupt(1.0)),
                          ("random_write_corrupt", lambda: dev.random_write_corrupt(0.25)),
                          ("corrupt_bio_byte_read", lambda: dev.corrupt_bio_byte(1, "r", 7)),
                          ("corrupt_bio_byte_write", lambda: dev.corrupt_bio_byte(1, "w", 7)),
                          ("delay_flush", lambda: dev.delay(write_ms=5, flush_ms=0))]:
        with pytest.raises(UnsupportedFeatureError) as info:
            call()
        err = info.value
        since = features.FEATURE_SINCE[feature]
        assert (err.feature, err.since, err.running) == (feature, since, running)
        assert since in str(err) and running in str(err) and dev.name in str(err)
        assert dev.table() == before and not dm.info(dev.name).suspended
    # a probability of 0 corrupts nothing, so needs no feature: a pass-through switch
    dev.random_read_corrupt(0.0, up_interval=4)
    assert_table(dev, FlakeyTable(dev.backing, 4, 0))
    # delays with flushes like writes exist everywhere
    dev.delay(read_ms=1, write_ms=2, flush_ms=2)
    dev.allow_writes()


# ---- stale devices ------------------------------------------------------------------------------------

def test_cleanup_stale_removes_a_killed_owner_s_device_only(make, tmp_path):
    mine = make(None)
    child_dir = tmp_path / "child"
    child_dir.mkdir()
    name = unique_name("dmfi-stale")
    try:
        loop_device, image = flakey_of_a_killed_process(name, child_dir, SIZE[None])
        assert name in dm_names() and bound_loops(image) == [os.path.basename(loop_device)]
        assert open_flakey(name).owner.verdict() is Verdict.STALE

        removed = cleanup_stale()
        assert removed == [name]
        assert_gone(name, image)
        assert_intact(mine)
        assert cleanup_stale() == []
    finally:
        if name in dm_names():
            open_flakey(name).teardown()
