"""The log reader and replayer against logs the KERNEL wrote (dm-log-writes through raw dm ioctls).

No recorder of the library is involved: the test maps ``log-writes`` over two
loop devices itself, writes known data through the dm device (O_DIRECT,
buffered + fsync, BLKDISCARD), sends ``mark`` messages and removes the device.
The oracles are the data image the kernel wrote and copies of the device read
with O_DIRECT right after each mark, never the replayer's own output.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import random
import struct
import time
from pathlib import Path
from typing import Dict, NamedTuple

import pytest

from dmflakey_ioctl.errors import DeviceBusyError, DMFlakeyError
from dmflakey_ioctl.kernel import dm, loop
from dmflakey_ioctl.writelog import END_MARK, LogFlags, WriteLog

from .helpers import dm_names, sparse_file, unique_name

MiB = 1 << 20
DATA_SIZE = 16 * MiB
LOG_SIZE = 48 * MiB
BLKDISCARD = 0x1277


def major_minor(path: str) -> str:
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def log_writes_table(data: str, log: str, size: int) -> list:
    return [(0, size // 512, "log-writes", f"{major_minor(data)} {major_minor(log)}")]


def read_direct(path: str, size: int) -> bytes:
    """The whole device read with O_DIRECT: what the data device holds, past every cache."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    out = bytearray()
    try:
        with mmap.mmap(-1, MiB) as buf:
            for pos in range(0, size, MiB):
                assert os.preadv(fd, [buf], pos) == MiB
                out += buf
    finally:
        os.close(fd)
    return bytes(out)


def write_direct(fd: int, data: bytes, pos: int) -> None:
    with mmap.mmap(-1, len(data)) as buf:
        buf[:] = data
        assert os.pwritev(fd, [buf], pos) == len(data)


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Recorded(NamedTuple):
    block_size: int
    data_image: Path
    log_image: Path
    log_device: str                  # the log's loop device, still attached (the dm device is gone)
    at_mark: Dict[str, bytes]        # the device read with O_DIRECT right after each mark
    stale_super: bytes               # the log device's super block through its (stale) page cache
    discarded: tuple                 # (byte offset, bytes) of the BLKDISCARD


@pytest.fixture(scope="module", params=[512, 4096], ids=["512", "4Kn"])
def recorded(request, tmp_path_factory):
    """A workload recorded by the kernel's log-writes target, and what the device held at each mark."""
    bs = request.param
    tmp = tmp_path_factory.mktemp(f"writelog-{bs}")
    data_image = sparse_file(tmp / "data.img", DATA_SIZE)
    log_image = sparse_file(tmp / "log.img", LOG_SIZE)
    name = unique_name("dmfi-lw")
    at_mark: Dict[str, bytes] = {}
    with loop.attach(str(data_image), block_size=bs) as data_dev, \
            loop.attach(str(log_image), block_size=bs) as log_dev:
        # keep the log device open with a page cached from before the recording: the kernel's
        # log bios go past that cache, so the reader must drop it (this descriptor, open until
        # the end, keeps the kernel from dropping the cache at the device's last close)
        prime = os.open(log_dev.path, os.O_RDONLY)
        try:
            assert os.pread(prime, 4096, 0) == bytes(4096)
            try:
                dm.create(name)
                dm.load(name, log_writes_table(data_dev.path, log_dev.path, DATA_SIZE))
                dm.resume(name)
                device = f"/dev/mapper/{name}"
                fd = os.open(device, os.O_RDWR | os.O_DIRECT)
                try:
                    for n, pos in enumerate([0, 3 * MiB, 3 * MiB + 64 * 1024, 15 * MiB]):
                        write_direct(fd, pattern(n, 64 * 1024), pos)
                    os.fsync(fd)                     # a FLUSH: the writes are logged before the mark
                finally:
                    os.close(fd)
                dm.message(name, 0, "mark after-direct")
                at_mark["after-direct"] = read_direct(device, DATA_SIZE)

                fd = os.open(device, os.O_RDWR)
                try:
                    os.pwrite(fd, pattern(10, 200 * 1024), 5 * MiB)
                    os.pwrite(fd, pattern(11, 8192), 3 * MiB + 4096)   # over the O_DIRECT data
                    os.fsync(fd)
                    discarded = (6 * MiB, 2 * MiB)
                    os.pwrite(fd, pattern(12, MiB), 6 * MiB + 512 * 1024)   # then discarded
                    os.fsync(fd)
                    fcntl.ioctl(fd, BLKDISCARD, struct.pack("=QQ", *discarded))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                dm.message(name, 0, "mark after-discard")
                at_mark["after-discard"] = read_direct(device, DATA_SIZE)
                dm.message(name, 0, "mark after-discard")  # a repeated label

                fd = os.open(device, os.O_RDWR)
                try:
                    os.pwrite(fd, pattern(13, 12288), 9 * MiB)  # never fsynced: logged at removal
                finally:
                    os.close(fd)
            finally:
                if name in dm_names():
                    dm.remove(name)
            stale_super = os.pread(prime, 4096, 0)
            # still open while the tests read the device: its last close would drop the cache
            yield Recorded(bs, data_image, log_image, log_dev.path, at_mark, stale_super, discarded)
        finally:
            os.close(prime)


def test_kernel_log_parses(recorded):
    with WriteLog.open(recorded.log_image) as log:
        assert log.sector_size == recorded.block_size
        assert len(log) == log.nr_entries and log.entries_beyond_count == 0
        assert log.marks["after-direct"] == [log.index_of("after-direct")]
        assert len(log.marks["after-discard"]) == 2
        assert log[-1].label == END_MARK and log.marks[END_MARK] == [len(log) - 1]
        assert log.index_of("after-direct") < log.index_of("after-discard")
        flushes = log.flush_points()
        assert flushes and all(log[i].flags & (LogFlags.FLUSH | LogFlags.FUA) for i in flushes)
        assert any(i < log.index_of("after-direct") for i in flushes)
        discards = [e for e in log if e.flags & LogFlags.DISCARD]
        pos, size = recorded.discarded
        assert discards and min(e.offset for e in discards) == pos
        assert sum(e.size for e in discards) == size
        writes = [e for e in log if e.size and not e.flags & LogFlags.DISCARD]
        assert all(e.offset % recorded.block_size == 0 for e in writes)
        # the O_DIRECT writes of 64 KiB are in the log with their data
        first = next(e for e in writes if e.offset == 15 * MiB)
        assert log.read_data(first.index)[:first.size] == pattern(3, 64 * 1024)[:first.size]
        assert log.device_size == 15 * MiB + 64 * 1024       # no size mark: the highest byte written


def test_full_replay_equals_the_data_image(recorded, tmp_path):
    target = sparse_file(tmp_path / "replay.img", DATA_SIZE)
    with WriteLog.open(recorded.log_image) as log:
        result = log.replay(target)
        assert result.entries == len(log) and result.bytes_zeroed == recorded.discarded[1]
    assert target.read_bytes() == recorded.data_image.read_bytes()
    assert target.read_bytes()[9 * MiB:9 * MiB + 12288] == pattern(13, 12288)


@pytest.mark.parametrize("label", ["after-direct", "after-discard"])
def test_replay_to_a_mark_equals_the_device_at_that_mark(recorded, tmp_path, label):
    target = sparse_file(tmp_path / "replay.img", DATA_SIZE)
    with WriteLog.open(recorded.log_image) as log:
        log.replay(target, until=label)
    assert target.read_bytes() == recorded.at_mark[label]
    assert recorded.at_mark["after-direct"] != recorded.at_mark["after-discard"]


def test_materialize_a_state_and_replay_onto_a_block_device(recorded, tmp_path):
    image = tmp_path / "state.img"
    with WriteLog.open(recorded.log_image) as log:
        log.materialize("after-direct", image)
        assert image.read_bytes()[:log.device_size] == recorded.at_mark["after-direct"][:log.device_size]
        # replay onto a loop device: discards go through BLKZEROOUT
        full = sparse_file(tmp_path / "full.img", DATA_SIZE)
        with open(full, "r+b") as fh:
            fh.write(b"\xee" * DATA_SIZE)                  # the discard must zero this out
        with loop.attach(str(full), block_size=recorded.block_size) as dev:
            log.replay(dev.path, start=0)
    expect = recorded.data_image.read_bytes()
    touched = bytearray(DATA_SIZE)                          # 1 where an entry wrote or discarded
    with WriteLog.open(recorded.log_image) as log:
        for e in log:
            touched[e.offset:e.offset + e.size] = b"\1" * e.size
    got = full.read_bytes()
    checked = 0
    for pos in range(0, DATA_SIZE, 4096):   # touched blocks equal the image, the others kept 0xee
        part = slice(pos, pos + 4096)
        if touched[part] == b"\1" * 4096:
            assert got[part] == expect[part], pos
            checked += 1
        elif not any(touched[part]):
            assert got[part] == b"\xee" * 4096, pos
    assert got[recorded.discarded[0]:sum(recorded.discarded)] == bytes(recorded.discarded[1])
    assert checked > 2 * MiB // 4096


def test_replay_onto_a_device_held_by_dm_is_refused(recorded, tmp_path):
    image = sparse_file(tmp_path / "held.img", DATA_SIZE)
    name = unique_name("dmfi-lwheld")
    with loop.attach(str(image), block_size=recorded.block_size) as dev:
        try:
            dm.create(name)
            dm.load(name, [(0, DATA_SIZE // 512, "linear", f"{major_minor(dev.path)} 0")])
            dm.resume(name)
            with WriteLog.open(recorded.log_image) as log:
                with pytest.raises(DeviceBusyError) as info:
                    log.replay(dev.path)
            assert info.value.errno == errno.EBUSY and "in use" in str(info.value)
        finally:
            if name in dm_names():
                dm.remove(name)
    with open(image, "rb") as fh:
        assert not any(fh.read())                           # nothing was written


def test_reading_the_log_block_device_drops_its_stale_cache(recorded):
    assert recorded.stale_super == bytes(4096)              # the cache never saw the kernel's log
    with WriteLog.open(recorded.log_image) as from_file, WriteLog.open(recorded.log_device) as from_dev:
        assert list(from_dev) == list(from_file)
        assert from_dev.nr_entries == from_file.nr_entries
        last_write = max(i for i, e in enumerate(from_file) if e.size and not e.flags & LogFlags.DISCARD)
        assert from_dev.read_data(last_write) == from_file.read_data(last_write)


def test_target_smaller_than_the_log_needs_is_refused(recorded, tmp_path):
    small = tmp_path / "small.img"
    small.write_bytes(b"\x77" * (8 * MiB))
    with WriteLog.open(recorded.log_image) as log:
        with pytest.raises(DMFlakeyError) as info:
            log.replay(small)
    assert str(15 * MiB + 64 * 1024) in str(info.value)
    assert small.read_bytes() == b"\x77" * (8 * MiB)


def test_a_full_log_device_disables_logging_and_the_reader_keeps_what_was_logged(tmp_path, capsys):
    """The kernel stops logging when the log device is full; the status line says so."""
    data_image = sparse_file(tmp_path / "data.img", 4 * MiB)
    log_image = sparse_file(tmp_path / "log.img", 128 * 1024)
    name = unique_name("dmfi-lwfull")
    with loop.attach(str(data_image)) as data_dev, loop.attach(str(log_image)) as log_dev:
        try:
            dm.create(name)
            dm.load(name, log_writes_table(data_dev.path, log_dev.path, 4 * MiB))
            dm.resume(name)
            status_new = dm.status(name)[0].params
            dm.message(name, 0, "mark start")
            fd = os.open(f"/dev/mapper/{name}", os.O_RDWR | os.O_DIRECT)
            try:
                write_direct(fd, pattern(1, 64 * 1024), 0)
                os.fsync(fd)
                status_before = dm.status(name)[0].params
                write_direct(fd, pattern(2, 256 * 1024), MiB)
                os.fsync(fd)
                # the target's log thread writes the entry after the data write completed: wait
                # (bounded) for it to find the log full
                deadline = time.monotonic() + 10
                status_after = dm.status(name)[0].params
                while "logging_disabled" not in status_after and time.monotonic() < deadline:
                    time.sleep(0.05)
                    status_after = dm.status(name)[0].params
                write_direct(fd, pattern(3, 4096), 2 * MiB)    # the device still takes writes
                os.fsync(fd)
            finally:
                os.close(fd)
            # the kernel takes a mark when logging is disabled, and drops it: the caller must
            # read the status to know
            assert dm.message(name, 0, "mark too-late") is None
            status_end = dm.status(name)[0].params
        finally:
            if name in dm_names():
                dm.remove(name)
        with capsys.disabled():
            print(f"\nlog-writes status: new {status_new!r}; after 64 KiB {status_before!r}; "
                  f"after 256 KiB more {status_after!r}; after a mark {status_end!r}")
        assert "logging_disabled" not in status_new and "logging_disabled" not in status_before
        assert status_after.endswith(" logging_disabled") and status_end == status_after
        logged = int(status_after.split()[0])
        with open(data_image, "rb") as fh:
            fh.seek(2 * MiB)
            assert fh.read(4096) == pattern(3, 4096)
        with WriteLog.open(log_image) as log:
            assert len(log) == logged                          # the kernel's own count
            assert log.marks == {"start": [0]} and END_MARK not in log.marks
            assert log.nr_entries < len(log)
