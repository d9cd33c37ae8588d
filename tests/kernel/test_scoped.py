"""Faults where they matter: a file's blocks, sector ranges, everything but the log, latency.

Each test checks what the kernel did against an oracle of its own: reads of
the faulted file fail while another file's succeed, the image file behind the
loop device shows which bytes changed, dmsetup reads the live table back, and
XFS's own superblock says where its log is.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import time
from pathlib import Path

import pytest

from dmflakey_ioctl import features, fs
from dmflakey_ioctl.errors import DMFlakeyError, InvalidArgumentError
from dmflakey_ioctl.flakey import Flakey, init_flakey, open_flakey
from dmflakey_ioctl.fs import FSType
from dmflakey_ioctl.kernel import dm
from dmflakey_ioctl.kernel.fiemap import file_extents
from dmflakey_ioctl.tables.delay import DelayTable
from dmflakey_ioctl.tables.flakey import FlakeyTable

from .helpers import CHUNK, Direct, assert_refused, dmsetup, expect_eio, kernel_has, unique_name

MiB = 1 << 20
SIZE = {FSType.EXT4: 64 * MiB, FSType.XFS: fs.MIN_SIZE[FSType.XFS],
        FSType.BTRFS: fs.MIN_SIZE[FSType.BTRFS], None: 16 * MiB}
OPTIONS = {FSType.EXT4: "commit=1000", FSType.XFS: "", FSType.BTRFS: ""}
FILE_SIZE = 256 * 1024


@pytest.fixture
def made(tmp_path):
    """init_flakey under tmp_path (mounted at tmp_path/mnt when it has a filesystem); torn down after."""
    devices: list[Flakey] = []

    def make(fs_type, **kwargs) -> Flakey:
        dev = init_flakey(unique_name("dmfi-sc"), str(tmp_path), fs_type, size=SIZE[fs_type], **kwargs)
        devices.append(dev)
        if fs_type is not None:
            (tmp_path / "mnt").mkdir()
            dev.mount(str(tmp_path / "mnt"), OPTIONS[fs_type])
        return dev

    yield make
    for dev in reversed(devices):
        try:
            dev.allow_writes()
        except DMFlakeyError:
            pass
        dev.teardown()


def block_pattern(name: str, size: int) -> bytes:
    """Data whose every 512-byte sector says which file and which sector it is."""
    return b"".join(f"{name}:{i:08d}:".encode().ljust(512, b".") for i in range(size // 512))


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3")


def read_file(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def image_at(dev: Flakey, ranges) -> bytes:
    """The image file's bytes over ranges of sectors, in order."""
    with open(dev.image_path, "rb") as fh:
        out = b""
        for start, count in ranges:
            fh.seek(start * 512)
            out += fh.read(count * 512)
        return out


def direct_overwrite(path: Path, data: bytes) -> None:
    """Overwrite the file in place with O_DIRECT: one bio per 64 KiB chunk."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        with mmap.mmap(-1, CHUNK) as buf:
            for offset in range(0, len(data), CHUNK):
                buf.seek(0)
                buf.write(data[offset:offset + CHUNK])
                assert os.pwritev(fd, [buf], offset) == CHUNK
        os.fsync(fd)
    finally:
        os.close(fd)


def merged(ranges) -> tuple:
    """Sorted ranges with touching ones joined (the oracle for a scope's read-back)."""
    out: list = []
    for start, count in sorted(ranges):
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], start + count) - out[-1][0])
        else:
            out.append((start, count))
    return tuple(out)


def two_files(mnt: Path) -> tuple[Path, Path, bytes, bytes]:
    a, b = mnt / "A", mnt / "B"
    data_a, data_b = block_pattern("A", FILE_SIZE), block_pattern("B", FILE_SIZE)
    write_synced(a, data_a)
    write_synced(b, data_b)
    return a, b, data_a, data_b


# ---- a file's blocks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fs_type", [FSType.EXT4, FSType.XFS], ids=lambda t: t.value)
def test_error_reads_on_one_file_leaves_the_other_readable(made, tmp_path, fs_type):
    dev = made(fs_type)
    a, b, data_a, data_b = two_files(tmp_path / "mnt")
    if not kernel_has("error_reads"):
        assert_refused(lambda: dev.error_reads(scope=str(a)), "error_reads", dev.name,
                       dm.table(dev.name), lambda: read_file(a) == data_a)
        return
    extents = file_extents(str(a))
    assert image_at(dev, extents)[:FILE_SIZE] == data_a   # the mapping itself, read from the image
    dev.error_reads(scope=str(a))
    assert dev.table().scope == merged(extents)
    drop_caches()
    expect_eio(lambda: read_file(a))
    assert read_file(b) == data_b
    dev.allow_writes()
    assert dev.table().scope is None
    drop_caches()
    assert read_file(a) == data_a


@pytest.mark.parametrize("fs_type", [FSType.EXT4, FSType.XFS], ids=lambda t: t.value)
def test_corrupt_bio_byte_on_writes_of_one_file_changes_only_its_bytes(made, tmp_path, fs_type):
    dev = made(fs_type)
    a, b, _, _ = two_files(tmp_path / "mnt")
    ranges_a, ranges_b = file_extents(str(a)), file_extents(str(b))
    new_a, new_b = block_pattern("a", FILE_SIZE), block_pattern("b", FILE_SIZE)
    if not kernel_has("corrupt_bio_byte_write"):
        assert_refused(lambda: dev.corrupt_bio_byte(100, "w", ord("#"), scope=str(a)),
                       "corrupt_bio_byte_write", dev.name, dm.table(dev.name),
                       lambda: read_file(a) == block_pattern("A", FILE_SIZE))
        return
    dev.corrupt_bio_byte(100, "w", ord("#"), scope=str(a))
    direct_overwrite(a, new_a)
    direct_overwrite(b, new_b)
    dev.allow_writes()
    assert file_extents(str(a)) == ranges_a and file_extents(str(b)) == ranges_b  # written in place
    stored_a, stored_b = image_at(dev, ranges_a)[:FILE_SIZE], image_at(dev, ranges_b)[:FILE_SIZE]
    assert stored_b == new_b
    changed = [i for i in range(FILE_SIZE) if stored_a[i] != new_a[i]]
    assert changed and all(stored_a[i] == ord("#") for i in changed)
    assert {i % CHUNK for i in changed} == {99}    # byte 100 of every 64 KiB bio, and nothing else
    fs.umount(str(tmp_path / "mnt"))               # the filesystem's metadata was never corrupted
    dev.mount(str(tmp_path / "mnt"))
    drop_caches()
    assert read_file(b) == new_b


def xfs_log_range(dev: Flakey) -> tuple[int, int]:
    """(start sector, sectors) of the internal log, from XFS's superblock in the image file."""
    with open(dev.image_path, "rb") as fh:
        sb = fh.read(512)
    assert sb[:4] == b"XFSB"
    blocksize, = struct.unpack(">I", sb[4:8])
    logstart, = struct.unpack(">Q", sb[48:56])
    agblocks, = struct.unpack(">I", sb[84:88])
    logblocks, = struct.unpack(">I", sb[96:100])
    agblklog = sb[124]
    agno, agbno = logstart >> agblklog, logstart & ((1 << agblklog) - 1)
    first = (agno * agblocks + agbno) * (blocksize // 512)
    return first, logblocks * (blocksize // 512)


def test_error_writes_everywhere_but_the_xfs_log(made, tmp_path):
    """As fstests' xfs/438: writes fail except where the log is."""
    dev = made(FSType.XFS)
    mnt = tmp_path / "mnt"
    log = xfs_log_range(dev)
    write_synced(mnt / "before", b"x" * 4096)
    outside = [(0, log[0]), (log[0] + log[1], dev.sectors - log[0] - log[1])]
    dev.error_writes(exclude=[log], sync_fs=True)   # frozen first: all metadata in place
    assert dev.table().scope == tuple(r for r in outside if r[1])
    before_outside, before_log = image_at(dev, outside), image_at(dev, [log])
    # a metadata-only change reaches the disk through the log alone
    (mnt / "empty").touch()
    dirfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    assert image_at(dev, [log]) != before_log
    assert image_at(dev, outside) == before_outside
    # data outside the log cannot be written
    with pytest.raises(OSError) as info:
        write_synced(mnt / "data", os.urandom(65536))
    assert info.value.errno == errno.EIO
    dev.allow_writes()
    fs.umount(str(mnt))     # XFS gives up on its failed metadata writes at unmount (fail_at_unmount)
    dev.mount(str(mnt))     # log recovery
    assert (mnt / "before").read_bytes() == b"x" * 4096


def test_btrfs_faults_exactly_the_file(made, tmp_path):
    dev = made(FSType.BTRFS)
    a, b, data_a, data_b = two_files(tmp_path / "mnt")
    if not kernel_has("error_reads"):
        assert_refused(lambda: dev.error_reads(scope=str(a)), "error_reads", dev.name,
                       dm.table(dev.name), lambda: read_file(b) == data_b)
        return
    dev.error_reads(scope=str(a))
    drop_caches()
    expect_eio(lambda: read_file(a))
    assert read_file(b) == data_b     # no other file's sectors were faulted
    dev.allow_writes()
    drop_caches()
    assert read_file(a) == data_a


# ---- sector ranges ------------------------------------------------------------------------------------

def test_ranges_merge_and_read_back_as_segments(made):
    dev = made(None)
    dev.drop_writes(scope=[(2048, 16), (2056, 16), (2072, 8), (100, 4), (4096, 8)], up_interval=0)
    backing = dev.backing
    want = [(0, 100, "linear", f"{backing} 0"),
            (100, 4, "flakey", f"{backing} 100 0 120 1 drop_writes"),
            (104, 1944, "linear", f"{backing} 104"),
            (2048, 32, "flakey", f"{backing} 2048 0 120 1 drop_writes"),
            (2080, 2016, "linear", f"{backing} 2080"),
            (4096, 8, "flakey", f"{backing} 4096 0 120 1 drop_writes"),
            (4104, dev.sectors - 4104, "linear", f"{backing} 4104")]
    lines = [line.split(None, 3) for line in dmsetup("table", dev.name).splitlines()]
    assert [(int(s), int(n), t, p.strip()) for s, n, t, p in lines] == want
    table = dev.table()
    assert table.scope == ((100, 4), (2048, 32), (4096, 8))
    assert table.fault == FlakeyTable(backing, 0, 120, offset=100, drop_writes=True)
    again = open_flakey(dev.name)
    assert (again.backing, again.sectors, again.image_path) == (backing, dev.sectors, dev.image_path)
    assert again.table() == table
    # the scoped sectors drop writes; the others keep them
    new = os.urandom(CHUNK)
    with Direct(dev.device_path) as io:
        old = io.read(2048 * 512)
        io.write(2048 * 512, new)           # sectors 2048..2175: the first 32 dropped, the rest kept
        io.write(8192 * 512, b"k" * CHUNK)
    with open(dev.image_path, "rb") as fh:
        fh.seek(2048 * 512)
        assert fh.read(CHUNK) == old[:32 * 512] + new[32 * 512:]
        fh.seek(8192 * 512)
        assert fh.read(CHUNK) == b"k" * CHUNK
    dev.allow_writes()
    assert len(dm.table(dev.name)) == 1


@pytest.mark.parametrize("scope, why", [
    ([(0, 1)], None),                           # a good one, for contrast
    ([(-1, 4)], "start at 0 or later"),
    ([(10, 0)], "at least one sector"),
    ([(10, 2.5)], "a range is"),
    ("LAST", "past the end"),
    ("/proc/version", "file extents"),
    ("TMPFILE", "FIEMAP"),
])
def test_a_bad_scope_is_refused_and_the_live_table_stays(made, tmp_path, scope, why):
    dev = made(None)
    dev.error_writes(scope=[(0, 8)], interval=7)
    before = dev.table()
    if scope == "LAST":
        scope = [(dev.sectors - 4, 8)]
    elif scope == "TMPFILE":
        scope = str(tmp_path / "on-tmpfs")
        Path(scope).write_bytes(b"x" * 8192)
    if why is None:
        dev.drop_writes(scope=scope)
        assert dev.table().scope == ((0, 1),)
        return
    with pytest.raises(DMFlakeyError) as info:
        dev.drop_writes(scope=scope)
    assert dev.name in str(info.value) or "file extents" in str(info.value)
    assert dev.table() == before and not dm.info(dev.name).suspended


def test_a_scope_of_nothing_and_a_scoped_allow_are_refused(made):
    dev = made(None)
    before = dev.table()
    with pytest.raises(InvalidArgumentError, match="no sectors"):
        dev.error_writes(scope=[(0, 16)], exclude=[(0, 32)])
    with pytest.raises(TypeError):
        dev.allow_writes(scope=[(0, 8)])  # type: ignore[call-arg]
    assert dev.table() == before


def test_faulted_restores_pass_through_also_after_an_exception(made):
    dev = made(None)
    with dev.faulted("error_writes", scope=[(0, 8)]):
        assert dev.table().scope == ((0, 8),)
    assert dev.table().fault.passes_through()
    with pytest.raises(RuntimeError):
        with dev.faulted("drop_writes"):
            assert dev.table().fault.drop_writes
            raise RuntimeError("the test's own failure")
    assert dev.table().fault.passes_through() and dev.table().scope is None
    with pytest.raises(InvalidArgumentError, match="unknown fault"):
        with dev.faulted("teardown"):
            pass


# ---- latency ------------------------------------------------------------------------------------------

def timed_read(dev: Flakey, offset: int) -> float:
    with Direct(dev.device_path) as io:
        started = time.monotonic()
        io.read(offset, 4096)
        return time.monotonic() - started


def test_delay_slows_reads_until_allow_writes(made):
    dev = made(None)
    fast = timed_read(dev, 0)
    dev.delay(read_ms=200)
    assert dev.table().fault == DelayTable(dev.backing, 0, 200, 0, 0)
    lines = dmsetup("table", dev.name).split()
    assert lines[2] == "delay"
    assert timed_read(dev, 0) >= 0.2
    dev.allow_writes()
    assert timed_read(dev, 0) < 0.2 and fast < 0.2
    # scoped: slow inside, fast outside
    dev.delay(read_ms=300, write_ms=300, flush_ms=300, scope=[(2048, 8)])
    assert timed_read(dev, 2048 * 512) >= 0.3
    assert timed_read(dev, 4096 * 512) < 0.3
    dev.allow_writes()


def test_a_flush_delay_of_its_own(made):
    dev = made(None)
    if not kernel_has("delay_flush"):
        assert_refused(lambda: dev.delay(write_ms=0, flush_ms=300), "delay_flush", dev.name,
                       dm.table(dev.name), lambda: True)
        return
    dev.delay(write_ms=0, flush_ms=300)
    assert len(dmsetup("table", dev.name).split()) == 3 + 9
    fd = os.open(dev.device_path, os.O_RDWR)
    try:
        started = time.monotonic()
        os.fsync(fd)
        assert time.monotonic() - started >= 0.3
    finally:
        os.close(fd)
    dev.allow_writes()
    assert features.supported("delay_flush")
